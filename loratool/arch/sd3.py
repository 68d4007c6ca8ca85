"""Stable Diffusion 3 / 3.5: the MMDiT naming (SAI single files, kohya SD3 LoRAs from sd-scripts'
``networks/lora_sd3.py``) and its map to diffusers' ``SD3Transformer2DModel``.

kohya names SD3 LoRAs ``lora_unet_`` + the MMDiT module path (``lora_unet_joint_blocks_0_x_block_attn_qkv``,
``lora_unet_context_embedder``, ``lora_unet_final_layer_adaLN_modulation_1``); text encoders are
``lora_te1`` (CLIP-L), ``lora_te2`` (CLIP-G), ``lora_te3`` (T5-XXL), in HF naming.

MMDiT fuses what diffusers keeps apart, like Flux (:mod:`loratool.arch.fused` does the maths for both):

* ``joint_blocks.i.x_block.attn.qkv`` = rows [to_q; to_k; to_v], ``x_block.attn2.qkv`` (SD3.5 medium's
  dual attention) = [attn2.to_q; to_k; to_v], ``context_block.attn.qkv`` = [add_q_proj; add_k_proj; add_v_proj];
  a LoRA on them splits by rows of ``up`` with ``down`` shared (``split_qkv`` files: block-diagonal
  ``up`` splits into rank-r parts), and fuses back with ``down = cat(down_g)``, ``up = blockdiag(up_g)``.
* ``final_layer.adaLN_modulation.1`` stores [shift; scale] where diffusers' ``norm_out.linear`` holds
  [scale; shift], and so does the last block's ``context_block.adaLN_modulation.1`` (a "pre-only"
  context block: 2·D output rows instead of 6·D), diffusers' ``norm1_context.linear`` there. Which
  block is last depends on the model's depth, so the swap is decided by shape: output rows = 2 × input.
"""

from __future__ import annotations

import re
from functools import cache

from loratool.adapter import LoraModule
from loratool.arch import Family, fused, load_table
from loratool.arch.evidence import DECLARED, UNIQUE, Evidence, Width

# native module inside ``joint_blocks.{i}.`` -> diffusers module(s) inside ``transformer_blocks.{i}.``
BLOCK = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
# Modules the last ("pre-only") context block lacks.
PRE_ONLY_ABSENT = ("context_block.attn.proj", "context_block.mlp.fc1", "context_block.mlp.fc2")
DUAL_ATTENTION = ("x_block.attn2.qkv", "x_block.attn2.proj")
TOP = {
    "x_embedder.proj": ("pos_embed.proj",),
    "context_embedder": ("context_embedder",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
# RMSNorm scales (SD3.5 qk_norm) and the positional table: parameters, not LoRA targets.
BLOCK_NORMS = {
    "x_block.attn.ln_q.weight": "attn.norm_q.weight",
    "x_block.attn.ln_k.weight": "attn.norm_k.weight",
    "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
    "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
    "x_block.attn2.ln_q.weight": "attn2.norm_q.weight",
    "x_block.attn2.ln_k.weight": "attn2.norm_k.weight",
}
TOP_PARAMS = {"pos_embed": "pos_embed.pos_embed"}
ALWAYS_SWAPPED = "final_layer.adaLN_modulation.1"
CONTEXT_MOD = "context_block.adaLN_modulation.1"
# Single-file text encoders: HF names behind these prefixes.
TEXT_ENCODER_PREFIXES = {
    "text_encoders.clip_l.transformer.": "text_encoder",
    "text_encoders.clip_g.transformer.": "text_encoder_2",
    "text_encoders.t5xxl.transformer.": "text_encoder_3",
}


def module_table(num_layers: int, dual_attention_layers=(), pre_only_last: bool = True) -> dict[str, tuple[str, ...]]:
    """{native module path: diffusers module paths} for an MMDiT of this depth.

    ``pre_only_last=False`` keeps the last block's context attention / MLP names (a vocabulary that
    serves every depth, for kohya name restoration)."""
    out: dict[str, tuple[str, ...]] = {}
    for i in range(num_layers):
        last = pre_only_last and i == num_layers - 1
        for k, v in BLOCK.items():
            if (last and k in PRE_ONLY_ABSENT) or (k in DUAL_ATTENTION and i not in dual_attention_layers):
                continue
            out[f"joint_blocks.{i}.{k}"] = tuple(f"transformer_blocks.{i}.{x}" for x in v)
    out.update(TOP)
    return out


def norm_table(num_layers: int, dual_attention_layers=()) -> dict[str, str]:
    """{native parameter: diffusers parameter} for the qk-norm scales and the positional table."""
    out = dict(TOP_PARAMS)
    for i in range(num_layers):
        for k, v in BLOCK_NORMS.items():
            if k.startswith("x_block.attn2.") and i not in dual_attention_layers:
                continue
            out[f"joint_blocks.{i}.{k}"] = f"transformer_blocks.{i}.{v}"
    return out


def is_swapped(native: str, out_rows: int, in_features: int) -> bool:
    """Row halves stored [shift; scale] against diffusers' [scale; shift] (see the module doc)."""
    if native == ALWAYS_SWAPPED:
        return True
    return native.endswith(CONTEXT_MOD) and out_rows == 2 * in_features


NAMING = fused.FusedNaming(
    what="an SD3 transformer module",
    blocks=(fused.Block("joint_blocks", "transformer_blocks", BLOCK),),
    top=TOP,
    swapped=lambda native, module: is_swapped(native, *fused.module_shape(module)),
)


def to_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    """MMDiT transformer paths -> diffusers paths; fused qkv split exactly, swapped halves restored."""
    return fused.to_canonical(modules, NAMING)


def from_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    """diffusers SD3 transformer paths -> MMDiT paths; split q/k/v parts fuse exactly."""
    return fused.from_canonical(modules, NAMING)


# --- shipped vocabulary (scripts/gen_arch_tables.py, published SD3 / SD3.5 configs) ---


def native_paths(component: str) -> set[str]:
    data = load_table("sd3_modules")
    if component == "transformer":
        depth = max(v["num_layers"] for v in data["variants"].values())
        return set(module_table(depth, range(depth), pre_only_last=False))
    if component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        return set(data[component])
    return set()


def detect(keys: list[str], metadata: dict[str, str]) -> int:
    version = (metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")).lower()
    if "sd3" in version or "stable-diffusion-3" in version:
        return 100
    if any(k.startswith("lora_unet_joint_blocks_") for k in keys):
        return 90
    return 0


# --- family evidence from canonical (diffusers) names and shapes ---

SD3_NAMES = re.compile(r"stable-diffusion-3|\bsd3")
# diffusers SD3Transformer2DModel modules Flux has not: the patch-embedding conv, SD3.5 medium's second attention
SD3_ONLY = re.compile(r"^pos_embed\.proj$|^transformer_blocks\.\d+\.attn2\.")
CONTEXT_NORM = re.compile(r"^transformer_blocks\.\d+\.norm1_context\.linear$")  # 2·D rows only in the pre-only block
CLIP = re.compile(r"^text_model\.encoder\.layers\.\d+\.")
# hidden width (num_attention_heads × attention_head_dim) of the published transformers' config.json
PUBLISHED_WIDTHS = {1536: "SD3 medium / SD3.5 medium, 24 × 64", 2432: "SD3.5 large, 38 × 64"}
POOLED_WIDTH = 2048  # pooled_projection_dim: CLIP-L + CLIP-G


@cache
def canonical_templates() -> frozenset[str]:
    """diffusers module paths of SD3Transformer2DModel (SD3.5 dual attention and pre-only last block
    included), block indices as ``#``."""
    from loratool.formats.kohya_names import template

    tables = (module_table(2, (0,), pre_only_last=True), module_table(2, (0,), pre_only_last=False))
    return frozenset(template(p) for table in tables for parts in table.values() for p in parts)


def evidence(ev: Evidence) -> tuple[int, str]:
    """SD3 / SD3.5: declared, SD3-only modules (or the pre-only context modulation), a third text encoder,
    the published widths, a CLIP-G ``text_encoder_2`` beside a transformer, or MMDiT-style blocks."""
    if ev.declares(SD3_NAMES):
        return DECLARED, "declared in its metadata"
    comps = ev.components
    if not comps or comps & {"unet", "model"} or not ev.only("transformer", canonical_templates()):
        return 0, ""
    if ev.any_path("transformer", SD3_ONLY):
        return UNIQUE, "pos_embed.proj / attn2 modules"
    if any(s[0] == 2 * s[1] for s in ev.shapes("transformer", CONTEXT_NORM) if len(s) == 2):
        return UNIQUE, "a pre-only context modulation (norm1_context.linear with 2·D rows)"
    if "text_encoder_3" in comps:
        return UNIQUE, "a third text encoder (T5)"
    return fused.dit_evidence(ev, PUBLISHED_WIDTHS, POOLED_WIDTH, CLIP, "CLIP")


# Widths an SD3 LoRA fixes (released: hidden 1536 medium / 2432 3.5 large, context 4096, pooled 2048).
SD3_WIDTHS = (
    Width("hidden", "transformer", r"\.attn\.to_q$", 1, "transformer width"),
    Width("context", "transformer", r"^context_embedder$", 1, "text context width (T5)"),
    Width("pooled", "transformer", r"^time_text_embed\.text_embedder\.linear_1$", 1, "pooled text width"),
    Width("text_encoder", "text_encoder", r"\.self_attn\.q_proj$", 1, "CLIP-L text encoder width"),
    Width("text_encoder_2", "text_encoder_2", r"\.self_attn\.q_proj$", 1, "CLIP-G text encoder width"),
)

FAMILY = Family(
    name="sd3",
    kohya_prefixes={"lora_unet": "transformer", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
                    "lora_te3": "text_encoder_3"},
    native_paths=native_paths,
    to_canonical=to_canonical,
    from_canonical=from_canonical,
    detect=detect,
    evidence=evidence,
    merges_into=("clip", "t5"),
    widths=SD3_WIDTHS,
)
