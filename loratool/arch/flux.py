"""Flux.1: the BFL naming (kohya Flux LoRAs, BFL / ComfyUI single files) and its map to
diffusers' ``FluxTransformer2DModel``.

BFL fuses projections that diffusers keeps apart:

* ``double_blocks.i.img_attn.qkv`` = rows [to_q; to_k; to_v] (D rows each),
  ``double_blocks.i.txt_attn.qkv`` = [add_q_proj; add_k_proj; add_v_proj];
* ``single_blocks.i.linear1`` = [to_q; to_k; to_v; proj_mlp] (D, D, D, M rows, D = in-features);
* ``final_layer.adaLN_modulation.1`` = [shift; scale] where diffusers' ``norm_out.linear`` is
  [scale; shift] (row halves swapped).

A LoRA on a fused weight, ΔW = s · up @ down, splits exactly into one LoRA per part:
ΔW_g = s · up[rows_g] @ down (shared down). Files trained with ``split_qkv`` store
down = [down_q; down_k; down_v] (rank G·r') and a block-diagonal up; those split into
(down_g, up[rows_g, cols_g]) with rank r' and alpha' = alpha · r'/r (same scale). The reverse
fuses with down = cat(down_g) and up = blockdiag(up_g) (scales folded so one alpha serves), or
with a shared down when every part shares it — never a lossy refit. The maths and the
to/from-canonical driver live in :mod:`loratool.arch.fused` (shared with SD3); this module holds
the BFL names (:data:`NAMING`).
"""

from __future__ import annotations

import re
from functools import cache

from loratool.adapter import LoraModule
from loratool.arch import Family, fused, load_table
from loratool.arch.evidence import DECLARED, UNIQUE, Evidence, Mismatch, Width
from loratool.arch.fused import swap_halves as swap_halves  # BFL shift/scale <-> diffusers scale/shift
from loratool.errors import MatchError

# native module (``{i}`` = block index) -> diffusers module(s); several = row-fused, in row order.
DOUBLE_BLOCK = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
SINGLE_BLOCK = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
# RMSNorm scales: parameters, not LoRA targets (checkpoint maps only).
DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
# Native modules whose row halves are stored swapped relative to diffusers.
SWAPPED = {"final_layer.adaLN_modulation.1"}
MLP_RATIO = 4  # Flux.1: proj_mlp has 4·D rows


def module_table(num_double: int, num_single: int) -> dict[str, tuple[str, ...]]:
    """{native module path: diffusers module paths} for a Flux model of this depth."""
    out: dict[str, tuple[str, ...]] = {}
    for i in range(num_double):
        for k, v in DOUBLE_BLOCK.items():
            out[f"double_blocks.{i}.{k}"] = tuple(f"transformer_blocks.{i}.{x}" for x in v)
    for i in range(num_single):
        for k, v in SINGLE_BLOCK.items():
            out[f"single_blocks.{i}.{k}"] = tuple(f"single_transformer_blocks.{i}.{x}" for x in v)
    out.update(TOP)
    return out


def norm_table(num_double: int, num_single: int) -> dict[str, str]:
    """{native RMSNorm scale parameter: diffusers parameter}."""
    out = {}
    for i in range(num_double):
        out.update({f"double_blocks.{i}.{k}": f"transformer_blocks.{i}.{v}" for k, v in DOUBLE_NORMS.items()})
    for i in range(num_single):
        out.update({f"single_blocks.{i}.{k}": f"single_transformer_blocks.{i}.{v}" for k, v in SINGLE_NORMS.items()})
    return out


def split_rows(native: str, out_rows: int, in_features: int) -> list[tuple[int, int]]:
    """Row ranges of each diffusers part inside the fused native weight."""
    if native.endswith(".linear1"):
        d = in_features
        if out_rows <= 3 * d:
            raise MatchError(f"{native}: {out_rows} rows cannot hold q, k, v of width {d} and an MLP")
        return [(0, d), (d, 2 * d), (2 * d, 3 * d), (3 * d, out_rows)]
    return fused.qkv_rows(native, out_rows, in_features)


def part_widths(native: str, in_features: int, parts: int) -> list[int]:
    """Nominal rows of each part (D = in-features): D for q, k, v, MLP_RATIO·D for ``linear1``'s MLP."""
    d = in_features
    return [d, d, d, MLP_RATIO * d] if native.endswith(".linear1") else [d] * parts


NAMING = fused.FusedNaming(
    what="a Flux transformer module",
    blocks=(fused.Block("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
            fused.Block("single_blocks", "single_transformer_blocks", SINGLE_BLOCK)),
    top=TOP,
    swapped=lambda native, module: native in SWAPPED,
    split_rows=split_rows,
    part_widths=part_widths,
)


def to_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    """BFL transformer paths -> diffusers paths; fused modules split exactly (see module doc)."""
    return fused.to_canonical(modules, NAMING)


def from_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    """diffusers transformer paths -> BFL paths; split parts fuse exactly (see module doc)."""
    return fused.from_canonical(modules, NAMING)


# --- shipped vocabularies (scripts/gen_arch_tables.py, Flux.1-dev config) ---


def native_paths(component: str) -> set[str]:
    data = load_table("flux_modules")
    if component == "transformer":
        return set(module_table(data["num_layers"], data["num_single_layers"]))
    if component in ("text_encoder", "text_encoder_2"):
        return set(data[component])
    return set()


def detect(keys: list[str], metadata: dict[str, str]) -> int:
    version = (metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")).lower()
    if "flux" in version:
        return 100
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys):
        return 90
    return 0


# --- family evidence from canonical (diffusers) names and shapes ---

FLUX_NAMES = re.compile(r"flux(?![.\-_ ]?[2-9])")  # FLUX.1-dev, flux1; not FLUX.2
# diffusers FluxTransformer2DModel modules SD3 has not
FLUX_ONLY = re.compile(r"^single_transformer_blocks\.|^x_embedder$|^time_text_embed\.guidance_embedder\.")
T5 = re.compile(r"^encoder\.block\.\d+\.")
PUBLISHED_WIDTHS = {3072: "FLUX.1-dev / schnell, 24 × 128"}  # num_attention_heads × attention_head_dim
POOLED_WIDTH = 768  # pooled_projection_dim: CLIP-L


@cache
def canonical_templates() -> frozenset[str]:
    """diffusers module paths of FluxTransformer2DModel, block indices as ``#``."""
    from loratool.formats.kohya_names import template

    return frozenset(template(p) for parts in module_table(1, 1).values() for p in parts)


def evidence(ev: Evidence) -> tuple[int, str]:
    """Flux.1: declared, Flux-only modules, the published widths, a T5 ``text_encoder_2`` beside a
    transformer, or MMDiT-style double-stream blocks."""
    if ev.declares(FLUX_NAMES):
        return DECLARED, "declared in its metadata"
    comps = ev.components
    if not comps or comps & {"unet", "model", "text_encoder_3"} or not ev.only("transformer", canonical_templates()):
        return 0, ""
    if ev.any_path("transformer", FLUX_ONLY):
        return UNIQUE, "single_transformer_blocks / x_embedder / guidance_embedder modules"
    return fused.dit_evidence(ev, PUBLISHED_WIDTHS, POOLED_WIDTH, T5, "T5")


# Widths a Flux.1 LoRA fixes (released: hidden 3072, MLP 12288, T5 context 4096, pooled CLIP-L 768).
FLUX_WIDTHS = (
    Width("hidden", "transformer", r"(^|\.)attn\.to_q$", 1, "transformer width"),
    Width("mlp", "transformer", r"(\.ff\.net\.0\.proj|\.proj_mlp)$", 0, "MLP width"),
    Width("context", "transformer", r"^context_embedder$", 1, "text context width (T5)"),
    Width("pooled", "transformer", r"^time_text_embed\.text_embedder\.linear_1$", 1, "pooled text width (CLIP-L)"),
    Width("text_encoder", "text_encoder", r"\.self_attn\.q_proj$", 1, "CLIP text encoder width"),
)
GUIDANCE = re.compile(r"^time_text_embed\.guidance_embedder\.")
SCHNELL_NAMES = re.compile(r"schnell")


def variant(ev: Evidence) -> str | None:
    """FLUX.1-dev when the adapter trains the guidance embedder (``guidance_in``: schnell has none), or what the
    metadata declares; None when nothing tells dev from schnell."""
    if ev.any_path("transformer", GUIDANCE):
        return "FLUX.1-dev (guidance embedder)"
    if ev.declares(SCHNELL_NAMES):
        return "FLUX.1-schnell (declared)"
    if ev.declares(re.compile(r"flux[.\-_ ]?1[.\-_ ]?dev|flux1-dev")):
        return "FLUX.1-dev (declared)"
    return None


# Modules a Flux.1 base may lack: FLUX.1-schnell has no guidance embedder (diffusers' FluxTransformer2DModel
# guidance_embeds=False). Chroma's (no per-block modulation, ...) are its own family's: loratool/arch/chroma.py.
MISMATCHES = (
    Mismatch(r"^time_text_embed\.guidance_embedder\.", "guidance embedder (guidance_in)",
             "the base has no guidance embedder (FLUX.1-schnell): a FLUX.1-dev LoRA's guidance_in keys do not apply"),
)

def shapes_fit(shapes) -> bool:
    """Flux.1 against FLUX.2 (same kohya / BFL names): linear1 holds [q; k; v; mlp] = 3·D + 4·D rows
    (mlp_ratio 4; FLUX.2: 3·D + 2·3·D, loratool.arch.flux2.shapes_fit)."""
    from loratool.arch.dit import rows_fit

    return rows_fit(shapes, {("linear1",): 7})


FAMILY = Family(
    name="flux",
    kohya_prefixes={"lora_unet": "transformer", "lora_te1": "text_encoder", "lora_te3": "text_encoder_2"},
    native_paths=native_paths,
    to_canonical=to_canonical,
    from_canonical=from_canonical,
    detect=detect,
    evidence=evidence,
    merges_into=("clip", "t5"),
    variant=variant,
    widths=FLUX_WIDTHS,
    mismatches=MISMATCHES,
    shapes_fit=shapes_fit,
)
