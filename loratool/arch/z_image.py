"""Z-Image (Tongyi-MAI/Z-Image, Turbo / Base): the original naming (ComfyUI's Lumina-derived NextDiT; LoRAs as
``diffusion_model.layers.0.attention.qkv``) and its map to diffusers' ``ZImageTransformer2DModel`` (diffusers'
``convert_z_image_transformer_checkpoint_to_diffusers`` spells it; musubi-tuner's Z-Image model and its LoRAs,
``lora_unet_layers_0_attention_to_q``, use the diffusers names: musubi's ``convert_z_image_lora_to_comfy.py``
fuses to_q / to_k / to_v into ``qkv`` and renames ``attention_to_out_0`` to ``attention_out``).

* ``attention.qkv`` = rows [to_q; to_k; to_v] (equal thirds: Z-Image has as many KV heads as query heads),
  split exactly (:mod:`loratool.arch.fused`); ``attention.out`` is ``attention.to_out.0``, ``q_norm`` /
  ``k_norm`` are ``norm_q`` / ``norm_k``;
* ``x_embedder`` / ``final_layer`` are diffusers' ``all_x_embedder.2-1`` / ``all_final_layer.2-1`` (patch 2,
  frame patch 1: the released models');
* everything else keeps its name, underscores included (``adaLN_modulation``, ``noise_refiner``,
  ``context_refiner``, ``t_embedder``, ``cap_embedder``, ``feed_forward``): kohya heads restore them from the table.
"""

from __future__ import annotations

from loratool.arch import dit, fused

PATCH = "2-1"
QKV = ("attention.to_q", "attention.to_k", "attention.to_v")
BLOCK = {
    "attention.qkv": QKV,
    "attention.out": ("attention.to_out.0",),
    "attention.q_norm": ("attention.norm_q",),
    "attention.k_norm": ("attention.norm_k",),
    **{f"feed_forward.w{i}": (f"feed_forward.w{i}",) for i in (1, 2, 3)},
    **{n: (n,) for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "adaLN_modulation.0")},
}
TOP = {
    "x_embedder": (f"all_x_embedder.{PATCH}",),
    "final_layer.linear": (f"all_final_layer.{PATCH}.linear",),
    "final_layer.adaLN_modulation.1": (f"all_final_layer.{PATCH}.adaLN_modulation.1",),
    **{n: (n,) for n in ("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.0", "cap_embedder.1")},
}
NAMING = fused.FusedNaming(
    what="a Z-Image transformer module",
    blocks=tuple(fused.Block(b, b, BLOCK) for b in ("layers", "noise_refiner", "context_refiner")),
    top=TOP,
    swapped=lambda native, module: False,
)
PARAMS = fused.FusedNaming(what="a Z-Image transformer parameter", blocks=(),
                           top={"x_pad_token": ("x_pad_token",), "cap_pad_token": ("cap_pad_token",)},
                           swapped=lambda native, module: False)


def shapes_fit(shapes) -> bool:
    """Z-Image against Lumina 2 (same native names): Z-Image's qkv is three equal thirds (as many KV heads as
    query heads), Lumina 2's is grouped-query (fewer KV rows)."""
    return dit.rows_fit(shapes, {("attention.qkv",): 3})


SPEC = dit.DitFamily(
    name="z_image",
    title="Z-Image",
    table="z_image_modules",
    diffusers_class="ZImageTransformer2DModel",
    pipelines=("ZImage",),
    naming=NAMING,
    params=PARAMS,
    metadata=("z-image", "z_image", "zimage"),
    markers=(r"\.adaLN_modulation\.0$", r"\.attention\.(to_[qkv]|to_out\.0|norm_[qk])$",
             r"^all_(x_embedder|final_layer)"),
    single_file_marks=("x_pad_token", "layers.0.attention.qkv.weight"),
    shapes_fit=shapes_fit,
)
FAMILY = SPEC.family
