"""Regenerate the module-path tables shipped in ``loratool/arch/*.json`` from the real models.

Run ``python -m loratool.arch.generate`` (needs the test extras: diffusers, transformers).
Models are instantiated on the ``meta`` device, so no weights are allocated or downloaded;
the configs below are the published ones (layer counts and block layouts are what matter
for names, not the hidden sizes).

Each table lists every dotted path of a module that owns a ``weight`` parameter (Linear,
Conv, Embedding, norms: LyCORIS can train all of them), in the naming of the HF /
diffusers implementation, which is also the naming kohya uses for these families.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
SD2_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77)
# OpenCLIP ViT-H as diffusers ships it for SD 2.x (HF CLIP naming, 23 layers: the last is dropped).
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")


def weight_paths(model) -> list[str]:
    """Dotted paths of every module that owns a ``weight`` parameter."""
    return sorted(name for name, mod in model.named_modules()
                  if name and "weight" in dict(mod.named_parameters(recurse=False)))


def meta_model(factory):
    """``factory()`` built on the ``meta`` device: module names without allocating weights."""
    import torch

    with torch.device("meta"):
        return factory()


def sd_tables() -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = {}
    for fam, unet_cfg, te_cfg in (("sd1", SD15_UNET, CLIP_L), ("sd2", SD2_UNET, OPENCLIP_H)):
        unet = meta_model(lambda c=unet_cfg: UNet2DConditionModel(**c))
        te = meta_model(lambda c=te_cfg: CLIPTextModel(CLIPTextConfig(**c)))
        # transformers >= 5 strips ``text_model.`` from CLIPTextModel; checkpoints, kohya and
        # diffusers files keep it, and so does the canonical naming.
        te_paths = [p if p.startswith("text_model.") else f"text_model.{p}" for p in weight_paths(te)]
        out[fam] = {"unet": weight_paths(unet), "text_encoder": sorted(te_paths)}
    return out


def llm_tables() -> dict:
    """One tiny model per architecture: layer indices generalise through name templates."""
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    specs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, small),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, small),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, small),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(small, head_dim=8)),
        "phi": (tf.PhiConfig, tf.PhiForCausalLM, small),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4)),
        "t5": (tf.T5Config, tf.T5ForConditionalGeneration,
               dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)),
        "t5_encoder": (tf.T5Config, tf.T5EncoderModel,
                       dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)),
    }
    out = {}
    for name, (cfg_cls, model_cls, kwargs) in specs.items():
        model = meta_model(lambda c=cfg_cls, m=model_cls, k=kwargs: m(c(**k)))
        out[name] = weight_paths(model)
    return out


def main() -> None:
    for fname, tables in (("sd.json", sd_tables()), ("llm.json", llm_tables())):
        (HERE / fname).write_text(json.dumps(tables, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {HERE / fname}")


if __name__ == "__main__":
    main()
