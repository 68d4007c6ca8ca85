"""loratool: convert, merge, stack, resize, extract and inspect LoRA adapter checkpoints.

    import loratool
    adapter = loratool.load("style.safetensors")      # any layout -> Adapter
    adapter["unet", "down_blocks.0.attentions.0.proj_in"].scale
    loratool.resize("style.safetensors", 8, output="style_r8.safetensors")
    loratool.merge("base.safetensors", ["style.safetensors"], "merged.safetensors", strengths=0.7)

Every operation is a function here with the command line's arguments (docs/python-api.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from loratool.adapter import Adapter, LoraModule
    from loratool.api import convert, extract, inspect, load, merge, resize, save, stack

__version__ = "0.1.0"

__all__ = ["Adapter", "LoraModule", "LoratoolError", "convert", "extract", "inspect", "load", "merge", "resize",
           "save", "stack", "__version__"]

# The public names that need torch are imported on first use: the command line parses its
# arguments and starts copying a merge's base while torch (seconds to import) is still loading.
_LAZY = {"Adapter": "loratool.adapter", "LoraModule": "loratool.adapter",
         **{name: "loratool.api" for name in ("convert", "extract", "inspect", "load", "merge", "resize", "save",
                                              "stack")}}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loratool' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names only (subpackages are reachable as ``loratool.ops`` ... but not listed)."""
    return sorted(__all__)
