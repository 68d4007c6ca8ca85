"""Lumina-Image 2.0 (Alpha-VLLM/Lumina-Image-2.0, NextDiT): the original naming (ComfyUI; sd-scripts' Lumina
LoRAs ``lora_unet_layers_0_attention_qkv``; ``diffusion_model.`` files) and its map to diffusers'
``Lumina2Transformer2DModel`` (diffusers' ``convert_lumina2_to_diffusers`` and
``_convert_non_diffusers_lumina2_lora_to_diffusers`` spell it).

* ``attention.qkv`` is grouped-query attention: rows [to_q (D); to_k (K); to_v (K)] with D = in-features and
  K = (rows − D) / 2 — not thirds (the released 2304 + 768 + 768; diffusers' converters hard-code those widths,
  loratool reads them off the shapes). Split exactly (:mod:`loratool.arch.fused`);
* ``attention.out`` -> ``attn.to_out.0``, ``feed_forward.w1 / w2 / w3`` -> ``feed_forward.linear_1 / 2 / 3``,
  ``adaLN_modulation.1`` -> ``norm1.linear``, ``attention_norm1`` -> ``norm1.norm`` (``norm1`` in the context
  refiner, which has no modulation), ``attention_norm2`` -> ``norm2``;
* ``cap_embedder`` / ``t_embedder`` live in diffusers' ``time_caption_embed``; ``final_layer.adaLN_modulation.1``
  / ``final_layer.linear`` are ``norm_out.linear_1`` / ``linear_2``.
"""

from __future__ import annotations

from loratool.arch import dit, fused, load_table

QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
BLOCK = {
    "attention.qkv": QKV,
    "attention.out": ("attn.to_out.0",),
    "attention.q_norm": ("attn.norm_q",),
    "attention.k_norm": ("attn.norm_k",),
    **{f"feed_forward.w{i}": (f"feed_forward.linear_{i}",) for i in (1, 2, 3)},
    "attention_norm1": ("norm1.norm",),
    "attention_norm2": ("norm2",),
    "ffn_norm1": ("ffn_norm1",),
    "ffn_norm2": ("ffn_norm2",),
    "adaLN_modulation.1": ("norm1.linear",),
}
CONTEXT_BLOCK = {**{k: v for k, v in BLOCK.items() if k != "adaLN_modulation.1"}, "attention_norm1": ("norm1",)}
TOP = {
    "x_embedder": ("x_embedder",),
    "cap_embedder.0": ("time_caption_embed.caption_embedder.0",),
    "cap_embedder.1": ("time_caption_embed.caption_embedder.1",),
    "t_embedder.mlp.0": ("time_caption_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_caption_embed.timestep_embedder.linear_2",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear_1",),
    "final_layer.linear": ("norm_out.linear_2",),
}


def split_rows(native: str, out_rows: int, in_features: int) -> list[tuple[int, int]]:
    """GQA ``qkv``: q has ``in_features`` rows, k and v share the rest equally."""
    if native.endswith("attention.qkv"):
        from loratool.errors import MatchError

        kv = out_rows - in_features
        if kv <= 0 or kv % 2:
            raise MatchError(f"{native}: {out_rows} rows cannot hold q ({in_features}) and two equal k, v")
        k = kv // 2
        return [(0, in_features), (in_features, in_features + k), (in_features + k, out_rows)]
    return [(0, out_rows)]


def part_widths(native: str, in_features: int, parts: int) -> list[int]:
    """Rows of q, k, v when fusing a LoRA that lacks some of them (the absent ones become zero rows): k and v
    are ``in_features · kv_heads / heads`` of the released model (2304 -> 768)."""
    if parts != 3:
        return [in_features] * parts
    cfg = next(iter(load_table("lumina2_modules")["variants"].values()))
    kv = in_features * cfg["num_kv_heads"] // cfg["num_attention_heads"]
    return [in_features, kv, kv]


NAMING = fused.FusedNaming(
    what="a Lumina 2 transformer module",
    blocks=(fused.Block("layers", "layers", BLOCK), fused.Block("noise_refiner", "noise_refiner", BLOCK),
            fused.Block("context_refiner", "context_refiner", CONTEXT_BLOCK)),
    top=TOP,
    swapped=lambda native, module: False,
    split_rows=split_rows,
    part_widths=part_widths,
)

SPEC = dit.DitFamily(
    name="lumina2",
    title="Lumina 2",
    table="lumina2_modules",
    diffusers_class="Lumina2Transformer2DModel",
    pipelines=("Lumina2",),
    naming=NAMING,
    metadata=("lumina-2", "lumina2", "lumina_2", "lumina-image-2"),
    markers=(r"^(layers|noise_refiner)\.\d+\.adaLN_modulation\.1$", r"\.attn\.to_[qkv]$", r"feed_forward\.linear_",
             r"^time_caption_embed\.", r"^norm_out\.linear_"),
    single_file_marks=("layers.0.adaLN_modulation.1.weight", "layers.0.attention.qkv.weight"),
    single_file_not=("x_pad_token",),
)
FAMILY = SPEC.family
