"""CLIP text-encoder naming: the canonical path keeps HF's ``text_model.`` wrapper.

transformers 5 flattens ``CLIPTextModel`` (``encoder.layers.0...``) while checkpoints on disk,
kohya files, diffusers files and ``CLIPTextModelWithProjection`` keep ``text_model.``; adapters
saved from a flattened model are brought to the wrapped form on read, and writers that need the
file's own spelling find it in ``hints["file_path"]``.
"""

from __future__ import annotations

CLIP_COMPONENTS = ("text_encoder", "text_encoder_2")
CLIP_FLAT_STARTS = ("encoder.layers.", "embeddings.", "final_layer_norm")
TEXT_MODEL = "text_model."


def canonical_clip_path(component: str, path: str) -> str:
    """``encoder.layers.0.self_attn.q_proj`` -> ``text_model.encoder.layers.0.self_attn.q_proj`` for CLIP components."""
    if component in CLIP_COMPONENTS and path.startswith(CLIP_FLAT_STARTS):
        return TEXT_MODEL + path
    return path
