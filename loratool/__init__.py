"""loratool: convert, merge, stack, resize, extract and inspect LoRA adapter checkpoints."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from loratool.adapter import Adapter, LoraModule
    from loratool.api import load, save

__version__ = "0.1.0"

__all__ = ["Adapter", "LoraModule", "LoratoolError", "load", "save", "__version__"]

# The public names that need torch are imported on first use: the command line parses its
# arguments and starts copying a merge's base while torch (seconds to import) is still loading.
_LAZY = {"Adapter": "loratool.adapter", "LoraModule": "loratool.adapter", "load": "loratool.api",
         "save": "loratool.api"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loratool' has no attribute {name!r}")
