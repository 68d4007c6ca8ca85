"""Krea 2 (krea-ai/krea-2): the original naming (musubi-tuner ``krea2/krea2_mmdit.py``, ComfyUI; LoRAs as
``diffusion_model.blocks.0.attn.wq`` or musubi-tuner's ``lora_unet_blocks_0_attn_wq``) and its map to diffusers'
``Krea2Transformer2DModel`` (diffusers' ``_convert_non_diffusers_krea2_lora_to_diffusers`` and
``convert_krea2_transformer_checkpoint_to_diffusers`` spell it). All renames:

``blocks.i.attn.{wq, wk, wv, wo, gate}`` -> ``transformer_blocks.i.attn.{to_q, to_k, to_v, to_out.0, to_gate}``;
``mlp.{gate, up, down}`` -> ``ff.{gate, up, down}``; ``prenorm`` / ``postnorm`` -> ``norm1`` / ``norm2``; the text
fusion blocks (``txtfusion.layerwise_blocks`` / ``refiner_blocks``) likewise under ``text_fusion``; ``first`` ->
``img_in``, ``tmlp.0`` / ``tmlp.2`` -> ``time_embed.linear_1`` / ``_2``, ``tproj.1`` -> ``time_mod_proj``,
``txtmlp.{0, 1, 3}`` -> ``txt_in.{norm, linear_1, linear_2}``, ``last.{linear, norm}`` -> ``final_layer.*``.
RMSNorm scales are stored as ``.scale``. The per-block modulation tables (``mod.lin``) are stored flat where diffusers
holds 6 × D: the names map, the tensors are no LoRA target (merge copies them, extract reports them).
"""

from __future__ import annotations

from loratool.arch import dit, fused

BLOCK = {
    "attn.wq": ("attn.to_q",), "attn.wk": ("attn.to_k",), "attn.wv": ("attn.to_v",), "attn.wo": ("attn.to_out.0",),
    "attn.gate": ("attn.to_gate",), "attn.qknorm.qnorm": ("attn.norm_q",), "attn.qknorm.knorm": ("attn.norm_k",),
    "mlp.gate": ("ff.gate",), "mlp.up": ("ff.up",), "mlp.down": ("ff.down",),
    "prenorm": ("norm1",), "postnorm": ("norm2",),
}
TOP = {
    "first": ("img_in",), "tmlp.0": ("time_embed.linear_1",), "tmlp.2": ("time_embed.linear_2",),
    "tproj.1": ("time_mod_proj",), "txtmlp.0": ("txt_in.norm",), "txtmlp.1": ("txt_in.linear_1",),
    "txtmlp.3": ("txt_in.linear_2",), "txtfusion.projector": ("text_fusion.projector",),
    "last.linear": ("final_layer.linear",), "last.norm": ("final_layer.norm",),
}
BLOCKS = (("blocks", "transformer_blocks"), ("txtfusion.layerwise_blocks", "text_fusion.layerwise_blocks"),
          ("txtfusion.refiner_blocks", "text_fusion.refiner_blocks"))
NORMS = ("prenorm", "postnorm", "attn.qknorm.qnorm", "attn.qknorm.knorm")
NAMING = fused.FusedNaming(what="a Krea 2 transformer module",
                           blocks=tuple(fused.Block(n, d, BLOCK) for n, d in BLOCKS), top=TOP,
                           swapped=lambda native, module: False)
PARAMS = fused.FusedNaming(
    what="a Krea 2 transformer parameter",
    blocks=tuple(fused.Block(n, d, {**{f"{k}.scale": (f"{BLOCK[k][0]}.weight",) for k in NORMS},
                                    "mod.lin": ("scale_shift_table",)}) for n, d in BLOCKS),
    top={"txtmlp.0.scale": ("txt_in.norm.weight",), "last.norm.scale": ("final_layer.norm.weight",),
         "last.modulation.lin": ("final_layer.scale_shift_table",)},
    swapped=lambda native, module: False,
)

SPEC = dit.DitFamily(
    name="krea2",
    title="Krea 2",
    table="krea2_modules",
    diffusers_class="Krea2Transformer2DModel",
    pipelines=("Krea2",),
    naming=NAMING,
    params=PARAMS,
    metadata=("krea-2", "krea2"),
    markers=(r"\.attn\.w[qkvo]$", r"\.attn\.to_gate$", r"^(txtfusion|text_fusion)\.", r"^(first|tmlp|tproj|txtmlp)"),
    single_file_marks=("txtfusion.projector.weight",),
)
FAMILY = SPEC.family
