"""Regenerate the SDXL / Flux / SD3 tables shipped in ``loratool/arch`` (``sdxl_*.json``, ``flux_*.json``,
``sd3_*.json``) from the real model classes on the ``meta`` device (no weights, no network).

Run ``python scripts/gen_arch_tables.py``. Configs are the published ones, hard-coded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loratool.arch.generate import meta_model, weight_paths

ARCH = Path(__file__).resolve().parents[1] / "loratool" / "arch"

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
# SD3 / SD3.5 transformers (diffusers configs); depth and dual-attention layers decide the names.
SD3_VARIANTS = {
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
}
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)


def clip_paths(cfg: dict, projection: bool) -> list[str]:
    """HF CLIP text-model paths as stored on disk (``text_model.`` prefix; transformers 5's bare
    ``CLIPTextModel`` drops it in memory, files and kohya keys keep it)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = meta_model(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)))
    paths = weight_paths(model)
    return paths if projection else [p for p in paths if p != "text_projection"]


def sdxl_tables() -> dict[str, dict]:
    from diffusers import UNet2DConditionModel

    from loratool.arch.sdxl import diffusers_to_sgm

    unet = meta_model(lambda: UNet2DConditionModel(**SDXL_UNET))
    up_attn = {i for i, t in enumerate(SDXL_UNET["up_block_types"]) if t.startswith("CrossAttn")}
    table = {}
    for path in weight_paths(unet):
        sgm = diffusers_to_sgm(path, SDXL_UNET["layers_per_block"], up_attn)
        if sgm is None:
            raise SystemExit(f"no SGM name for {path}")
        table[sgm] = path
    te = {"text_encoder": clip_paths(CLIP_L, False), "text_encoder_2": clip_paths(CLIP_G, True)}
    return {"sdxl_unet.json": {"sgm_to_diffusers": dict(sorted(table.items()))}, "sdxl_text_encoders.json": te}


def flux_tables() -> dict[str, dict]:
    from transformers import T5Config, T5EncoderModel

    t5 = meta_model(lambda: T5EncoderModel(T5Config(**T5_XXL)))
    data = {"num_layers": FLUX_DEV["num_layers"], "num_single_layers": FLUX_DEV["num_single_layers"],
            "text_encoder": clip_paths(CLIP_L, False), "text_encoder_2": weight_paths(t5)}
    return {"flux_modules.json": data}


def sd3_tables() -> dict[str, dict]:
    """Depths per variant (checked: the MMDiT map covers every Linear / Conv of the diffusers model)."""
    from diffusers import SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from loratool.arch import sd3

    variants = {}
    for name, cfg in SD3_VARIANTS.items():
        model = meta_model(lambda c=cfg: SD3Transformer2DModel(**c))
        layers = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        dual = list(cfg.get("dual_attention_layers", ()))
        covered = {t for ts in sd3.module_table(cfg["num_layers"], dual).values() for t in ts}
        if layers != covered:
            raise SystemExit(f"{name}: MMDiT map differs from diffusers: {sorted(layers ^ covered)[:5]}")
        variants[name] = {"num_layers": cfg["num_layers"], "dual_attention_layers": dual}
    t5 = meta_model(lambda: T5EncoderModel(T5Config(**T5_XXL)))
    data = {"variants": variants, "text_encoder": clip_paths(CLIP_L, True), "text_encoder_2": clip_paths(CLIP_G, True),
            "text_encoder_3": weight_paths(t5)}
    return {"sd3_modules.json": data}


def main() -> None:
    for tables in (sdxl_tables(), flux_tables(), sd3_tables()):
        for fname, data in tables.items():
            (ARCH / fname).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            print(f"wrote {ARCH / fname}")


if __name__ == "__main__":
    main()
