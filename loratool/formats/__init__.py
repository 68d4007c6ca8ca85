"""Layout registry: each layout module exposes ``NAME``, ``detect``, ``read`` and ``write``.

* ``detect(src: Source) -> bool`` looks only at ``src.keys`` / ``src.metadata`` / ``src.config``.
* ``read(src: Source, opts: ReadOptions) -> Adapter``.
* ``write(adapter: Adapter, out: Path, opts: WriteOptions) -> list[Path]`` writes atomically
  (through :mod:`loratool.io.atomic`) and returns what it wrote.

Detection tries layouts in ``DETECT_ORDER``; the first that claims the file wins.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from loratool.errors import FormatError

LAYOUTS = ("kohya", "diffusers", "peft", "loralib", "lycoris", "gguf", "native", "mlx", "lora_diffusion")
# LyCORIS before kohya (same key naming, more kinds); PEFT before diffusers (diffusers'
# current style is PEFT keys behind a component prefix); loralib last (bare lora_A/lora_B).
# native (ComfyUI ``diffusion_model.`` keys) early: diffusion-pipe puts an adapter_config.json beside them;
# MLX before PEFT likewise (its folder has an adapter_config.json too).
DETECT_ORDER = ("gguf", "native", "lora_diffusion", "mlx", "peft", "lycoris", "kohya", "diffusers", "loralib")
WRITABLE = ("kohya", "diffusers", "peft", "loralib", "gguf", "native", "mlx")
MODULES = {"gguf": "gguf_lora"}  # layout name -> module, where they differ


@dataclass
class ReadOptions:
    # Module-path vocabulary from a base model: {component: set of dotted module paths}.
    vocabulary: dict[str, set[str]] | None = None
    # Model family to assume when restoring names (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``llm``...).
    family: str | None = None


@dataclass
class WriteOptions:
    force: bool = False
    inputs: tuple[Any, ...] = ()  # paths the output must not overwrite
    family: str | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)
    # The base model's HF config.json (llama.cpp GGUF adapters name tensors after its architecture).
    model_config: dict[str, Any] | None = None


def layout(name: str) -> ModuleType:
    if name not in LAYOUTS:
        raise FormatError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return importlib.import_module(f"loratool.formats.{MODULES.get(name, name)}")


def detect(src) -> str:
    return detect_dialect(src)[0]


def detect_dialect(src) -> tuple[str, str | None]:
    """(layout, dialect) of ``src`` from its keys and metadata: the dialect ``info`` reports (a trainer's
    variant of the layout, or the layout's own fixed one: lora_diffusion's, MLX's), None for the plain form."""
    if src.parts:  # a folder of component folders: one layout for all of them
        found = {detect_dialect(part) for part in src.parts}
        names = {name for name, _ in found}
        if len(names) != 1:
            raise FormatError(f"{src.path}: component folders hold different layouts ({', '.join(sorted(names))})")
        return found.pop() if len(found) == 1 else (names.pop(), None)
    from loratool.formats import dialects

    dialect = dialects.detect(src)  # a trainer's variant of a layout (its reader hands it to dialect_read)
    if dialect is not None:
        return dialect.layout, dialect.name
    for name in DETECT_ORDER:
        module = layout(name)
        if module.detect(src):
            return name, getattr(module, "DIALECT", None)
    sample = ", ".join(src.keys[:3]) or "no tensors"
    raise FormatError(f"{src.path}: unknown LoRA layout (first keys: {sample})")
