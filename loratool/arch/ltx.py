"""LTX-Video (0.9.x, 2B / 13B) and LTX-2 (audio + video): Lightricks' naming (LTX-Video / LTX-2 repositories,
ComfyUI; diffusion-pipe and LTX-Video-Trainer write LoRAs as ``diffusion_model.transformer_blocks.0.attn1.to_q``)
is diffusers' ``LTXVideoTransformer3DModel`` / ``LTX2VideoTransformer3DModel`` naming but for a few words, renamed
by table (diffusers' ``convert_ltx_transformer_checkpoint_to_diffusers`` / ``convert_ltx2_transformer_to_diffusers``
and ``_convert_non_diffusers_ltx2_lora_to_diffusers`` list the same words):

============================================  ==========================================
Lightricks                                    diffusers
============================================  ==========================================
``patchify_proj`` / ``audio_patchify_proj``   ``proj_in`` / ``audio_proj_in``
``adaln_single.*`` / ``audio_adaln_single.*``  ``time_embed.*`` / ``audio_time_embed.*``
``attn1.q_norm`` / ``k_norm``                 ``attn1.norm_q`` / ``norm_k``
``av_ca_video_scale_shift_adaln_single``      ``av_cross_attn_video_scale_shift`` (LTX-2; likewise the
                                              other three audio-video modulations)
``scale_shift_table_a2v_ca_video``            ``video_a2v_cross_attn_scale_shift_table`` (LTX-2 blocks)
============================================  ==========================================

diffusers' LTX-Video LoRA converter only strips ``diffusion_model.`` (it would not find a LoRA on
``patchify_proj`` / ``adaln_single``); loratool renames those too.
"""

from __future__ import annotations

from collections.abc import Mapping

from loratool.arch import dit

_NORMS = ((r"\.norm_q$", ".q_norm"), (r"\.norm_k$", ".k_norm"))
LTXV_RENAMES = ((r"^proj_in$", "patchify_proj"), (r"^time_embed\.", "adaln_single."), *_NORMS)
LTX2_RENAMES = (
    (r"^proj_in$", "patchify_proj"), (r"^audio_proj_in$", "audio_patchify_proj"),
    (r"^time_embed\.", "adaln_single."), (r"^audio_time_embed\.", "audio_adaln_single."),
    (r"^av_cross_attn_video_scale_shift\.", "av_ca_video_scale_shift_adaln_single."),
    (r"^av_cross_attn_video_a2v_gate\.", "av_ca_a2v_gate_adaln_single."),
    (r"^av_cross_attn_audio_scale_shift\.", "av_ca_audio_scale_shift_adaln_single."),
    (r"^av_cross_attn_audio_v2a_gate\.", "av_ca_v2a_gate_adaln_single."),
    (r"\.video_a2v_cross_attn_scale_shift_table$", ".scale_shift_table_a2v_ca_video"),
    (r"\.audio_a2v_cross_attn_scale_shift_table$", ".scale_shift_table_a2v_ca_audio"),
    *_NORMS,
)
SIZES = {2048: "2B", 4096: "13B"}  # LTX-Video attention width


def ltxv_variant(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    width = next((s[1] for p, s in shapes.items() if p.endswith("attn1.to_q")), None)
    return SIZES.get(width) if width else None


def ltxv_base_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    q = shapes.get("transformer_blocks.0.attn1.to_q.weight")
    return SIZES.get(q[1]) if q else None


LTX_VIDEO = dit.DitFamily(
    name="ltx_video",
    title="LTX-Video",
    table="ltx_video_modules",
    diffusers_class="LTXVideoTransformer3DModel",
    pipelines=("LTXPipeline", "LTXImageToVideo", "LTXCondition", "LTXI2V"),
    block_lists=("transformer_blocks",),
    renames=LTXV_RENAMES,
    metadata=("ltx-video", "ltxv", "ltx_video"),
    not_metadata=("ltx-2", "ltx2"),
    markers=(r"^(patchify_proj|adaln_single\.)",),
    single_file_marks=("adaln_single.linear.weight", "transformer_blocks.0.attn1.to_q.weight"),
    single_file_not=("audio_adaln_single.linear.weight",),
    variant=ltxv_variant,
    base_variant=ltxv_base_variant,
)
LTX2 = dit.DitFamily(
    name="ltx2",
    title="LTX-2",
    table="ltx2_modules",
    diffusers_class="LTX2VideoTransformer3DModel",
    pipelines=("LTX2",),
    block_lists=("transformer_blocks",),
    renames=LTX2_RENAMES,
    metadata=("ltx-2", "ltx2"),
    markers=(r"(^|\.)audio_", r"^av_c", r"(audio_to_video|video_to_audio)_attn"),
    single_file_marks=("audio_adaln_single.linear.weight",),
)
SPECS = (LTX_VIDEO, LTX2)
FAMILIES = [s.family for s in SPECS]
