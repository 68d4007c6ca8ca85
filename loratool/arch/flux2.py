"""FLUX.2 (dev, klein 4B / 9B): the BFL naming (black-forest-labs/flux2, musubi-tuner ``flux_2/flux2_models.py``,
ComfyUI; ``diffusion_model.`` / ``lora_unet_`` LoRA keys) and its map to diffusers' ``Flux2Transformer2DModel``
(diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers`` and ``_convert_non_diffusers_flux2_lora_to_diffusers``
/ ``_convert_kohya_flux2_lora_to_diffusers`` spell the same map).

Unlike Flux.1: modulation is shared (``double_stream_modulation_img.lin``, ``double_stream_modulation_txt.lin``,
``single_stream_modulation.lin`` at the top, none per block), the MLPs are SwiGLU (``img_mlp.0`` = gate and up
in one weight, 2·M rows), and diffusers keeps the single block's fused projection whole:
``single_blocks.i.linear1`` (rows [q; k; v; gate; up] = 3·D + 2·M) is ``attn.to_qkv_mlp_proj`` and ``linear2``
is ``attn.to_out`` — renames. Double blocks fuse q/k/v like Flux.1 (``img_attn.qkv`` -> ``attn.to_q``,
``to_k``, ``to_v``: row thirds, split exactly by :mod:`loratool.arch.fused`). ``final_layer.adaLN_modulation.1``
stores [shift; scale] against diffusers' ``norm_out.linear`` [scale; shift] (the weight converter swaps the
halves; diffusers' LoRA converter forgets to, so for that module loratool follows the weights).

Widths: dev 6144 (8 double, 48 single blocks), klein 4B 3072 (5 + 20), klein 9B 4096 (8 + 24).
"""

from __future__ import annotations

from collections.abc import Mapping

from loratool.arch import dit, fused

DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
SINGLE_BLOCK = {
    "linear1": ("attn.to_qkv_mlp_proj",),
    "linear2": ("attn.to_out",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
SWAPPED = {"final_layer.adaLN_modulation.1"}
NAMING = fused.FusedNaming(
    what="a FLUX.2 transformer module",
    blocks=(fused.Block("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
            fused.Block("single_blocks", "single_transformer_blocks", SINGLE_BLOCK)),
    top=TOP,
    swapped=lambda native, module: native in SWAPPED,
)
# QK-norm scales are stored as ``.scale`` (BFL RMSNorm), diffusers ``.weight``
PARAMS = dit.scale_params("a FLUX.2 transformer parameter", tuple(
    (native, diffusers, {k: v[0] for k, v in table.items() if k.endswith("_norm")})
    for native, diffusers, table in (("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
                                     ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK))))
WIDTHS = {6144: "dev", 3072: "klein 4B", 4096: "klein 9B"}


def _variant(width: int | None, metadata: Mapping[str, str] | None = None) -> str | None:
    arch_ = (metadata or {}).get("modelspec.architecture", "").lower()
    for name, text in (("klein-4b", "klein 4B"), ("klein-9b", "klein 9B"), ("flux.2-dev", "dev")):
        if name in arch_:
            return text
    return WIDTHS.get(width) if width else None


def adapter_variant(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    width = next((s[1] for p, s in shapes.items() if p.endswith(("attn.to_q", "attn.to_qkv_mlp_proj", "to_out.0"))),
                 None)
    return _variant(width, metadata)


def base_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    q = shapes.get("transformer_blocks.0.attn.to_q.weight")
    return _variant(q[1] if q else None)


def shapes_fit(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """FLUX.2 against Flux.1 (same BFL names): linear1 holds 3·D + 2·3·D rows (Flux.1: 3·D + 4·D), the
    SwiGLU img_mlp.0 2·3·D (Flux.1: 4·D)."""
    return dit.rows_fit(shapes, {("linear1", "attn.to_qkv_mlp_proj"): 9, ("img_mlp.0", "txt_mlp.0", "ff.linear_in"): 6})


SPEC = dit.DitFamily(
    name="flux2",
    title="FLUX.2",
    table="flux2_modules",
    diffusers_class="Flux2Transformer2DModel",
    pipelines=("Flux2",),
    naming=NAMING,
    params=PARAMS,
    metadata=("flux.2", "flux2", "flux-2"),
    markers=(r"(double|single)_stream_modulation", r"time_guidance_embed", r"\.ff(_context)?\.linear_(in|out)$",
             r"to_qkv_mlp_proj$"),
    single_file_marks=("double_stream_modulation_img.lin.weight",),
    variant=adapter_variant,
    base_variant=base_variant,
    shapes_fit=shapes_fit,
)
FAMILY = SPEC.family
