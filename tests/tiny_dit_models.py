"""Tiny configurations of diffusers' own DiT model classes, and the LoRA / checkpoint files the DiT family
tests build from them (tests/test_dit_families.py).

Everything here is built from the real libraries: the models are diffusers' classes (a few layers, widths
of 8–32), native single files are checked against diffusers' single-file converters before use, and the
expected ΔW / merged weights always come from diffusers' LoRA converters, PEFT and ``fuse_lora``.

Key names per layout, from the tools that write them (cited per family in ``CASES``):

* native: ``diffusion_model.`` + the original repository's module path + ``.lora_A.weight`` / ``.lora_B.weight``
  (+ ``.alpha``, ``.diff_b``): ComfyUI's format, written by diffusion-pipe (``models/base.py``
  ``ComfyPipeline.save_adapter``) and lightx2v;
* kohya: ``lora_unet_`` + the same path with dots as underscores + ``.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``: musubi-tuner (``networks/lora.py``: ``f"{prefix}.{name}".replace(".", "_")``);
* diffusers: ``transformer.`` + diffusers' module path + ``.lora_A.weight`` / ``.lora_B.weight``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from diffusers.loaders import lora_conversion_utils as lcu
from diffusers.loaders import single_file_utils as sfu

from loratool.arch import dit


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: with two OpenMP threads on a busy 2-core box one 128×32 SVD takes 0.3 s instead of 2 ms
    (measured, load average 11); the thread policy of the ops is not what the DiT tests are about. Imported (autouse)
    by the test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Case:
    """One family on a tiny diffusers model."""

    family: str
    cls: str  # diffusers model class
    config: dict
    pipeline: str  # diffusers pipeline whose lora_state_dict converts LoRA files (the oracle)
    # native module paths (depth of the tiny config) the test LoRAs adapt
    targets: list[str]
    # diffusers' single-file converter (native state dict -> diffusers state dict)
    single_file: Callable | None = None
    # diffusers' converter for native (diffusion_model.) LoRA keys, and for kohya (lora_unet_) keys
    native_converter: Callable | None = None
    kohya_converter: Callable | None = None
    # native paths diffusers' converter ignores the alpha of (the test stores none there: alpha = r)
    alpha_ignored: tuple[str, ...] = ()
    # native paths whose LoRA also carries a bias delta (diff_b)
    diff_b: tuple[str, ...] = ()
    # the kohya LoRA must list every one of these native paths (converters that pop them unconditionally)
    kohya_targets: list[str] = field(default_factory=list)
    variant: str = ""  # what ``info`` must say about the LoRAs (a substring)
    base_variant: str | None = None  # ... and about the tiny base (None: the base alone cannot tell)
    metadata: dict = field(default_factory=dict)
    source: str = ""  # where the key names come from
    sf_prefix: str = "model.diffusion_model."  # what the family's single files put before the native names
    native_alpha: bool = True  # native LoRA files carry .alpha keys (ai-toolkit's FLUX.2 files: none, alpha = r)
    # the LoRA layout diffusers' pipeline loader converts for the merge oracle ("native" or "kohya")
    oracle_layout: str = "native"
    # diffusers converters with a width hard-coded for the released model: {function name: {old: new}}; the
    # tests run diffusers' own source with the tiny model's width put in (see ``patched_converters``)
    patches: dict = field(default_factory=dict)
    native_prefix: str = "diffusion_model."  # diffusion-pipe's HunyuanVideo files: "transformer."
    # a second native spelling of the targets the family reads ({native path: other spelling}): ComfyUI's
    comfy: dict = field(default_factory=dict)
    # the kohya file names diffusers' modules (musubi-tuner's Z-Image): fused native modules are written as their
    # diffusers parts, with the rows of up each part holds in the weight (same ΔW as the native file)
    kohya_split: bool = False
    # families diffusers has no LoRA loader for (HunyuanVideo 1.5): what converts the test LoRAs to diffusers names in
    # place of ``pipeline``'s ``lora_state_dict`` (same signature)
    lora_loader: object | None = None
    # diffusers hard-codes a released width the tiny config cannot set: shrink that submodule (same class) in place
    resize: Callable | None = None


WAN_TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                ffn_dim=24, num_layers=2, rope_max_seq_len=32)
WAN_I2V_TINY = dict(WAN_TINY, image_dim=12, added_kv_proj_dim=16)


def _wan_blocks(n: int, i2v: bool) -> list[str]:
    out = []
    for i in range(n):
        for attn in ("self_attn", "cross_attn"):
            out += [f"blocks.{i}.{attn}.{p}" for p in "qkvo"]
        if i2v:
            out += [f"blocks.{i}.cross_attn.k_img", f"blocks.{i}.cross_attn.v_img"]
        out += [f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.2"]
    return out


QWEN_TINY = dict(in_channels=8, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=12, axes_dims_rope=(2, 2, 4))
QWEN_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2",
              "txt_mlp.net.0.proj", "txt_mlp.net.2")
QWEN_TARGETS = [*(f"transformer_blocks.{i}.{p}" for i in range(2) for p in QWEN_BLOCK), "img_in", "txt_in", "proj_out",
                "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2"]


def strip_comfy_prefix(sd: dict) -> dict:
    """Single files whose native names are diffusers' (ComfyUI's repackaged Qwen-Image, LTX-Video, HiDream
    files): the converter only drops ``model.diffusion_model.``."""
    return {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}


FLUX2_TINY = dict(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=16, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2))
FLUX2_BLOCKS = [*(f"double_blocks.0.{p}" for p in ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
                                                   "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")),
                "single_blocks.0.linear1", "single_blocks.0.linear2"]
CHROMA_TINY = dict(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                   joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                   approximator_hidden_dim=16, approximator_layers=2)
CHROMA_BLOCKS = [*(f"double_blocks.0.{p}" for p in ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
                                                    "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")),
                 "single_blocks.0.linear1", "single_blocks.0.linear2", "img_in", "txt_in", "final_layer.linear"]

HV_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
               num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
               rope_axes_dim=(2, 2, 4))
HV_REFINER = "txt_in.individual_token_refiner.blocks.0"
HV_TARGETS = [
    *(f"double_blocks.0.{s}_{p}" for s in ("img", "txt") for p in ("attn_qkv", "attn_proj")),
    *(f"double_blocks.0.{s}_{p}" for s in ("img", "txt") for p in ("mod.linear", "mlp.fc1", "mlp.fc2")),
    "single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.linear", "img_in.proj",
    "txt_in.input_embedder", "txt_in.t_embedder.mlp.0", "txt_in.c_embedder.linear_1", f"{HV_REFINER}.self_attn_proj",
    f"{HV_REFINER}.mlp.fc1", f"{HV_REFINER}.mlp.fc2", f"{HV_REFINER}.adaLN_modulation.1", "time_in.mlp.0",
    "vector_in.in_layer", "guidance_in.mlp.2", "final_layer.linear"]
# ComfyUI comfy/lora.py (HunyuanVideo, "diffusion-pipe lora format"): its Flux-style module names become the
# Tencent ones by "_mod.lin."->"_mod.linear.", "_attn.qkv."->"_attn_qkv.", "_attn.proj."->"_attn_proj.",
# "mlp.0."->"mlp.fc1.", "mlp.2."->"mlp.fc2.", ".modulation.lin."->".modulation.linear."; the embedders follow
# comfy/ldm/flux/layers.py MLPEmbedder (in_layer / out_layer).
HV_COMFY_RULES = (("_mod.linear", "_mod.lin"), ("_attn_qkv", "_attn.qkv"), ("_attn_proj", "_attn.proj"),
                  ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2"), (".modulation.linear", ".modulation.lin"),
                  ("t_embedder.mlp.0", "t_embedder.in_layer"), ("c_embedder.linear_1", "c_embedder.in_layer"),
                  ("time_in.mlp.0", "time_in.in_layer"), ("guidance_in.mlp.2", "guidance_in.out_layer"))


LTXV_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                 num_layers=1, caption_channels=12)
LTXV_TARGETS = [*(f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2")
                  for p in ("to_q", "to_k", "to_v", "to_out.0")),
                "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2", "caption_projection.linear_1",
                "proj_out"]
LTX2_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                 audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
                 audio_cross_attention_dim=8, num_layers=1, caption_channels=12)
LTX2_ATTN = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
LTX2_TARGETS = [
    *(f"transformer_blocks.0.{a}.{p}" for a in LTX2_ATTN for p in ("to_q", "to_k", "to_v", "to_out.0")),
    *(f"transformer_blocks.0.{f}.{p}" for f in ("ff", "audio_ff") for p in ("net.0.proj", "net.2")),
    "patchify_proj", "audio_patchify_proj", "adaln_single.linear", "audio_adaln_single.emb.timestep_embedder.linear_1",
    "av_ca_video_scale_shift_adaln_single.linear", "av_ca_v2a_gate_adaln_single.linear", "caption_projection.linear_1",
    "proj_out", "audio_proj_out"]


ZIMAGE_TINY = dict(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                   axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
ZIMAGE_TARGETS = [*(f"layers.0.{p}" for p in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2",
                                              "feed_forward.w3", "adaLN_modulation.0")),
                  "layers.1.attention.qkv", "noise_refiner.0.attention.qkv", "noise_refiner.0.feed_forward.w2",
                  "noise_refiner.0.adaLN_modulation.0", "context_refiner.0.attention.out",
                  "context_refiner.0.feed_forward.w1", "t_embedder.mlp.0", "cap_embedder.1"]
LUMINA2_TINY = dict(sample_size=16, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
                    num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2),
                    axes_lens=(64, 32, 32), cap_feat_dim=16)
_LUMINA_BLOCK = ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
LUMINA2_TARGETS = [*(f"{b}.{p}" for b in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0")
                     for p in _LUMINA_BLOCK),
                   *(f"{b}.adaLN_modulation.1" for b in ("layers.0", "layers.1", "noise_refiner.0"))]


KREA2_TINY = dict(in_channels=8, num_layers=1, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=24, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=2,
                  text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=24,
                  num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4))
KREA2_TARGETS = [*(f"blocks.0.attn.{p}" for p in ("wq", "wk", "wv", "wo", "gate")),
                 *(f"blocks.0.mlp.{p}" for p in ("gate", "up", "down")), "txtfusion.layerwise_blocks.0.attn.wq",
                 "txtfusion.refiner_blocks.0.mlp.down", "txtfusion.projector", "first", "tmlp.0", "tproj.1",
                 "txtmlp.1", "last.linear"]
ANIMA_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=24, num_layers=1,
                  text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 8, 8), concat_padding_mask=True,
                  extra_pos_embed_type=None, rope_scale=(1.0, 4.0, 4.0))
ANIMA_TARGETS = [*(f"blocks.0.self_attn.{p}_proj" for p in ("q", "k", "v", "output")), "blocks.0.cross_attn.q_proj",
                 "blocks.0.mlp.layer1", "blocks.0.mlp.layer2", "blocks.0.adaln_modulation_self_attn.1",
                 "blocks.0.adaln_modulation_mlp.2", "final_layer.linear", "final_layer.adaln_modulation.1",
                 "t_embedder.1.linear_1", "x_embedder.proj.1"]
ERNIE_TINY = dict(hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=24, in_channels=8,
                  out_channels=8, text_in_dim=16, rope_axes_dim=(4, 6, 6))
ERNIE_TARGETS = [*(f"layers.0.self_attention.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
                 *(f"layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "linear_fc2")), "text_proj",
                 "time_embedding.linear_1", "final_norm.linear", "final_linear", "x_embedder.proj"]


HIDREAM_TINY = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                    attention_head_dim=8, num_attention_heads=2, caption_channels=[16, 12], text_emb_dim=8,
                    num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(4, 4), max_resolution=(16, 16),
                    llama_layers=[0, 1])
HIDREAM_TARGETS = [*(f"double_stream_blocks.0.block.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out", "to_q_t",
                                                                         "to_out_t")),
                   "double_stream_blocks.0.block.ff_i.experts.1.w1",
                   "double_stream_blocks.0.block.ff_i.shared_experts.w2",
                   "double_stream_blocks.0.block.ff_t.w3", "double_stream_blocks.0.block.adaLN_modulation.1",
                   "single_stream_blocks.0.block.attn1.to_v", "single_stream_blocks.0.block.ff_i.experts.0.w3",
                   "caption_projection.2.linear", "x_embedder.proj", "final_layer.linear"]


# --- HunyuanVideo 1.5 ---------------------------------------------------------------------------------------------
HV15_TINY = dict(in_channels=65, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                 num_refiner_layers=2, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
                 rope_axes_dim=(2, 2, 4))
HV15_REFINER = "txt_in.individual_token_refiner.blocks"
HV15_DOUBLE = [*(f"double_blocks.0.{s}_{p}" for s in ("img", "txt") for p in ("attn_q", "attn_k", "attn_v", "attn_proj",
                                                                             "mlp.fc1", "mlp.fc2", "mod.linear")),
               "double_blocks.1.img_attn_q", "double_blocks.1.txt_mlp.fc2"]
HV15_TARGETS = [*HV15_DOUBLE, *(f"{HV15_REFINER}.0.{p}" for p in ("self_attn_qkv", "self_attn_proj", "mlp.fc1",
                                                                  "adaLN_modulation.1")),
                f"{HV15_REFINER}.1.self_attn_qkv", "txt_in.input_embedder", "txt_in.t_embedder.mlp.0",
                "txt_in.c_embedder.linear_2", "time_in.mlp.0", "time_in.mlp.2", "byt5_in.fc1", "byt5_in.fc3",
                "vision_in.proj.1", "vision_in.proj.3", "final_layer.linear", "final_layer.adaLN_modulation.1"]
# (img_in.proj, a 1×1×1 Conv3d at HunyuanVideo 1.5's patch size 1, is left out: PEFT 0.21's get_delta_weight takes
# every kernel whose size[2:4] is (1, 1) for a 1×1 Conv2d and fails on it; tests/test_dit_hunyuan_video_1_5.py holds
# that merge against PEFT's forward instead)


def hv15_small_byt5(model) -> None:
    """diffusers hard-codes ByT5's hidden width (transformer_hunyuan_video15.py: ``HunyuanVideo15ByT5TextProjection(
    text_embed_2_dim, 2048, inner_dim)``, Tencent's ``ByT5Mapper(hidden_dim=2048)``): the tiny model gets the same class
    at width 24 (the released 2048 × 2048 float64 weight is 32 MB in every file the tests write)."""
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15ByT5TextProjection

    old = model.context_embedder_2
    model.context_embedder_2 = HunyuanVideo15ByT5TextProjection(old.linear_1.in_features, 24,
                                                                old.linear_3.out_features)


# huggingface/diffusers scripts/convert_hunyuan_video1_5_to_diffusers.py, convert_hyvideo15_transformer_to_diffusers
# (a repository script, not in the diffusers package: it cannot be imported), transcribed section by section as
# (diffusers parameter, Tencent parameter, how): how None = renamed, 0 / 1 / 2 = that third of torch.chunk(source, 3)
# (the refiner's self_attn_qkv), "swap" = its swap_scale_shift (final_layer.adaLN_modulation.1). The script hard-codes
# the released depths (num_layers = 54, num_refiner_blocks = 2); here they are counted in the file (as
# ``patched_converters`` puts the tiny widths into diffusers' converters).
def _wb(diffusers: str, tencent: str, how=None, suffixes=("weight", "bias")) -> list[tuple[str, str, object]]:
    return [(f"{diffusers}.{s}", f"{tencent}.{s}", how) for s in suffixes]


def hv15_script_rules(double_blocks: int, refiner_blocks: int) -> list[tuple[str, str, object]]:
    rules = []
    # 1. time_embed.timestep_embedder <- time_in
    rules += _wb("time_embed.timestep_embedder.linear_1", "time_in.mlp.0")
    rules += _wb("time_embed.timestep_embedder.linear_2", "time_in.mlp.2")
    # 2. context_embedder.time_text_embed.timestep_embedder <- txt_in.t_embedder
    rules += _wb("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0")
    rules += _wb("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2")
    # 3. context_embedder.time_text_embed.text_embedder <- txt_in.c_embedder
    rules += _wb("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.linear_1")
    rules += _wb("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.linear_2")
    # 4. context_embedder.proj_in <- txt_in.input_embedder
    rules += _wb("context_embedder.proj_in", "txt_in.input_embedder")
    # 5. context_embedder.token_refiner <- txt_in.individual_token_refiner
    for i in range(refiner_blocks):
        d, t = f"context_embedder.token_refiner.refiner_blocks.{i}.", f"txt_in.individual_token_refiner.blocks.{i}."
        rules += _wb(d + "norm1", t + "norm1")
        for part, name in enumerate(("to_q", "to_k", "to_v")):
            rules += _wb(d + f"attn.{name}", t + "self_attn_qkv", part)
        rules += _wb(d + "attn.to_out.0", t + "self_attn_proj")
        rules += _wb(d + "norm2", t + "norm2")
        rules += _wb(d + "ff.net.0.proj", t + "mlp.fc1") + _wb(d + "ff.net.2", t + "mlp.fc2")
        rules += _wb(d + "norm_out.linear", t + "adaLN_modulation.1")
    # 6. context_embedder_2 <- byt5_in
    rules += _wb("context_embedder_2.norm", "byt5_in.layernorm")
    rules += [r for i in (1, 2, 3) for r in _wb(f"context_embedder_2.linear_{i}", f"byt5_in.fc{i}")]
    # 7. image_embedder <- vision_in
    for d, t in (("norm_in", 0), ("linear_1", 1), ("linear_2", 3), ("norm_out", 4)):
        rules += _wb(f"image_embedder.{d}", f"vision_in.proj.{t}")
    # 8. x_embedder <- img_in; 9. cond_type_embed <- cond_type_embedding
    rules += _wb("x_embedder.proj", "img_in.proj")
    rules += _wb("cond_type_embed", "cond_type_embedding", suffixes=("weight",))
    # 10. transformer_blocks <- double_blocks
    for i in range(double_blocks):
        d, t = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        rules += _wb(d + "norm1.linear", t + "img_mod.linear") + _wb(d + "norm1_context.linear", t + "txt_mod.linear")
        rules += [r for p in "qkv" for r in _wb(d + f"attn.to_{p}", t + f"img_attn_{p}")]
        rules += _wb(d + "attn.norm_q", t + "img_attn_q_norm", suffixes=("weight",))
        rules += _wb(d + "attn.norm_k", t + "img_attn_k_norm", suffixes=("weight",))
        rules += _wb(d + "attn.to_out.0", t + "img_attn_proj")
        rules += [r for p in "qkv" for r in _wb(d + f"attn.add_{p}_proj", t + f"txt_attn_{p}")]
        rules += _wb(d + "attn.norm_added_q", t + "txt_attn_q_norm", suffixes=("weight",))
        rules += _wb(d + "attn.norm_added_k", t + "txt_attn_k_norm", suffixes=("weight",))
        rules += _wb(d + "attn.to_add_out", t + "txt_attn_proj")
        rules += _wb(d + "ff.net.0.proj", t + "img_mlp.fc1") + _wb(d + "ff.net.2", t + "img_mlp.fc2")
        rules += _wb(d + "ff_context.net.0.proj", t + "txt_mlp.fc1") + _wb(d + "ff_context.net.2", t + "txt_mlp.fc2")
    # 11. norm_out and proj_out <- final_layer
    rules += _wb("norm_out.linear", "final_layer.adaLN_modulation.1", "swap")
    rules += _wb("proj_out", "final_layer.linear")
    return rules


def _swap_scale_shift(x: torch.Tensor) -> torch.Tensor:
    shift, scale = x.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _apply(how, x: torch.Tensor) -> torch.Tensor:
    if how == "swap":
        return _swap_scale_shift(x)
    return x if how is None else torch.chunk(x, 3, dim=0)[how]


def _depths(keys) -> tuple[int, int]:
    """(double blocks, refiner blocks) a state dict / LoRA (Tencent, kohya or diffusers keys) reaches."""
    import re

    def depth(pattern: str) -> int:
        return 1 + max((int(m.group(1)) for k in keys for m in [re.search(pattern, k)] if m), default=-1)

    return (depth(r"(?:double|transformer)_blocks[._](\d+)[._]"),
            depth(r"(?:individual_token_refiner[._]blocks|refiner_blocks)[._](\d+)[._]"))


def convert_hv15_by_script(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tencent's HunyuanVideo 1.5 transformer -> diffusers, by the script's rules; like the script, it pops what it
    converts and leaves the rest in ``sd`` (keys it has no rule for)."""
    out, used = {}, set()
    for diffusers, tencent, how in hv15_script_rules(*_depths(sd)):
        out[diffusers] = _apply(how, sd[tencent])
        used.add(tencent)
    for key in used:
        sd.pop(key)
    return out


def split_comfy_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's repackaged HunyuanVideo 1.5 file -> Tencent's: musubi-tuner's loader hook
    (hunyuan_video_1_5_models.py comfyui_hunyuan_video_1_5_weight_split_hook) turns each ``img_attn_qkv`` /
    ``txt_attn_qkv`` weight and bias into ``_q`` / ``_k`` / ``_v`` by torch.chunk(3)."""
    out = {}
    for key, value in sd.items():
        if any(f"{s}_attn_qkv.{p}" in key for s in ("img", "txt") for p in ("weight", "bias")):
            for suffix, part in zip(("_q", "_k", "_v"), torch.chunk(value, 3, dim=0)):
                out[key.replace("_qkv", suffix)] = part
        else:
            out[key] = value
    return out


class Hv15ScriptLoader:
    """``lora_state_dict`` for HunyuanVideo 1.5, which diffusers has no LoRA loader for: a native
    (``diffusion_model.``) or musubi-tuner kohya (``lora_unet_``) LoRA goes to diffusers' module names by the script's
    rules applied to ΔW = (alpha / r)·B·A — a rename moves the pair, a chunk keeps A and takes B's rows,
    swap_scale_shift swaps B's row halves — with alpha / r folded into A (PEFT then loads it at scale 1). A
    diffusers-layout file (``transformer.`` + diffusers path) passes as it is, with its ``lora_adapter_metadata``."""

    @staticmethod
    def lora_state_dict(source, return_lora_metadata: bool = False):
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        metadata = None
        if isinstance(source, dict):
            sd = dict(source)
        else:
            sd = load_file(source)
            with safe_open(source, "pt") as f:
                raw = (f.metadata() or {}).get("lora_adapter_metadata")
            metadata = json.loads(raw) if raw else None
        by_module: dict[str, list[tuple[str, object]]] = {}
        for diffusers, tencent, how in hv15_script_rules(*_depths(sd)):
            if diffusers.endswith(".weight"):
                by_module.setdefault(tencent[:-len(".weight")], []).append((diffusers[:-len(".weight")], how))
        kohya = {"lora_unet_" + t.replace(".", "_"): t for t in by_module}
        diffusers_modules = {d for parts in by_module.values() for d, _ in parts}
        out: dict[str, torch.Tensor] = {}
        heads = {k.split(".lora_", 1)[0].removesuffix(".alpha") for k in sd}
        for head in sorted(heads):
            bare = head.removeprefix("transformer.")
            if head.startswith("transformer.") and bare in diffusers_modules:
                out.update({k: v for k, v in sd.items() if k.startswith(head + ".")})
                continue
            tencent = kohya.get(head) or head.removeprefix("diffusion_model.")
            names = ("lora_down", "lora_up") if head in kohya else ("lora_A", "lora_B")
            down, up = sd[f"{head}.{names[0]}.weight"], sd[f"{head}.{names[1]}.weight"]
            alpha = sd.get(f"{head}.alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
            for diffusers, how in by_module[tencent]:
                out[f"transformer.{diffusers}.lora_A.weight"] = down * scale
                out[f"transformer.{diffusers}.lora_B.weight"] = _apply(how, up).contiguous()
        return (out, metadata) if return_lora_metadata else out


def _comfy_name(path: str, rules) -> str:
    for old, new in rules:
        path = path.replace(old, new)
    return path


CASES: dict[str, Case] = {
    # Wan-Video/Wan2.1 wan/modules/model.py names; diffusers _convert_non_diffusers_wan_lora_to_diffusers /
    # _convert_musubi_wan_lora_to_diffusers; musubi-tuner networks/lora_wan.py (lora_unet_, WanAttentionBlock).
    "wan": Case(
        family="wan", cls="WanTransformer3DModel", config=WAN_I2V_TINY, pipeline="WanPipeline",
        targets=[*_wan_blocks(2, True), "text_embedding.0", "time_embedding.2", "time_projection.1", "head.head",
                 "img_emb.proj.1", "img_emb.proj.3"],
        single_file=sfu.convert_wan_transformer_to_diffusers,
        native_converter=lcu._convert_non_diffusers_wan_lora_to_diffusers,
        kohya_converter=lcu._convert_musubi_wan_lora_to_diffusers,
        alpha_ignored=("text_embedding.0", "time_embedding.2", "time_projection.1", "head.head", "img_emb.proj.1",
                       "img_emb.proj.3"),
        diff_b=("blocks.0.self_attn.q", "blocks.1.ffn.2"),
        kohya_targets=_wan_blocks(2, True),
        variant="Wan 2.1 I2V", base_variant="Wan 2.1 I2V",
        source="Wan2.1 wan/modules/model.py; diffusers lora_conversion_utils Wan converters; musubi-tuner lora_wan.py",
    ),
    # diffusers QwenImageTransformer2DModel names (= ComfyUI comfy/ldm/qwen_image, musubi-tuner qwen_image_model.py);
    # diffusers _convert_non_diffusers_qwen_lora_to_diffusers (diffusion_model. and lora_unet_ keys, top-level modules);
    # musubi-tuner modelspec.architecture "Qwen-Image-Edit" (utils/sai_model_spec.py).
    "qwen_image": Case(
        family="qwen_image", cls="QwenImageTransformer2DModel", config=QWEN_TINY, pipeline="QwenImagePipeline",
        targets=QWEN_TARGETS, single_file=strip_comfy_prefix,
        native_converter=lcu._convert_non_diffusers_qwen_lora_to_diffusers,
        kohya_converter=lcu._convert_non_diffusers_qwen_lora_to_diffusers, kohya_targets=QWEN_TARGETS,
        variant="Qwen-Image-Edit", metadata={"modelspec.architecture": "Qwen-Image-Edit/lora"},
        source="diffusers transformer_qwenimage.py; lora_conversion_utils Qwen converter; musubi-tuner "
               "lora_qwen_image.py",
    ),
    # black-forest-labs/flux2 (= musubi-tuner flux_2/flux2_models.py) names; diffusers
    # convert_flux2_transformer_checkpoint_to_diffusers, _convert_non_diffusers_flux2_lora_to_diffusers
    # (diffusion_model.),
    # _convert_kohya_flux2_lora_to_diffusers (lora_unet_); musubi-tuner modelspec "Flux.2-klein-4b".
    # final_layer.adaLN_modulation.1 is left out here: diffusers' LoRA converter does not swap its halves (see
    # test_flux2_final_modulation_follows_the_weights).
    "flux2": Case(
        family="flux2", cls="Flux2Transformer2DModel", config=FLUX2_TINY, pipeline="Flux2Pipeline",
        targets=[*FLUX2_BLOCKS, "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
                 "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
                 "single_stream_modulation.lin", "final_layer.linear"],
        single_file=sfu.convert_flux2_transformer_checkpoint_to_diffusers, sf_prefix="", native_alpha=False,
        native_converter=lcu._convert_non_diffusers_flux2_lora_to_diffusers,
        kohya_converter=lcu._convert_kohya_flux2_lora_to_diffusers,
        kohya_targets=[*FLUX2_BLOCKS, "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
                       "final_layer.linear"],
        variant="klein 4B", metadata={"modelspec.architecture": "Flux.2-klein-4b/lora"},
        source="flux2 / musubi-tuner flux2_models.py; diffusers Flux2 single-file and LoRA converters",
    ),
    # lodestones/flow (Chroma) BFL names; diffusers convert_chroma_transformer_checkpoint_to_diffusers (its Flux.1
    # width 3072 set to the tiny one), Chroma LoRAs through the Flux loader: _convert_kohya_flux_lora_to_diffusers
    # (width list [3072, 3072, 3072, 12288] likewise); it ignores alpha on final_layer.
    "chroma": Case(
        family="chroma", cls="ChromaTransformer2DModel", config=CHROMA_TINY, pipeline="ChromaPipeline",
        targets=[*CHROMA_BLOCKS, "distilled_guidance_layer.in_proj", "distilled_guidance_layer.layers.1.in_layer",
                 "distilled_guidance_layer.out_proj"],
        single_file=sfu.convert_chroma_transformer_checkpoint_to_diffusers,
        kohya_converter=lcu._convert_kohya_flux_lora_to_diffusers, kohya_targets=CHROMA_BLOCKS,
        alpha_ignored=("final_layer.linear",), oracle_layout="kohya",
        # sd-scripts library/sai_model_spec.py: ARCH_FLUX_1_CHROMA = "chroma" (+ "/lora"); without it a
        # Chroma LoRA's keys are Flux.1's and it reads as Flux.1 (same diffusers names but for modulation)
        metadata={"modelspec.architecture": "chroma/lora"},
        patches={"convert_chroma_transformer_checkpoint_to_diffusers": {"inner_dim = 3072": "inner_dim = 16"},
                 "_convert_kohya_flux_lora_to_diffusers": {"dims=[3072, 3072, 3072, 12288]": "dims=[16, 16, 16, 64]"}},
        source="lodestones/flow; diffusers Chroma single-file converter, Flux kohya LoRA converter",
    ),
    # Tencent/HunyuanVideo names (= musubi-tuner hunyuan_model/models.py); diffusion-pipe models/hunyuan_video.py
    # writes them behind "transformer." without alphas; diffusers convert_hunyuan_video_transformer_to_diffusers
    # and _convert_hunyuan_video_lora_to_diffusers (their hard-coded hidden size 3072 set to the tiny 16). Left
    # out of the oracle: final_layer.adaLN_modulation.1 and the refiner's self_attn_qkv, which diffusers' LoRA
    # converter splits along lora_A's rank too (wrong ΔW: see docs/families.md).
    "hunyuan_video": Case(
        family="hunyuan_video", cls="HunyuanVideoTransformer3DModel", config=HV_TINY, pipeline="HunyuanVideoPipeline",
        targets=HV_TARGETS, single_file=sfu.convert_hunyuan_video_transformer_to_diffusers, sf_prefix="",
        native_converter=lcu._convert_hunyuan_video_lora_to_diffusers, native_prefix="transformer.",
        native_alpha=False, kohya_targets=HV_TARGETS,
        comfy={p: _comfy_name(p, HV_COMFY_RULES) for p in HV_TARGETS},
        patches={"_convert_hunyuan_video_lora_to_diffusers": {"hidden_size = 3072": "hidden_size = 16"},
                 "convert_hunyuan_video_transformer_to_diffusers": {"hidden_size = 3072": "hidden_size = 16"}},
        source="Tencent/HunyuanVideo; diffusion-pipe; ComfyUI comfy/lora.py; diffusers HunyuanVideo converters",
    ),
    # Tencent-Hunyuan/HunyuanVideo-1.5 names (hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py: img_attn_q /
    # k / v separate, the refiner's self_attn_qkv fused; = musubi-tuner hunyuan_video_1_5_models.py, whose LoRAs are
    # lora_unet_double_blocks_0_img_attn_q on the double blocks only: networks/lora_hv_1_5.py MMDoubleStreamBlock).
    # diffusers ships neither a single-file nor a LoRA converter: both oracles are its repository script
    # scripts/convert_hunyuan_video1_5_to_diffusers.py, transcribed above (convert_hv15_by_script, Hv15ScriptLoader).
    "hunyuan_video_1_5": Case(
        family="hunyuan_video_1_5", cls="HunyuanVideo15Transformer3DModel", config=HV15_TINY,
        pipeline="HunyuanVideo15Pipeline", targets=HV15_TARGETS, single_file=convert_hv15_by_script, sf_prefix="",
        native_converter=Hv15ScriptLoader.lora_state_dict, kohya_converter=Hv15ScriptLoader.lora_state_dict,
        kohya_targets=HV15_DOUBLE, lora_loader=Hv15ScriptLoader, resize=hv15_small_byt5,
        base_variant="T2V / I2V",
        source="Tencent-Hunyuan/HunyuanVideo-1.5; musubi-tuner; diffusers "
               "scripts/convert_hunyuan_video1_5_to_diffusers.py",
    ),
    # Lightricks LTX-Video names (diffusion-pipe models/ltx_video.py saves them behind diffusion_model., alpha = r);
    # diffusers convert_ltx_transformer_checkpoint_to_diffusers, _convert_non_diffusers_ltxv_lora_to_diffusers
    # (which only strips the prefix: patchify_proj / adaln_single LoRAs are tested in test_dit_family_specifics).
    "ltx_video": Case(
        family="ltx_video", cls="LTXVideoTransformer3DModel", config=LTXV_TINY, pipeline="LTXPipeline",
        targets=LTXV_TARGETS, single_file=sfu.convert_ltx_transformer_checkpoint_to_diffusers,
        native_converter=lcu._convert_non_diffusers_ltxv_lora_to_diffusers, native_alpha=False,
        source="Lightricks/LTX-Video; diffusion-pipe; diffusers LTX-Video converters",
    ),
    # Lightricks LTX-2 names; diffusers convert_ltx2_transformer_to_diffusers,
    # _convert_non_diffusers_ltx2_lora_to_diffusers
    "ltx2": Case(
        family="ltx2", cls="LTX2VideoTransformer3DModel", config=LTX2_TINY, pipeline="LTX2Pipeline",
        targets=LTX2_TARGETS, single_file=sfu.convert_ltx2_transformer_to_diffusers,
        native_converter=lcu._convert_non_diffusers_ltx2_lora_to_diffusers, native_alpha=False,
        source="Lightricks/LTX-2; diffusers LTX-2 converters",
    ),
    # Tongyi-MAI Z-Image names (ComfyUI); musubi-tuner's Z-Image LoRAs use diffusers' names (its
    # networks/convert_z_image_lora_to_comfy.py fuses to_q/k/v into qkv, attention_to_out_0 -> attention_out):
    # diffusers' _convert_non_diffusers_z_image_lora_to_diffusers reads those (protected n-grams + name fixups);
    # convert_z_image_transformer_checkpoint_to_diffusers for single files.
    "z_image": Case(
        family="z_image", cls="ZImageTransformer2DModel", config=ZIMAGE_TINY, pipeline="ZImagePipeline",
        targets=ZIMAGE_TARGETS, single_file=sfu.convert_z_image_transformer_checkpoint_to_diffusers,
        kohya_converter=lcu._convert_non_diffusers_z_image_lora_to_diffusers, kohya_targets=ZIMAGE_TARGETS,
        kohya_split=True, oracle_layout="kohya", metadata={"modelspec.architecture": "Z-Image/lora"},
        source="Tongyi-MAI/Z-Image; musubi-tuner lora_zimage.py, convert_z_image_lora_to_comfy.py; diffusers "
               "Z-Image converters",
    ),
    # Alpha-VLLM Lumina-Image-2.0 names (ComfyUI, sd-scripts lumina); diffusers convert_lumina2_to_diffusers and
    # _convert_non_diffusers_lumina2_lora_to_diffusers with their hard-coded GQA widths (2304, 768, 768) set to
    # the tiny (32, 16, 16); sd-scripts library/sai_model_spec.py ARCH_LUMINA_2 = "lumina-2".
    "lumina2": Case(
        family="lumina2", cls="Lumina2Transformer2DModel", config=LUMINA2_TINY, pipeline="Lumina2Pipeline",
        # (bare keys: diffusers' converter lists the keys before stripping model.diffusion_model., then pops the
        # stripped names' old spelling)
        targets=LUMINA2_TARGETS, single_file=sfu.convert_lumina2_to_diffusers, sf_prefix="",
        native_converter=lcu._convert_non_diffusers_lumina2_lora_to_diffusers, native_alpha=False,
        kohya_targets=LUMINA2_TARGETS, metadata={"modelspec.architecture": "lumina-2/lora"},
        patches={"_convert_non_diffusers_lumina2_lora_to_diffusers": {"[2304, 768, 768]": "[32, 16, 16]"},
                 "convert_lumina2_to_diffusers": {"q_dim = 2304": "q_dim = 32", "k_dim = v_dim = 768":
                                                  "k_dim = v_dim = 16"}},
        source="Alpha-VLLM/Lumina-Image-2.0; diffusers Lumina 2 converters",
    ),
    # krea-ai/krea-2 names (= musubi-tuner krea2/krea2_mmdit.py, lora_unet_ keys from networks/lora_krea2.py);
    # diffusers _convert_non_diffusers_krea2_lora_to_diffusers, convert_krea2_transformer_checkpoint_to_diffusers
    "krea2": Case(
        family="krea2", cls="Krea2Transformer2DModel", config=KREA2_TINY, pipeline="Krea2Pipeline",
        targets=KREA2_TARGETS, single_file=sfu.convert_krea2_transformer_checkpoint_to_diffusers,
        native_converter=lcu._convert_non_diffusers_krea2_lora_to_diffusers, native_alpha=False,
        kohya_targets=KREA2_TARGETS, metadata={"modelspec.architecture": "Krea-2/lora"},
        source="krea-ai/krea-2; musubi-tuner krea2_mmdit.py; diffusers Krea 2 converters",
    ),
    # Cosmos-Predict2 names under diffusion_model. (ComfyUI comfy/ldm/anima); diffusers
    # _convert_non_diffusers_anima_lora_to_diffusers through AnimaLoraLoaderMixin (a modular pipeline only)
    "anima": Case(
        family="anima", cls="CosmosTransformer3DModel", config=ANIMA_TINY, pipeline="AnimaLoraLoaderMixin",
        targets=ANIMA_TARGETS, native_converter=lcu._convert_non_diffusers_anima_lora_to_diffusers,
        native_alpha=False, source="ComfyUI comfy/ldm/anima; diffusers Anima LoRA converter",
    ),
    # diffusers ErnieImageTransformer2DModel names under diffusion_model. (ErnieImageLoraLoaderMixin);
    # convert_ernie_image_transformer_checkpoint_to_diffusers
    "ernie_image": Case(
        family="ernie_image", cls="ErnieImageTransformer2DModel", config=ERNIE_TINY, pipeline="ErnieImagePipeline",
        targets=ERNIE_TARGETS, single_file=sfu.convert_ernie_image_transformer_checkpoint_to_diffusers,
        native_converter=lambda sd: sd, native_alpha=False,
        source="diffusers transformer_ernie_image.py, ErnieImageLoraLoaderMixin",
    ),
    # diffusers HiDreamImageTransformer2DModel names under diffusion_model. (ComfyUI comfy/lora.py HiDream map;
    # diffusers _convert_non_diffusers_hidream_lora_to_diffusers, convert_hidream_transformer_to_diffusers)
    "hidream": Case(
        family="hidream", cls="HiDreamImageTransformer2DModel", config=HIDREAM_TINY,
        pipeline="HiDreamImagePipeline", targets=HIDREAM_TARGETS,
        single_file=sfu.convert_hidream_transformer_to_diffusers,
        native_converter=lcu._convert_non_diffusers_hidream_lora_to_diffusers, native_alpha=False,
        source="HiDream-ai/HiDream-I1; ComfyUI comfy/lora.py; diffusers HiDream converters",
    ),
}


def _patched(fn: Callable, replacements: dict[str, str]) -> Callable:
    """``fn`` recompiled from its own source with ``replacements`` applied (each must occur)."""
    import inspect
    import textwrap

    src = textwrap.dedent(inspect.getsource(fn))
    for old, new in replacements.items():
        assert old in src, (fn.__name__, old)
        src = src.replace(old, new)
    namespace = dict(fn.__globals__)
    exec(compile(src, inspect.getsourcefile(fn), "exec"), namespace)
    return namespace[fn.__name__]


@contextlib.contextmanager
def patched_converters(case: Case):
    """diffusers' converters of ``case.patches`` with the tiny widths, wherever diffusers looks them up."""
    from diffusers.loaders import lora_pipeline

    saved = []
    for name, replacements in case.patches.items():
        for module in (lcu, sfu, lora_pipeline):
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, _patched(getattr(module, name), replacements))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def converter(case: Case, fn: Callable) -> Callable:
    """``fn`` as diffusers would run it on the tiny model (patched for its width when ``case`` says so)."""
    return _patched(fn, case.patches[fn.__name__]) if fn.__name__ in case.patches else fn


def tiny_model(case: Case, config: dict | None = None, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, case.cls)(**(config or case.config))
    if case.resize is not None:
        case.resize(model)
    model = model.double().eval()
    # biases and norm scales start at 0 / 1 in some classes: randomise every parameter so a misplaced
    # row range or swapped half cannot pass by accident
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def native_checkpoint(case: Case, state: dict[str, torch.Tensor], prefix: str | None = None) -> dict:
    """The native single file of a diffusers state dict: each native module's parts stacked by rows (halves
    swapped where the naming says), native parameters renamed. Checked against diffusers' converter by the
    tests before any use."""
    spec = dit.get(case.family)
    naming = spec.primary
    prefix = case.sf_prefix if prefix is None else prefix
    out: dict[str, torch.Tensor] = {}
    fused_parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        # parameters first: norm scales whose module is LoRA-able too are stored as ``.scale`` (BFL)
        param = spec.param_naming.native_of(name) if spec.param_naming is not None else None
        if param is not None:
            out[prefix + param[0]] = tensor.clone()
            continue
        module, _, suffix = name.rpartition(".")
        hit = naming.native_of(module) if suffix in ("weight", "bias") else None
        assert hit is not None, f"{case.family}: no native name for {name}"
        fused_parts.setdefault((hit[0], suffix), {})[hit[1]] = tensor
    for (native, suffix), parts in fused_parts.items():
        targets = naming.diffusers_of(native)
        assert len(parts) == len(targets), (native, sorted(parts))
        t = torch.cat([parts[i] for i in range(len(targets))], dim=0)
        if len(targets) == 1 and naming.swapped(native, None):
            a, b = t.chunk(2)
            t = torch.cat([b, a])
        out[f"{prefix}{native}.{suffix}"] = t.clone()
    return out


def check_native_checkpoint(case: Case, native: dict, state: dict) -> None:
    """diffusers' own single-file converter turns ``native`` back into ``state``, tensor for tensor."""
    back = converter(case, case.single_file)(copy.copy(dict(native)))
    assert set(back) == set(state), sorted(set(back) ^ set(state))[:8]
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def weight_of(case: Case, state: dict, native: str) -> torch.Tensor:
    """The native module's weight (fused parts stacked) from a diffusers state dict."""
    spec = dit.get(case.family)
    parts = [state[t + ".weight"] for t in spec.primary.diffusers_of(native)]
    return torch.cat(parts, dim=0)


def lora_factors(case: Case, state: dict, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """{native path: (down, up, alpha)} for every target; alpha None where diffusers ignores it."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, native in enumerate(case.targets):
        w = weight_of(case, state, native)
        r = 2 + n % 3
        down = torch.randn(r, *w.shape[1:], generator=gen, dtype=torch.float64) * 0.2
        up = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=gen, dtype=torch.float64) * 0.2
        alpha = None if native in case.alpha_ignored else float(1 + n % 4)
        out[native] = (down, up, alpha)
    return out


def native_lora(case: Case, factors: dict, seed: int = 7, down_up: tuple[str, str] = ("lora_A", "lora_B"),
                prefix: str | None = None, names: dict | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prefix = case.native_prefix if prefix is None else prefix
    sd = {}
    for path, (down, up, alpha) in factors.items():
        native = (names or {}).get(path, path)
        sd[f"{prefix}{native}.{down_up[0]}.weight"] = down.clone()
        sd[f"{prefix}{native}.{down_up[1]}.weight"] = up.clone()
        if alpha is not None and case.native_alpha:
            sd[f"{prefix}{native}.alpha"] = torch.tensor(alpha, dtype=torch.float64)
        if path in case.diff_b:
            sd[f"{prefix}{native}.diff_b"] = torch.randn(up.shape[0], generator=gen, dtype=torch.float64) * 0.1
    return sd


def kohya_lora(factors: dict, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    sd = {}
    for native, (down, up, alpha) in factors.items():
        head = prefix + native.replace(".", "_")
        sd[head + ".lora_down.weight"] = down.clone()
        sd[head + ".lora_up.weight"] = up.clone()
        sd[head + ".alpha"] = torch.tensor(float(down.shape[0]) if alpha is None else alpha, dtype=torch.float64)
    return sd


def kohya_split_lora(case: Case, factors: dict, state: dict) -> dict[str, torch.Tensor]:
    """kohya keys in diffusers' module names: a fused native module's LoRA (shared down, up stacked by rows)
    written as one LoRA per diffusers part, up cut at the part's rows in the diffusers state dict."""
    naming = dit.get(case.family).primary
    split = {}
    for native in case.kohya_targets:
        down, up, alpha = factors[native]
        at = 0
        for part in naming.diffusers_of(native):
            rows = state[part + ".weight"].shape[0]
            split[part] = (down, up[at:at + rows], alpha)
            at += rows
        assert at == up.shape[0], native
    return kohya_lora(split)


def fused_state(model) -> dict[str, torch.Tensor]:
    """The model's weights after ``fuse_lora``, under the plain (adapter-free) names."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def pipeline_class(case: Case):
    """The diffusers pipeline (or, where only a modular pipeline exists, its LoRA loader mixin) of ``case``; the
    case's own loader where diffusers has none."""
    import diffusers
    from diffusers.loaders import lora_pipeline

    if case.lora_loader is not None:
        return case.lora_loader
    return getattr(diffusers, case.pipeline, None) or getattr(lora_pipeline, case.pipeline)


def diffusers_fuse(case: Case, model, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The oracle: diffusers' pipeline loader converts ``lora``, PEFT injects it into ``model``, ``fuse_lora``."""
    with patched_converters(case):
        state = pipeline_class(case).lora_state_dict({k: v.clone() for k, v in lora.items()})
    state = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in state.items()}
    model.load_lora_adapter(state, prefix="transformer")
    model.fuse_lora()
    return fused_state(model)


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """{module path: ΔW (and path + ".bias": Δb)} of every PEFT LoRA layer injected in ``model`` (PEFT's own
    ``get_delta_weight`` and ``scaling``)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for adapter in mod.lora_A:
            out[name] = mod.get_delta_weight(adapter).double()
            bias = mod.lora_B[adapter].bias
            if bias is not None:
                out[name + ".bias"] = (bias * mod.scaling[adapter]).double()
    return out
