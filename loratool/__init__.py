"""loratool: convert, merge, stack, resize, extract and inspect LoRA adapter checkpoints."""

from loratool.adapter import Adapter, LoraModule
from loratool.api import load, save
from loratool.errors import LoratoolError

__version__ = "0.1.0"

__all__ = ["Adapter", "LoraModule", "LoratoolError", "load", "save", "__version__"]
