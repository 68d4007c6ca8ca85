"""Anima (circlestone-labs/Anima: a Cosmos-Predict2 DiT with an LLM adapter): the original Cosmos naming
(ComfyUI ``comfy/ldm/anima``, ``comfy/ldm/cosmos/predict2.py``; LoRAs as ``diffusion_model.blocks.0.self_attn.q_proj``)
and its map to diffusers' ``CosmosTransformer3DModel`` (diffusers' ``_convert_non_diffusers_anima_lora_to_diffusers``
spells it). Read, ``info`` and convert; the naming covers what that converter maps (attention, MLP, adaLN-LoRA
modulation, embedders), not the norms.

``llm_adapter.*`` modules are ComfyUI's ``LLMAdapter`` inside the diffusion model (``comfy/ldm/anima/model.py``;
ComfyUI loads ``diffusion_model.llm_adapter.…`` and ``lora_unet_llm_adapter_…`` keys by its generic map,
``comfy/lora.py`` ``model_lora_keys_unet``). diffusers holds them in another model, ``AnimaTextConditioner``, the
pipeline's ``text_conditioner`` component, under the same names (``_convert_non_diffusers_anima_lora_to_diffusers``
maps ``llm_adapter.X`` to ``text_conditioner.X``): a :class:`~loratool.arch.dit.SubModel` with its own table.
"""

from __future__ import annotations

from loratool.arch import dit, fused

BLOCK = {
    **{f"{a}.{p}_proj": (f"{d}.to_{p}",) for a, d in (("self_attn", "attn1"), ("cross_attn", "attn2")) for p in "qkv"},
    "self_attn.output_proj": ("attn1.to_out.0",),
    "cross_attn.output_proj": ("attn2.to_out.0",),
    "mlp.layer1": ("ff.net.0.proj",),
    "mlp.layer2": ("ff.net.2",),
    **{f"adaln_modulation_{m}.{i}": (f"norm{n}.linear_{i}",)
       for m, n in (("self_attn", 1), ("cross_attn", 2), ("mlp", 3)) for i in (1, 2)},
}
TOP = {
    "final_layer.adaln_modulation.1": ("norm_out.linear_1",),
    "final_layer.adaln_modulation.2": ("norm_out.linear_2",),
    "final_layer.linear": ("proj_out",),
    "t_embedder.1.linear_1": ("time_embed.t_embedder.linear_1",),
    "t_embedder.1.linear_2": ("time_embed.t_embedder.linear_2",),
    "t_embedding_norm": ("time_embed.norm",),
    "x_embedder.proj.1": ("patch_embed.proj",),
}
NAMING = fused.FusedNaming(what="an Anima transformer module",
                           blocks=(fused.Block("blocks", "transformer_blocks", BLOCK),), top=TOP,
                           swapped=lambda native, module: False)

SPEC = dit.DitFamily(
    name="anima",
    title="Anima",
    table="anima_modules",
    diffusers_class="CosmosTransformer3DModel",
    pipelines=("Anima",),  # diffusers' AnimaModularPipeline (modular_model_index.json)
    naming=NAMING,
    metadata=("anima",),
    markers=(r"\.(self_attn|cross_attn)\.(q|k|v|output)_proj$", r"adaln_modulation_", r"\.mlp\.layer[12]$",
             r"^llm_adapter\."),
    partial=True,
    submodels=(dit.SubModel(native_prefix="llm_adapter", component="text_conditioner",
                            table="anima_text_conditioner_modules", diffusers_class="AnimaTextConditioner"),),
)
FAMILY = SPEC.family
