"""Tiny real models from transformers / diffusers, seeded, for building fixtures and oracles.

Every factory returns a fresh model in float32 with deterministic random weights; they are
small enough that a test can build several in well under a second.
"""

from __future__ import annotations

import torch


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    seeded(seed)
    cfg = LlamaConfig(**{
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False, **overrides,
    })
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """GPT-2 uses Conv1D (weights stored [in, out]): the fan_in_fan_out case."""
    from transformers import GPT2Config, GPT2LMHeadModel

    seeded(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_clip_text(seed: int = 0, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    seeded(seed)
    cfg = CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32):
    """An SD-1.x-shaped U-Net (two down / up blocks, cross attention, resnets, conv k×k)."""
    from diffusers import UNet2DConditionModel

    seeded(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


def randomize_lora(model, seed: int = 1, std: float = 0.1) -> None:
    """PEFT initialises lora_B to zero; give every adapter tensor random values instead."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "hada_" in name or "lokr_" in name or "magnitude" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std + (1.0 if "magnitude" in name else 0.0))
