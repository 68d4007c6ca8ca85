"""Which block of its model a module is in, for per-block summaries (``info --stats`` / ``--plot``, ``diff``).

A block is the module path's first segment, with the index after it when there is one (wrappers
such as ``text_model.encoder.`` / ``model.`` dropped first): ``down_blocks.1``, ``mid_block``,
``up_blocks.2`` (SD U-Nets), ``transformer_blocks.3`` / ``single_transformer_blocks.10`` (DiT double /
single-stream blocks), ``layers.5`` (LLM and CLIP layers), ``conv_in``. Labels shorten the common block
lists (``down.1``, ``mid``, ``double.3``, ``single.10``, ``layer.5``) and tag the text encoders of image
models (``te:layer.5``, ``te2:…``); blocks follow the model's order (:data:`ORDER`), then their index.

Per block, with per-module stats: ``norm`` = √(Σ ‖ΔWᵢ‖F²) (the Frobenius norm of the block's ΔW taken as one
vector), ``effective_rank`` = the mean of the modules' effective ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

# Leading path segments that wrap a model's block list (HF CLIP, transformers LMs, GPT-2, T5 encoders).
WRAPPERS = ("text_model.encoder.", "model.", "transformer.", "encoder.", "decoder.")
SHORT = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up", "transformer_blocks": "double",
         "single_transformer_blocks": "single", "layers": "layer", "h": "layer", "block": "layer", "blocks": "block"}
# The order a model's parts run in; unknown ones come after, by name.
ORDER = {name: i for i, name in enumerate((
    "conv_in", "time_embedding", "add_embedding", "embeddings", "embed_tokens", "wte", "x_embedder", "pos_embed",
    "context_embedder", "time_text_embed", "down_blocks", "mid_block", "up_blocks", "transformer_blocks",
    "single_transformer_blocks", "blocks", "layers", "h", "block", "final_layer_norm", "norm", "norm_out",
    "conv_norm_out", "conv_out", "proj_out", "ln_f", "lm_head"))}
COMPONENT_TAGS = {"text_encoder": "te", "text_encoder_2": "te2", "text_encoder_3": "te3"}


def block_of(path: str) -> str:
    """``down_blocks.1``, ``mid_block``, ``layers.5``: the block a canonical module path is in."""
    for wrapper in WRAPPERS:
        if path.startswith(wrapper):
            path = path[len(wrapper):]
            break
    segs = path.split(".")
    return ".".join(segs[:2]) if len(segs) > 1 and segs[1].isdigit() else segs[0]


def label(component: str, block: str) -> str:
    head, _, index = block.partition(".")
    short = SHORT.get(head, head) + (f".{index}" if index else "")
    tag = COMPONENT_TAGS.get(component)
    return f"{tag}:{short}" if tag else short


def sort_key(components: Sequence[str], component: str, block: str) -> tuple:
    """The model's own part (U-Net, transformer, LM) first, its text encoders after, in the adapter's order."""
    head, _, index = block.partition(".")
    order = components.index(component) if component in components else len(components)
    return component in COMPONENT_TAGS, order, ORDER.get(head, len(ORDER)), head, int(index) if index.isdigit() else -1


def grouped(items: Iterable[Any]) -> list[tuple[str, str, list[Any]]]:
    """[(component, block, items)] in model order; ``items`` have ``component`` and ``path``."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for item in items:
        groups.setdefault((item.component, block_of(item.path)), []).append(item)
    components = list(dict.fromkeys(c for c, _ in groups))
    keys = sorted(groups, key=lambda k: sort_key(components, *k))
    return [(c, b, groups[(c, b)]) for c, b in keys]


def block_summary(modules: Iterable[Any]) -> list[dict[str, Any]]:
    """Per block of modules carrying ``stats`` (:class:`loratool.ops.inspect.ModuleInfo`): label, module
    count, ‖ΔW‖F of the block and the mean effective rank (module docstring)."""
    out = []
    for component, block, items in grouped(m for m in modules if m.stats is not None):
        out.append({
            "block": label(component, block),
            "component": component,
            "module_count": len(items),
            "norm": math.sqrt(sum(m.stats.norm ** 2 for m in items)),
            "effective_rank": sum(m.stats.effective_rank for m in items) / len(items),
        })
    return out
