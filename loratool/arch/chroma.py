"""Chroma (lodestones/Chroma, Chroma1-HD): Flux.1-schnell's BFL naming without per-block modulation — a
``distilled_guidance_layer`` computes every block's modulation from the timestep — mapped to diffusers'
``ChromaTransformer2DModel`` (diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers`` spells it; LoRAs
load through diffusers' Flux loader, ``_convert_kohya_flux_lora_to_diffusers``).

The block modules (``double_blocks.i.img_attn.qkv`` fused q/k/v, ``single_blocks.i.linear1`` = [q; k; v; MLP])
are Flux.1's (:mod:`loratool.arch.flux` tables); ``img_mod.lin`` / ``txt_mod.lin`` / ``modulation.lin``,
``time_in``, ``vector_in``, ``guidance_in`` and ``final_layer.adaLN_modulation`` do not exist: a Flux.1 LoRA's
modulation keys have no place in Chroma and are reported as such per group when merged. The approximator:
``distilled_guidance_layer.{in_proj, out_proj}``, ``layers.i.in_layer`` / ``out_layer`` (diffusers
``linear_1`` / ``linear_2``), ``norms.i.scale``.
"""

from __future__ import annotations

from loratool.arch import dit, flux, fused

MODULATION = ("img_mod.lin", "txt_mod.lin", "modulation.lin")
QK_NORMS = {
    "double": {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
               "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"},
    "single": {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"},
}
DOUBLE_BLOCK = {k: v for k, v in flux.DOUBLE_BLOCK.items() if k not in MODULATION}
DOUBLE_BLOCK.update({k: (v,) for k, v in QK_NORMS["double"].items()})
SINGLE_BLOCK = {k: v for k, v in flux.SINGLE_BLOCK.items() if k not in MODULATION}
SINGLE_BLOCK.update({k: (v,) for k, v in QK_NORMS["single"].items()})
TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "final_layer.linear": ("proj_out",),
    "distilled_guidance_layer.in_proj": ("distilled_guidance_layer.in_proj",),
    "distilled_guidance_layer.out_proj": ("distilled_guidance_layer.out_proj",),
}
GUIDANCE = "distilled_guidance_layer"
NAMING = fused.FusedNaming(
    what="a Chroma transformer module",
    blocks=(fused.Block("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
            fused.Block("single_blocks", "single_transformer_blocks", SINGLE_BLOCK),
            fused.Block(f"{GUIDANCE}.layers", f"{GUIDANCE}.layers", {"in_layer": ("linear_1",),
                                                                    "out_layer": ("linear_2",)}),
            fused.Block(f"{GUIDANCE}.norms", f"{GUIDANCE}.norms", {"": ("",)})),
    top=TOP,
    swapped=lambda native, module: False,
    split_rows=flux.split_rows,
    part_widths=flux.part_widths,
)
PARAMS = dit.scale_params("a Chroma transformer parameter", (
    ("double_blocks", "transformer_blocks", QK_NORMS["double"]),
    ("single_blocks", "single_transformer_blocks", QK_NORMS["single"]),
    (f"{GUIDANCE}.norms", f"{GUIDANCE}.norms", {"": ""})))

SPEC = dit.DitFamily(
    name="chroma",
    title="Chroma",
    table="chroma_modules",
    diffusers_class="ChromaTransformer2DModel",
    pipelines=("Chroma",),
    merges_into=("flux", "clip", "t5"),
    naming=NAMING,
    params=PARAMS,
    metadata=("chroma",),
    markers=(r"distilled_guidance_layer\.",),
    needs_marker=True,  # the block names are Flux.1's: without metadata or the approximator, it is Flux.1
    single_file_marks=("distilled_guidance_layer.in_proj.weight",),
    mismatches=(
        dit.Mismatch(r"\.(norm1|norm1_context|norm)\.linear$", "per-block modulation (img_mod / txt_mod / modulation)",
                     "Chroma has no per-block modulation: its distilled_guidance_layer computes it (a Flux.1 LoRA's "
                     "modulation keys do not apply)"),
        dit.Mismatch(r"^(time_text_embed\.|norm_out\.linear$)", "timestep / guidance / pooled-text embedders and the "
                     "final modulation (time_in, vector_in, guidance_in, final_layer.adaLN_modulation)",
                     "Chroma replaces them with the distilled_guidance_layer (a Flux.1 LoRA's keys do not apply)"),
    ),
)
FAMILY = SPEC.family
