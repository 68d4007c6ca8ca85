"""HunyuanVideo (T2V, I2V, FramePack): the original Tencent naming (Tencent/HunyuanVideo ``hyvideo/modules``,
musubi-tuner ``hunyuan_model/models.py``; diffusion-pipe writes it behind ``transformer.``) and its map to
diffusers' ``HunyuanVideoTransformer3DModel`` (diffusers' ``convert_hunyuan_video_transformer_to_diffusers`` and
``_convert_hunyuan_video_lora_to_diffusers`` spell the same map). ComfyUI builds the model from Flux's layers and
spells the same modules Flux-style (``img_attn.qkv``, ``img_mod.lin``, ``img_mlp.0``, ``modulation.lin``,
``time_in.in_layer``; ComfyUI's ``comfy/lora.py`` maps diffusion-pipe's Tencent keys onto them): read as a second
spelling, files in it included.

Fused weights (split exactly, :mod:`loratool.arch.fused`):

* ``double_blocks.i.img_attn_qkv`` = [to_q; to_k; to_v], ``txt_attn_qkv`` = [add_q_proj; add_k_proj; add_v_proj];
* ``single_blocks.i.linear1`` = [to_q; to_k; to_v; proj_mlp] (D, D, D, 4·D rows, D = in-features), like Flux.1;
* ``txt_in.individual_token_refiner.blocks.i.self_attn_qkv`` = the token refiner's [to_q; to_k; to_v];
* ``final_layer.adaLN_modulation.1`` stores [shift; scale] against diffusers' ``norm_out.linear`` [scale; shift].

FramePack (lllyasviel/FramePack, diffusers' ``HunyuanVideoFramepackTransformer3DModel``) is HunyuanVideo with
an image projection and clean-latent embedders; it was written in diffusers' names, which musubi-tuner's FramePack
LoRAs keep (``lora_unet_transformer_blocks_0_attn_to_q``): diffusers names are read as they are. musubi-tuner's
``networks/lora_framepack.py`` builds them as ``"lora_unet." + <module path in frame_pack/hunyuan_video_packed.py>``
with ``.`` turned into ``_`` (``networks/lora.py`` ``create_modules``), over the ``HunyuanVideoTransformerBlock`` /
``HunyuanVideoSingleTransformerBlock`` modules (``transformer_blocks_0_attn_to_q``, ``attn_add_q_proj``,
``attn_to_add_out``, ``ff_net_0_proj``, ``single_transformer_blocks_0_proj_mlp``, ...; norms excluded). The kohya
writer keeps a FramePack adapter in those names (:func:`diffusers_named`), a plain HunyuanVideo one gets the
Tencent names.
"""

from __future__ import annotations

from collections.abc import Mapping

from loratool.adapter import LoraModule
from loratool.arch import dit, flux, fused

QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
SINGLE_QKV_MLP = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")

DOUBLE_BLOCK = {
    "img_mod.linear": ("norm1.linear",),
    "img_attn_qkv": QKV,
    "img_attn_q_norm": ("attn.norm_q",),
    "img_attn_k_norm": ("attn.norm_k",),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp.fc1": ("ff.net.0.proj",),
    "img_mlp.fc2": ("ff.net.2",),
    "txt_mod.linear": ("norm1_context.linear",),
    "txt_attn_qkv": ADD_QKV,
    "txt_attn_q_norm": ("attn.norm_added_q",),
    "txt_attn_k_norm": ("attn.norm_added_k",),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",),
    "txt_mlp.fc2": ("ff_context.net.2",),
}
SINGLE_BLOCK = {
    "linear1": SINGLE_QKV_MLP,
    "linear2": ("proj_out",),
    "q_norm": ("attn.norm_q",),
    "k_norm": ("attn.norm_k",),
    "modulation.linear": ("norm.linear",),
}
REFINER = "txt_in.individual_token_refiner.blocks"
REFINER_BLOCK = {
    "norm1": ("norm1",),
    "self_attn_qkv": QKV,
    "self_attn_proj": ("attn.to_out.0",),
    "norm2": ("norm2",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
    "adaLN_modulation.1": ("norm_out.linear",),
}
FRAMEPACK = ("image_projection.up", "image_projection.down", "clean_x_embedder.proj", "clean_x_embedder.proj_2x",
             "clean_x_embedder.proj_4x")
TOP = {
    "img_in.proj": ("x_embedder.proj",),
    "txt_in.input_embedder": ("context_embedder.proj_in",),
    "txt_in.t_embedder.mlp.0": ("context_embedder.time_text_embed.timestep_embedder.linear_1",),
    "txt_in.t_embedder.mlp.2": ("context_embedder.time_text_embed.timestep_embedder.linear_2",),
    "txt_in.c_embedder.linear_1": ("context_embedder.time_text_embed.text_embedder.linear_1",),
    "txt_in.c_embedder.linear_2": ("context_embedder.time_text_embed.text_embedder.linear_2",),
    "time_in.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.mlp.0": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.mlp.2": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
    **{p: (p,) for p in FRAMEPACK},
}
SWAPPED = "final_layer.adaLN_modulation.1"


def split_rows(native: str, out_rows: int, in_features: int) -> list[tuple[int, int]]:
    """Row ranges of the parts: ``linear1`` as Flux.1's (D, D, D, rest), ``*qkv`` (``img_attn_qkv``,
    ``self_attn_qkv``, ComfyUI's ``.qkv``) thirds."""
    if native.endswith("qkv") and not native.endswith(".qkv"):
        native = native[: -len("qkv")] + ".qkv"  # the Tencent spelling fuses the same thirds
    return flux.split_rows(native, out_rows, in_features)


def _naming(what: str, double: dict, single: dict, refiner: dict, top: dict) -> fused.FusedNaming:
    return fused.FusedNaming(
        what=what,
        blocks=(fused.Block("double_blocks", "transformer_blocks", double),
                fused.Block("single_blocks", "single_transformer_blocks", single),
                fused.Block(REFINER, "context_embedder.token_refiner.refiner_blocks", refiner)),
        top=top,
        swapped=lambda native, module: native == SWAPPED,
        split_rows=split_rows,
        part_widths=flux.part_widths,
    )


NAMING = _naming("a HunyuanVideo transformer module", DOUBLE_BLOCK, SINGLE_BLOCK, REFINER_BLOCK, TOP)

# ComfyUI's Flux-style spelling (comfy/ldm/hunyuan_video/model.py on comfy/ldm/flux/layers.py)
COMFY_DOUBLE = {
    "img_mod.lin": DOUBLE_BLOCK["img_mod.linear"], "img_attn.qkv": QKV,
    "img_attn.norm.query_norm": ("attn.norm_q",), "img_attn.norm.key_norm": ("attn.norm_k",),
    "img_attn.proj": ("attn.to_out.0",), "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
    "txt_mod.lin": DOUBLE_BLOCK["txt_mod.linear"], "txt_attn.qkv": ADD_QKV,
    "txt_attn.norm.query_norm": ("attn.norm_added_q",), "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "txt_attn.proj": ("attn.to_add_out",), "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
}
COMFY_SINGLE = {"linear1": SINGLE_QKV_MLP, "linear2": ("proj_out",), "norm.query_norm": ("attn.norm_q",),
                "norm.key_norm": ("attn.norm_k",), "modulation.lin": ("norm.linear",)}
COMFY_REFINER = {"norm1": ("norm1",), "self_attn.qkv": QKV, "self_attn.proj": ("attn.to_out.0",), "norm2": ("norm2",),
                 "mlp.0": ("ff.net.0.proj",), "mlp.2": ("ff.net.2",), "adaLN_modulation.1": ("norm_out.linear",)}
COMFY_TOP = {
    "img_in.proj": TOP["img_in.proj"], "txt_in.input_embedder": TOP["txt_in.input_embedder"],
    "txt_in.t_embedder.in_layer": TOP["txt_in.t_embedder.mlp.0"],
    "txt_in.t_embedder.out_layer": TOP["txt_in.t_embedder.mlp.2"],
    "txt_in.c_embedder.in_layer": TOP["txt_in.c_embedder.linear_1"],
    "txt_in.c_embedder.out_layer": TOP["txt_in.c_embedder.linear_2"],
    "time_in.in_layer": TOP["time_in.mlp.0"], "time_in.out_layer": TOP["time_in.mlp.2"],
    "vector_in.in_layer": TOP["vector_in.in_layer"], "vector_in.out_layer": TOP["vector_in.out_layer"],
    "guidance_in.in_layer": TOP["guidance_in.mlp.0"], "guidance_in.out_layer": TOP["guidance_in.mlp.2"],
    "final_layer.linear": ("proj_out",), "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
COMFY = _naming("a HunyuanVideo transformer module", COMFY_DOUBLE, COMFY_SINGLE, COMFY_REFINER, COMFY_TOP)
COMFY_PARAMS = dit.scale_params("a HunyuanVideo transformer parameter", tuple(
    (native, diffusers, {k: v[0] for k, v in table.items() if k.endswith("_norm")})
    for native, diffusers, table in (("double_blocks", "transformer_blocks", COMFY_DOUBLE),
                                     ("single_blocks", "single_transformer_blocks", COMFY_SINGLE))))
# x_embedder input channels: 16 latent channels; I2V concatenates the image latent and a mask (33)
TASKS = {16: "T2V", 33: "I2V"}


def _describe(in_channels: int | None, framepack: bool) -> str | None:
    if framepack:
        return "FramePack"
    return TASKS.get(in_channels) if in_channels else None


def adapter_variant(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    if "framepack" in metadata.get("modelspec.architecture", "").lower():
        return "FramePack"
    patch = shapes.get("x_embedder.proj")
    return _describe(patch[1] if patch else None, any(p in FRAMEPACK for p in shapes))


def diffusers_named(modules: list[LoraModule], metadata: Mapping[str, str]) -> bool:
    """A FramePack adapter, written by the kohya writer in musubi-tuner's FramePack names (diffusers paths): its
    metadata or modules say FramePack (image projection, clean-latent embedders), or it was read from a kohya file
    whose heads were diffusers names of the family (``hints["kohya_names"]``, the kohya reader)."""
    return (adapter_variant(dit.canonical_shapes(modules), metadata) == "FramePack"
            or any(m.hints.get("kohya_names") == "diffusers" for m in modules))


def base_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    patch = shapes.get("x_embedder.proj.weight")
    return _describe(patch[1] if patch else None, "image_projection.up.weight" in shapes)


SPEC = dit.DitFamily(
    name="hunyuan_video",
    title="HunyuanVideo",
    table="hunyuan_video_modules",
    diffusers_class="HunyuanVideoTransformer3DModel",
    other_classes=("HunyuanVideoFramepackTransformer3DModel",),
    pipelines=("HunyuanVideo", "HunyuanSkyreels"),
    naming=NAMING,
    spellings=(COMFY,),
    spelling_params=COMFY_PARAMS,
    metadata=("hunyuan-video", "hunyuan_video", "hunyuanvideo", "framepack"),
    not_metadata=("hunyuan-video-1.5", "hunyuan_video_1_5", "hunyuanvideo-1.5"),
    markers=(r"_mlp\.fc[12]$", r"_mod\.linear$", r"\.modulation\.linear$", r"individual_token_refiner", r"^txt_in\.",
             r"^(time|guidance)_in\.mlp\.", r"_attn_(qkv|proj)$", r"_attn_[qk]_norm$",
             r"^context_embedder\.token_refiner\.", r"^(image_projection|clean_x_embedder)\.", r"^img_in\.proj$"),
    dotted_markers=(r"_attn_(qkv|proj)$",),
    needs_marker=True,  # ComfyUI's spelling is Flux.1's: attention-only files in it read as Flux.1
    single_file_marks=("txt_in.individual_token_refiner.blocks.0.norm1.weight",),
    # HunyuanVideo 1.5 files share the token refiner; its image projection and condition-type embedding are new
    single_file_not=("vision_in.proj.0.weight", "cond_type_embedding.weight"),
    variant=adapter_variant,
    base_variant=base_variant,
    diffusers_named=diffusers_named,
)


# --- HunyuanVideo 1.5 -------------------------------------------------------------------------------------------
# Tencent-Hunyuan/HunyuanVideo-1.5 names (= musubi-tuner hunyuan_video_1_5/hunyuan_video_1_5_models.py, its LoRAs
# lora_unet_double_blocks_0_img_attn_q), mapped to diffusers' HunyuanVideo15Transformer3DModel as diffusers'
# scripts/convert_hunyuan_video1_5_to_diffusers.py does: q / k / v are separate Linears (no fused qkv but in the
# token refiner), there are no single blocks, and byt5_in / vision_in / cond_type_embedding are new. ComfyUI fuses
# the double blocks' q / k / v and spells them Flux-style (musubi-tuner's networks/
# convert_hunyuan_video_1_5_lora_to_comfy.py: img_attn_q/k/v -> img_attn_qkv, img_mlp_fc1 -> img_mlp_0,
# img_mod_linear -> img_mod_lin): read as a second spelling.
#
# The same tables map the single files (loratool.arch.dit_checkpoints): Tencent's released transformer
# (transformer/<480p|720p>_<t2v|i2v>/diffusion_pytorch_model.safetensors, bare Tencent names) parameter for parameter
# as the script's convert_hyvideo15_transformer_to_diffusers: the refiner's self_attn_qkv chunked in thirds, the
# final adaLN_modulation.1 through swap_scale_shift ([shift; scale] stored, diffusers [scale; shift]), the double
# blocks' q / k / v norms weight-only. Keys the script maps to nothing stay unmapped and are listed per key by
# ``info`` / ``extract`` (the super-resolution models' meanflow ``time_r_in``: diffusers' timestep_embedder_r has no
# source in the script).
DOUBLE_15 = {
    "img_mod.linear": ("norm1.linear",),
    **{f"img_attn_{p}": (f"attn.to_{p}",) for p in "qkv"},
    "img_attn_q_norm": ("attn.norm_q",), "img_attn_k_norm": ("attn.norm_k",),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp.fc1": ("ff.net.0.proj",), "img_mlp.fc2": ("ff.net.2",),
    "txt_mod.linear": ("norm1_context.linear",),
    **{f"txt_attn_{p}": (f"attn.add_{p}_proj",) for p in "qkv"},
    "txt_attn_q_norm": ("attn.norm_added_q",), "txt_attn_k_norm": ("attn.norm_added_k",),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",), "txt_mlp.fc2": ("ff_context.net.2",),
}
TOP_15 = {
    "img_in.proj": ("x_embedder.proj",),
    "vision_in.proj.0": ("image_embedder.norm_in",), "vision_in.proj.1": ("image_embedder.linear_1",),
    "vision_in.proj.3": ("image_embedder.linear_2",), "vision_in.proj.4": ("image_embedder.norm_out",),
    "txt_in.input_embedder": TOP["txt_in.input_embedder"],
    **{k: TOP[k] for k in ("txt_in.t_embedder.mlp.0", "txt_in.t_embedder.mlp.2", "txt_in.c_embedder.linear_1",
                           "txt_in.c_embedder.linear_2")},
    "byt5_in.layernorm": ("context_embedder_2.norm",),
    **{f"byt5_in.fc{i}": (f"context_embedder_2.linear_{i}",) for i in (1, 2, 3)},
    "time_in.mlp.0": ("time_embed.timestep_embedder.linear_1",),
    "time_in.mlp.2": ("time_embed.timestep_embedder.linear_2",),
    "cond_type_embedding": ("cond_type_embed",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
NAMING_15 = fused.FusedNaming(
    what="a HunyuanVideo 1.5 transformer module",
    blocks=(fused.Block("double_blocks", "transformer_blocks", DOUBLE_15),
            fused.Block(REFINER, "context_embedder.token_refiner.refiner_blocks", REFINER_BLOCK)),
    top=TOP_15,
    swapped=lambda native, module: native == SWAPPED,
    split_rows=split_rows,
)
# ComfyUI's repackaged single files (Comfy-Org/HunyuanVideo_1.5_repackaged, hunyuanvideo1.5_*.safetensors) keep the
# Tencent names but store the double blocks' q / k / v fused, [q; k; v] by rows: musubi-tuner's loader splits them
# back (hunyuan_video_1_5_models.py comfyui_hunyuan_video_1_5_weight_split_hook, torch.chunk(3); its dtype probe names
# "double_blocks.0.img_attn_k.weight" official, "double_blocks.0.img_attn_qkv.weight" ComfyUI repackaged) and ComfyUI
# renames them onto Flux's fused DoubleStreamBlock (comfy/supported_models.py HunyuanVideo.process_unet_state_dict:
# "_attn_qkv." -> "_attn.qkv."). Every other weight of that file has its Tencent name (NAMING_15).
FUSED_QKV_15 = {"img_attn_qkv": QKV, "txt_attn_qkv": ADD_QKV}
COMFY_15 = fused.FusedNaming(
    what="a HunyuanVideo 1.5 transformer module",
    blocks=(fused.Block("double_blocks", "transformer_blocks", {
        **FUSED_QKV_15, "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
        "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
        "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",)}),),
    top={},
    swapped=lambda native, module: False,
    split_rows=split_rows,
)
# x_embedder input channels: 65 = 32 noisy latents + 32 condition latents + 1 mask for every T2V / I2V release (the
# configs of diffusers' conversion script: 480p / 720p, t2v / i2v, distilled alike, so the weights cannot tell them
# apart); 98 = the super-resolution models (ComfyUI comfy/supported_models.py HunyuanVideo15_SR_Distilled).
TASKS_15 = {65: "T2V / I2V", 98: "super-resolution"}


def adapter_variant_15(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    patch = shapes.get("x_embedder.proj")
    return TASKS_15.get(patch[1]) if patch else None


def base_variant_15(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    patch = shapes.get("x_embedder.proj.weight")
    return TASKS_15.get(patch[1]) if patch else None

HV15 = dit.DitFamily(
    name="hunyuan_video_1_5",
    title="HunyuanVideo 1.5",
    table="hunyuan_video_1_5_modules",
    diffusers_class="HunyuanVideo15Transformer3DModel",
    pipelines=("HunyuanVideo15",),
    naming=NAMING_15,
    spellings=(COMFY_15,),
    metadata=("hunyuan-video-1.5", "hunyuan_video_1_5", "hunyuanvideo-1.5"),
    markers=(r"_attn_[qkv]$", r"^(byt5_in|vision_in|cond_type_embedding)", r"^(context_embedder_2|image_embedder)\.",
             r"^cond_type_embed$"),
    dotted_markers=(),
    # ComfyUI's comfy/model_detection.py: the token refiner makes a HunyuanVideo file, cond_type_embedding and
    # vision_in.proj.0 a 1.5 one (comfy/supported_models.py HunyuanVideo15: vision_in_dim 1152). Tencent's release and
    # ComfyUI's repackaged file (fused double-block q / k / v) both carry them.
    single_file_marks=("txt_in.individual_token_refiner.blocks.0.norm1.weight", "cond_type_embedding.weight",
                       "vision_in.proj.0.weight"),
    variant=adapter_variant_15,
    base_variant=base_variant_15,
)
SPECS = (SPEC, HV15)
FAMILIES = [s.family for s in SPECS]
