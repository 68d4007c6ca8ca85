"""Which way round a base checkpoint stores each adapted Linear weight: the base decides.

A Linear ΔW is [out, in]; transformers' ``Conv1D`` (GPT-2 family) stores its weight [in, out],
which PEFT handles per layer from the layer's class (``fan_in_fan_out``). An adapter file only
hints at it (PEFT's config keeps the last module's flag; kohya / loralib carry a guess or a
sidecar), so at merge time each Linear LoRA module is oriented from the base:

* a non-square weight: its stored shape says it ([out, in] or [in, out]);
* a square one: the base's architecture, when its ``config.json`` names a transformers
  ``model_type`` (:mod:`loratool.arch.layer_kinds` lists every ``Conv1D`` of every model type);
* otherwise the adapter's own flag stands.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

from loratool.adapter import LoraModule
from loratool.arch.layer_kinds import conv1d_paths, is_conv1d
from loratool.io.model_config import model_type


@cache
def _conv1d_of(folder: Path) -> tuple[str, ...] | None:
    mt = model_type(folder)
    return conv1d_paths(model_type=mt) if mt else None


def oriented(module: LoraModule, stored: tuple[int, ...], weight_file: Path, key: str) -> LoraModule:
    """``module`` with ``fan_in_fan_out`` as the base weight ``key`` (canonical orientation ``stored``,
    in ``weight_file``) needs it; the module itself when it already fits."""
    t = module.tensors
    if module.kind != "lora" or module.layer != "linear" or "mid" in t or t["down"].dim() != 2 or len(stored) != 2:
        return module
    out, inp = int(t["up"].shape[0]), int(t["down"].shape[1])
    stored = tuple(int(s) for s in stored)
    if out != inp:
        if stored not in ((out, inp), (inp, out)):
            return module  # a real mismatch: the shape check reports it
        want = stored == (inp, out)
    else:
        conv1d = _conv1d_of(weight_file.parent)
        if conv1d is None:
            return module
        want = is_conv1d(conv1d, key.removesuffix(".weight"))
    return module if module.fan_in_fan_out == want else replace(module, fan_in_fan_out=want)
