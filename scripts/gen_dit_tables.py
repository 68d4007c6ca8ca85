"""Regenerate the DiT family tables shipped in ``loratool/arch/*_modules.json`` (Wan, HunyuanVideo, LTX,
Qwen-Image, Z-Image, Lumina 2, HiDream, Flux.2, Chroma, Krea 2, Anima, ERNIE-Image) from diffusers'
model classes on the ``meta`` device (no weights, no network).

Run ``python scripts/gen_dit_tables.py [family ...]``. The configs are the published ones (the
``config.json`` of each released ``transformer/`` folder), hard-coded below. For every variant the
script checks that the family's native naming covers every weight-owning module of the diffusers
model (Linear, Conv, Embedding, norms) and stops naming the first uncovered ones otherwise. Each
table holds, for block 0 only (kohya name restoration templates block indices):

* ``diffusers_modules``: every weight-owning module path of the diffusers model (union of variants);
* ``native_modules``: the same modules in the family's native naming;
* ``spelling_modules``: in the other native spellings the family reads (musubi-tuner's);
* ``variants``: the published configs.

A family's sub-models (``DitFamily.submodels``: Anima's ``llm_adapter`` = diffusers' ``AnimaTextConditioner``)
get a table of their own (``<table>.json``: ``class``, ``variants``, every weight-owning module path of block 0
in diffusers' naming; the native names are those paths under the sub-model's prefix), from ``SUBMODEL_VARIANTS``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loratool.arch import dit  # noqa: E402
from loratool.arch.generate import meta_model, weight_paths  # noqa: E402

ARCH = ROOT / "loratool" / "arch"

_WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_QWEN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
_HV = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
           num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
           qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
           rope_theta=256.0, rope_axes_dim=(16, 56, 56))
_HV15 = dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
             num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=3584,
             text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
             use_meanflow=False, target_size=640, task_type="t2v")
VARIANTS: dict[str, dict[str, dict]] = {
    # Wan-AI/Wan2.1-*-Diffusers and Wan2.2-*-Diffusers transformer/config.json
    "wan": {
        "wan2.1-t2v-1.3b": dict(_WAN_14B, num_attention_heads=12, ffn_dim=8960, num_layers=30),
        "wan2.1-t2v-14b": dict(_WAN_14B),
        "wan2.1-i2v-14b": dict(_WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
        "wan2.1-flf2v-14b": dict(_WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120,
                                 pos_embed_seq_len=514),
        "wan2.2-ti2v-5b": dict(_WAN_14B, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                               out_channels=48),
        "wan2.2-t2v-a14b": dict(_WAN_14B),
        "wan2.2-i2v-a14b": dict(_WAN_14B, in_channels=36),
    },
    # black-forest-labs/FLUX.2-dev, FLUX.2-klein-4B, FLUX.2-klein-9B transformer/config.json
    "flux2": {
        "flux.2-dev": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                           num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
                           mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True),
        "flux.2-klein-4b": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                                rope_theta=2000, guidance_embeds=False),
        "flux.2-klein-9b": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24,
                                attention_head_dim=128, num_attention_heads=32, joint_attention_dim=12288,
                                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                                rope_theta=2000, guidance_embeds=False),
    },
    # lodestones/Chroma1-HD transformer/config.json
    "chroma": {
        "chroma1-hd": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                           approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5),
    },
    # hunyuanvideo-community/HunyuanVideo, HunyuanVideo-I2V, lllyasviel/FramePackI2V_HY transformer/config.json
    "hunyuan_video": {
        "hunyuanvideo-t2v": _HV,
        "hunyuanvideo-i2v": dict(_HV, in_channels=33, image_condition_type="latent_concat"),
        "framepack": dict(_HV, _class="HunyuanVideoFramepackTransformer3DModel", has_image_proj=True,
                          image_proj_dim=1152, has_clean_x_embedder=True),
    },
    # Lightricks/LTX-Video (0.9.x 2B; 0.9.7 13B) transformer/config.json
    "ltx_video": {
        "ltxv-2b": dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                        attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096,
                        qk_norm="rms_norm_across_heads", attention_bias=True, attention_out_bias=True),
        "ltxv-13b": dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                         attention_head_dim=128, cross_attention_dim=4096, num_layers=48, caption_channels=4096,
                         qk_norm="rms_norm_across_heads", attention_bias=True, attention_out_bias=True),
    },
    # Lightricks/LTX-2 transformer/config.json (diffusers' defaults are LTX-2's)
    "ltx2": {"ltx-2": dict()},
    # Tongyi-MAI/Z-Image-Turbo transformer/config.json
    "z_image": {
        "z-image": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                        n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                        rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
    },
    # Alpha-VLLM/Lumina-Image-2.0 transformer/config.json
    "lumina2": {
        "lumina-image-2.0": dict(sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26,
                                 num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256,
                                 norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(32, 32, 32),
                                 axes_lens=(300, 512, 512), cap_feat_dim=2304),
    },
    # krea/Krea-2 transformer/config.json (diffusers' defaults are the released model's)
    "krea2": {"krea-2": dict()},
    # nvidia/Cosmos-Predict2-2B-Text2Image transformer/config.json (Anima's DiT)
    "anima": {
        "anima-2b": dict(in_channels=16, out_channels=16, num_attention_heads=16, attention_head_dim=128,
                         num_layers=28, mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256,
                         max_size=(128, 240, 240), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
                         concat_padding_mask=True, extra_pos_embed_type=None),
    },
    # baidu ERNIE-Image transformer/config.json (diffusers' defaults)
    "ernie_image": {"ernie-image": dict()},
    # hunyuanvideo-community/HunyuanVideo-1.5-Diffusers: the filled TRANSFORMER_CONFIGS of diffusers'
    # scripts/convert_hunyuan_video1_5_to_diffusers.py (720p_i2v and the other distilled entries are empty there)
    "hunyuan_video_1_5": {
        "480p_t2v": _HV15,
        "480p_i2v": dict(_HV15, task_type="i2v"),
        "720p_t2v": dict(_HV15, target_size=960),
        "480p_t2v_distilled": _HV15,
    },
    # HiDream-ai/HiDream-I1-Full transformer/config.json
    "hidream": {
        "hidream-i1": dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
                           attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096],
                           text_emb_dim=2048, num_routed_experts=4, num_activated_experts=2,
                           axes_dims_rope=(64, 32, 32), max_resolution=(128, 128), llama_layers=list(range(48))),
    },
    # Qwen/Qwen-Image(-Edit, -Edit-2511, -Layered) transformer/config.json
    "qwen_image": {
        "qwen-image": _QWEN,
        "qwen-image-edit-2511": dict(_QWEN, zero_cond_t=True),
        "qwen-image-layered": dict(_QWEN, use_additional_t_cond=True, use_layer3d_rope=True),
    },
}


# published configs of the sub-models, by table name
SUBMODEL_VARIANTS: dict[str, dict[str, dict]] = {
    # Anima's LLM adapter: ComfyUI comfy/ldm/anima/model.py builds ``LLMAdapter()`` with its defaults (source, target
    # and model width 1024, 6 blocks, 16 heads, self-attention, RMSNorm, a 32128-token T5 vocabulary), which are
    # diffusers' AnimaTextConditioner defaults; in_proj exists only when model_dim != target_dim (not released)
    "anima_text_conditioner_modules": {"anima-llm-adapter": dict()},
}


def submodel_table(sub: dit.SubModel) -> dict:
    import diffusers

    paths: set[str] = set()
    variants = SUBMODEL_VARIANTS[sub.table]
    for cfg in variants.values():
        model = meta_model(lambda c=cfg: getattr(diffusers, sub.diffusers_class)(**c))
        paths |= set(weight_paths(model))
    blocks = {"blocks"}
    return {
        "class": sub.diffusers_class,
        "component": sub.component,
        "native_prefix": sub.native_prefix,
        "variants": {name: _jsonable(cfg) for name, cfg in variants.items()},
        "diffusers_modules": sorted(p for p in paths if block_zero(p, blocks)),
    }


def block_zero(path: str, blocks: set[str]) -> bool:
    """Paths outside indexed blocks, and those of block 0."""
    parts = path.split(".")
    for i in range(len(parts) - 1):
        if ".".join(parts[:i + 1]) in blocks and parts[i + 1].isdigit():
            return parts[i + 1] == "0"
    return True


def family_table(spec: dit.DitFamily) -> dict:
    import diffusers

    diff_paths: set[str] = set()
    native: set[str] = set()
    spelled: set[str] = set()
    uncovered: set[str] = set()
    params: set[str] = set()
    variants = VARIANTS[spec.name]
    for cfg in variants.values():
        cfg = dict(cfg)
        cls = getattr(diffusers, cfg.pop("_class", spec.diffusers_class))
        model = meta_model(lambda c=cfg, k=cls: k(**c))
        modules = set(weight_paths(model))
        for name, _ in model.named_parameters():
            module, _, suffix = name.rpartition(".")
            if module in modules and suffix in ("weight", "bias"):
                continue
            params.add(name)
            if spec.params is not None and spec.params.native_of(name) is None:
                uncovered.add(name)
        for path in modules:
            diff_paths.add(path)
            if spec.naming is None:
                continue
            hit = spec.naming.native_of(path)
            if hit is None:
                uncovered.add(path)
                continue
            native.add(hit[0])
            for other in spec.spellings:
                alt = other.native_of(path)
                if alt is not None:
                    spelled.add(alt[0])
    if uncovered and not spec.partial:
        raise SystemExit(f"{spec.name}: native naming lacks {sorted(uncovered)[:8]}")
    diff_blocks = {b.diffusers for b in spec.primary.blocks} if spec.naming is not None else set(spec.block_lists)
    if spec.naming is None:  # native names are diffusers' own, maybe renamed by table
        naming = dit.identity_naming(spec.title, sorted(diff_paths), spec.block_lists, spec.renames)
        native = {naming.native_of(p)[0] for p in diff_paths}
    native_blocks = {b.native for n in spec.namings for b in n.blocks} if spec.naming is not None \
        else set(spec.block_lists)
    return {
        "family": spec.name,
        "class": spec.diffusers_class,
        "variants": {name: _jsonable(cfg) for name, cfg in variants.items()},
        "diffusers_modules": sorted(p for p in diff_paths if block_zero(p, diff_blocks)),
        "diffusers_params": sorted(p for p in params if block_zero(p, diff_blocks)),
        "native_modules": sorted(p for p in native if block_zero(p, native_blocks)),
        "spelling_modules": sorted(p for p in spelled if block_zero(p, native_blocks)),
        # partial namings: diffusers modules without a native name (not readable from native files)
        "uncovered_modules": sorted(p for p in uncovered if block_zero(p, diff_blocks)),
    }


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def main(names: list[str]) -> None:
    for spec in dit.specs().values():
        if names and spec.name not in names:
            continue
        if spec.name not in VARIANTS:
            print(f"skip {spec.name}: no published configs here")
            continue
        path = ARCH / f"{spec.table}.json"
        path.write_text(json.dumps(family_table(spec), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
        for sub in spec.submodels:
            path = ARCH / f"{sub.table}.json"
            path.write_text(json.dumps(submodel_table(sub), indent=1) + "\n", encoding="utf-8")
            print(f"wrote {path}")


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if re.match(r"^\w+$", a)])
