"""What a layout reader is handed: the file's keys and metadata now, its tensors on demand.

``open_source`` accepts a ``.safetensors`` file, a pickled ``.pt`` / ``.bin`` / ``.pth``
(``weights_only=True``), a PEFT folder (``adapter_config.json`` + ``adapter_model.*``), or an
``hf://`` reference to any of these. Detection only needs ``keys`` and ``metadata``, so an
``info`` without ``--stats`` never reads tensor bytes from a safetensors file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratool.errors import InputError
from loratool.io import hub
from loratool.io.pickle_safe import load_pickle_state_dict
from loratool.io.safetensors_file import SafetensorsFile, TensorInfo

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

    @property
    def keys(self) -> list[str]:
        if self._safetensors is not None:
            return self._safetensors.keys()
        return list(self.tensors)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def tensor_infos(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of every tensor, from the header when there is one."""
        if self._safetensors is not None:
            infos: dict[str, TensorInfo] = self._safetensors.header.tensors
            return {k: (v.shape, v.dtype) for k, v in infos.items()}
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
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
    if p.is_dir():
        folder = p
        weights = [p / name for name in CONFIGURED_WEIGHTS if (p / name).is_file()]
        if not weights:
            cands = sorted(p.glob("*.safetensors"))
            if len(cands) != 1:
                raise InputError(
                    f"{p}: folder holds no adapter_model.safetensors / adapter_model.bin "
                    f"(and not exactly one .safetensors file)"
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
    if p.suffix.lower() in PICKLE_SUFFIXES:
        src._tensors = load_pickle_state_dict(p)
    else:
        src._safetensors = SafetensorsFile(p)
        src.metadata = dict(src._safetensors.metadata)
    return src
