"""What a layer is where a LoRA's names and factor shapes do not say (``layer_kinds.json``,
generated from the real model classes by ``scripts/gen_layer_kinds.py``).

* :func:`conv_kernel`: the kernel of a ``Conv2d`` of an image-model family. LyCORIS stores a LoHa
  / LoKr on a k×k conv without Tucker core as a flattened product [out, in·kh·kw], which nothing
  in the file tells apart from a Linear of in·kh·kw inputs.
* :func:`conv1d_paths` / :func:`is_conv1d`: which modules of a transformers model are ``Conv1D``
  (GPT-2 family: weight stored [in, out], what PEFT decides ``fan_in_fan_out`` from, per module).
  Every model type whose modeling file builds a ``Conv1D`` is in the table, so a transformers
  model type that is not has no such layer.
"""

from __future__ import annotations

import re
from functools import cache

from loratool.arch import load_table

_INDEX = re.compile(r"\.\d+\.")


@cache
def _kernels(family: str, component: str) -> dict[str, tuple[int, ...]]:
    by_kernel = load_table("layer_kinds")["conv_kernels"].get(family, {}).get(component, {})
    return {path: tuple(int(k) for k in kernel.split("x")) for kernel, paths in by_kernel.items() for path in paths}


def conv_kernel(family: str | None, component: str, path: str) -> tuple[int, ...] | None:
    """(kh, kw) of the conv at ``path`` in ``family``'s ``component``, or None when it is not a known conv."""
    return _kernels(family or "", component).get(path)


def conv1d_paths(model_type: str | None = None, parent_library: str | None = None) -> tuple[str, ...] | None:
    """The ``Conv1D`` module paths (``h.N.attn.c_attn``...) of a transformers model named by its
    ``model_type`` or modeling package (PEFT ``auto_mapping.parent_library``:
    ``transformers.models.gpt2.modeling_gpt2``); () for a transformers model without any, None
    when neither names a transformers model."""
    table = load_table("layer_kinds")["conv1d"]
    if model_type:
        return tuple(table[model_type]["paths"]) if model_type in table else ()
    parts = (parent_library or "").split(".")
    if len(parts) >= 3 and parts[:2] == ["transformers", "models"]:
        return next((tuple(e["paths"]) for e in table.values() if e["module"] == parts[2]), ())
    return None


def is_conv1d(paths: tuple[str, ...], path: str) -> bool:
    """Whether module ``path`` (any prefix: ``transformer.h.0.attn.c_attn`` or ``h.0.attn.c_attn``)
    is one of the ``Conv1D`` ``paths`` (layer indices written ``N``)."""
    norm = _INDEX.sub(".N.", f".{path}.")[1:-1]
    return any(norm == p or norm.endswith("." + p) for p in paths)


def conv1d_naming(paths: list[str]) -> tuple[str, ...]:
    """The ``Conv1D`` paths of every model type in which one of ``paths`` is a ``Conv1D`` (GPT-2,
    ImageGPT, GPT... share their names), for an adapter that says its model has Conv1D layers but
    not which model it is."""
    out: dict[str, None] = {}
    for entry in load_table("layer_kinds")["conv1d"].values():
        if any(is_conv1d(tuple(entry["paths"]), p) for p in paths):
            out.update(dict.fromkeys(entry["paths"]))
    return tuple(out)
