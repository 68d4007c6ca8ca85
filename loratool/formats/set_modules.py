"""``set`` modules (a weight replaced outright: BFL control LoRAs' qk-norm scales) in layouts that
have no such module kind.

diffusers' own converter (``_convert_bfl_flux_control_lora_to_diffusers``) writes them as whole
weights beside the LoRA keys (``transformer.transformer_blocks.0.attn.norm_q.weight``) and its
loader puts them into the model outright; PEFT's ``modules_to_save`` tensors mean the same. So the
diffusers and PEFT writers store each ``set`` module as an extra whole tensor ``<path>.weight``,
which every reader of those layouts reads back as a replacement.
"""

from __future__ import annotations

from dataclasses import replace

from loratool.adapter import Adapter
from loratool.errors import FormatError


def as_whole_weights(adapter: Adapter) -> Adapter:
    """``adapter`` with every ``set`` module moved to ``extras`` (the input is left as it is)."""
    sets = [m for m in adapter if m.kind == "set"]
    if not sets:
        return adapter
    out = replace(adapter, modules={k: m for k, m in adapter.modules.items() if m.kind != "set"},
                  extras=dict(adapter.extras))
    for m in sets:
        key = (m.component, m.path + ".weight")
        if key in out.extras:
            raise FormatError(f"{m.component}:{m.path}: set twice (a module and a whole tensor)")
        out.extras[key] = m.tensors["value"]
    return out
