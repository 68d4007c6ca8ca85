"""What a layout reader is handed: the file's keys and metadata now, its tensors on demand.

``open_source`` accepts a ``.safetensors`` file, a pickled ``.pt`` / ``.bin`` / ``.pth``
(``weights_only=True``), a PEFT folder (``adapter_config.json`` + ``adapter_model.*``), a folder of
such folders, one per component (``P/unet``, ``P/text_encoder``: what ``convert --to peft`` writes for
a pipeline adapter; its :attr:`Source.parts`, read and joined into one adapter), or an ``hf://``
reference to any of these. Detection only needs ``keys`` and ``metadata``, so an
``info`` without ``--stats`` never reads tensor bytes from a safetensors file.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import InputError
from loratool.header_only import NeedsTorch, ShapeTensor, StoredDtype, decode_scalar
from loratool.io import hub
from loratool.io.pickle_safe import load_pickle_state_dict
from loratool.io.safetensors_file import ITEMSIZES, SafetensorsFile, TensorInfo

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Weight files that come with an adapter_config.json beside them (PEFT's; MLX-LM's adapters.safetensors,
# whose folder may also hold training checkpoints NNNNNNN_adapters.safetensors).
CONFIGURED_WEIGHTS = (*PEFT_WEIGHTS, "adapters.safetensors")


@dataclass(eq=False)
class Source:
    path: Path  # the weights file
    folder: Path | None = None  # the PEFT folder, when the input was one
    config: dict[str, Any] | None = None  # adapter_config.json, or a loralib sidecar
    config_path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    _safetensors: SafetensorsFile | None = None
    _tensors: dict[str, torch.Tensor] | None = None
    # A folder of component folders: one source per component folder (then this one holds no tensors).
    parts: list[Source] = field(default_factory=list)

    @functools.cached_property
    def keys(self) -> list[str]:  # cached: every layout's detect() reads it
        if self.parts:
            return [k for part in self.parts for k in part.keys]
        if self._safetensors is not None:
            return self._safetensors.keys()
        return list(self.tensors)

    @property
    def files(self) -> list[Path]:
        """Every file this source reads (weights and config)."""
        if self.parts:
            return [f for part in self.parts for f in part.files]
        return [self.path] + ([self.config_path] if self.config_path is not None else [])

    @property
    def file_size(self) -> int:
        return sum(f.stat().st_size for f in self.files) if self.parts else self.path.stat().st_size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape (from the header when there is one: no torch dtypes looked up)."""
        if self.parts:
            return {k: v for part in self.parts for k, v in part.shapes().items()}
        if self._safetensors is not None:
            return {k: v.shape for k, v in self._safetensors.header.tensors.items()}
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def tensor_infos(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of every tensor, from the header when there is one."""
        if self.parts:
            return {k: v for part in self.parts for k, v in part.tensor_infos().items()}
        if self._safetensors is not None:
            infos: dict[str, TensorInfo] = self._safetensors.header.tensors
            return {k: (v.shape, v.dtype) for k, v in infos.items()}
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self.parts:
            return {k: v for part in self.parts for k, v in part.tensors.items()}
        if self._tensors is None:
            if self._safetensors is not None:
                self._tensors = self._safetensors.load_all()
            else:
                self._tensors = load_pickle_state_dict(self.path)
        return self._tensors


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object")
    return obj


def component_folders(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` that are PEFT adapter folders named after a model component
    (``unet``, ``text_encoder``...: what a pipeline adapter is saved as), when ``folder`` itself holds
    no weights. Adapter folders with other names make a library of adapters, not one adapter."""
    from loratool.components import COMPONENTS

    if any((folder / name).is_file() for name in PEFT_WEIGHTS) or any(folder.glob("*.safetensors")):
        return []
    found = sorted(sub for sub in folder.iterdir() if sub.is_dir() and (sub / "adapter_config.json").is_file()
                   and any((sub / name).is_file() for name in PEFT_WEIGHTS))
    return found if found and all(sub.name in COMPONENTS for sub in found) else []


def open_source(path: str | os.PathLike, config: str | os.PathLike | None = None) -> Source:
    """Open an adapter for reading; ``config`` is an explicit sidecar / adapter_config path."""
    p = hub.resolve(path)
    if hub.is_hub_ref(path) and p.is_file() and p.name in PEFT_WEIGHTS:
        # A PEFT file from the hub needs its config beside it.
        try:
            cfg = hub.resolve(str(path).rsplit("/", 1)[0] + "/adapter_config.json")
            if cfg.parent == p.parent:
                p = p.parent
        except InputError:
            pass
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    folder = None
    cfg_path = Path(config) if config is not None else None
    if p.is_dir() and config is None and component_folders(p):
        return Source(path=p, folder=p, parts=[open_source(sub) for sub in component_folders(p)])
    if p.is_dir():
        folder = p
        weights = [p / name for name in CONFIGURED_WEIGHTS if (p / name).is_file()]
        if not weights:
            cands = sorted(p.glob("*.safetensors"))
            if len(cands) != 1:
                raise InputError(
                    f"{p}: folder holds no adapter_model.safetensors / adapter_model.bin "
                    f"(and not exactly one .safetensors file, nor component folders with adapter_config.json)"
                )
            weights = cands
        if cfg_path is None and (p / "adapter_config.json").is_file():
            cfg_path = p / "adapter_config.json"
        p = weights[0]
    elif cfg_path is None:
        sidecar = p.with_name(p.name + ".json")
        if sidecar.is_file():
            cfg_path = sidecar
        elif (p.parent / "adapter_config.json").is_file() and p.name in CONFIGURED_WEIGHTS:
            folder = p.parent
            cfg_path = p.parent / "adapter_config.json"
    if cfg_path is not None and not cfg_path.exists():
        raise InputError(f"{cfg_path}: no such config file")
    cfg = _read_json(cfg_path) if cfg_path is not None else None
    src = Source(path=p, folder=folder, config=cfg, config_path=cfg_path)
    if p.suffix.lower() == ".gguf":  # llama.cpp LoRA adapters
        from loratool.formats.gguf_lora import open_gguf

        src._tensors, src.metadata = open_gguf(p)
    elif p.suffix.lower() not in PICKLE_SUFFIXES:
        src._safetensors = SafetensorsFile(p)
        src.metadata = dict(src._safetensors.metadata)
    elif not p.is_file():
        raise InputError(f"{p}: no such file")
    # a pickle is loaded (with torch, weights only) when its keys or tensors are first asked for
    return src


def header_view(src: Source) -> Source | None:
    """``src`` with :class:`~loratool.header_only.ShapeTensor` stand-ins for its tensors, read
    without torch and without tensor data (one-element tensors are read: alphas are data); None
    when ``src`` cannot be described that way (a pickle the header-only unpickler refuses)."""
    if src.parts:  # a folder of component folders: a view of each
        views = [header_view(part) for part in src.parts]
        if any(v is None for v in views):
            return None
        return Source(path=src.path, folder=src.folder, parts=views)
    if src._tensors is not None and src._safetensors is None:
        return None  # already in memory: nothing to save
    try:
        if src._safetensors is not None:
            tensors = _header_tensors(src._safetensors)
        else:
            from loratool.io.pickle_header import pickle_shapes

            tensors = pickle_shapes(src.path)
    except NeedsTorch:
        return None
    if tensors is None:
        return None
    return Source(path=src.path, folder=src.folder, config=src.config, config_path=src.config_path,
                  metadata=dict(src.metadata), _tensors=tensors)


def _header_tensors(file: SafetensorsFile) -> dict[str, ShapeTensor]:
    infos = file.header.tensors
    scalars = [n for n, i in infos.items() if i.end - i.start == ITEMSIZES[i.dtype_name]]
    values = file.raw_bytes_many(scalars) if scalars else {}
    return {n: ShapeTensor(i.shape, StoredDtype(i.dtype_name),
                           decode_scalar(i.dtype_name, values[n]) if n in values else None) for n, i in infos.items()}
