"""What a layer is where a LoRA's names and factor shapes do not say (``layer_kinds.json``,
generated from the real model classes by ``scripts/gen_layer_kinds.py``).

* :func:`conv_kernel`: the kernel of a ``Conv2d`` of an image-model family. LyCORIS stores a LoHa
  / LoKr on a k×k conv without Tucker core as a flattened product [out, in·kh·kw], which nothing
  in the file tells apart from a Linear of in·kh·kw inputs.
* :func:`conv1d`: whether a module of a transformers model type is a ``Conv1D`` (GPT-2 family:
  weight stored [in, out], PEFT's per-module ``fan_in_fan_out``). Every model type whose modeling
  file builds a ``Conv1D`` is in the table, so a type that is not has no such layer.
"""

from __future__ import annotations

import re
from functools import cache

from loratool.arch import load_table

_INDEX = re.compile(r"\.\d+\.")


@cache
def _conv1d_paths() -> dict[str, tuple[str, ...]]:
    return {mt: tuple(entry["paths"]) for mt, entry in load_table("layer_kinds")["conv1d"].items()}


def conv_kernel(family: str | None, component: str, path: str) -> tuple[int, ...] | None:
    """(kh, kw) of the conv at ``path`` in ``family``'s ``component``, or None when it is not a known conv."""
    kernel = load_table("layer_kinds")["conv_kernels"].get(family or "", {}).get(component, {}).get(path)
    return tuple(int(k) for k in kernel) if kernel is not None else None


def conv1d_model_types() -> tuple[str, ...]:
    return tuple(_conv1d_paths())


def model_type_of_module(parent_library: str) -> str | None:
    """The model_type whose modeling package is ``parent_library`` (PEFT ``auto_mapping``, e.g.
    ``transformers.models.gpt2.modeling_gpt2``); None when it names no package or one without Conv1D."""
    parts = parent_library.split(".")
    if len(parts) < 3 or parts[:2] != ["transformers", "models"]:
        return None
    table = load_table("layer_kinds")["conv1d"]
    return next((mt for mt, entry in table.items() if entry["module"] == parts[2]), None)


def conv1d(model_type: str, path: str) -> bool:
    """Whether ``path`` (any prefix: ``transformer.h.0.attn.c_attn`` or ``h.0.attn.c_attn``) is a
    ``Conv1D`` in transformers' ``model_type`` (False for a type the table does not list)."""
    norm = _INDEX.sub(".N.", f".{path}.")[1:-1]
    return any(norm == p or norm.endswith("." + p) for p in _conv1d_paths().get(model_type, ()))


def conv1d_candidates(paths: list[str]) -> list[str]:
    """The Conv1D model types in which at least one of ``paths`` is a ``Conv1D``."""
    return [mt for mt in _conv1d_paths() if any(conv1d(mt, p) for p in paths)]
