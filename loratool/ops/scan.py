"""``loratool info FOLDER``: one header-only summary per adapter file in a folder (a LoRA library).

Every ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file under the folder
(subfolders included, hidden ones skipped) and every PEFT folder (``adapter_config.json``
beside its weights) is read the way ``info`` reads one adapter without ``--stats``: the layout's
own reader on the header alone (:func:`loratool.header_only.read_header_only`; no tensor data
beyond alpha scalars, no torch), so the summary is what ``info`` on that file says. A file no
layout claims is reported as a base checkpoint when its keys carry no LoRA marker, and any
file that cannot be read is listed with its one-line error instead of stopping the scan.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool import formats
from loratool.errors import FormatError, LoratoolError
from loratool.formats.peft import CONFIG_NAME
from loratool.formats.source import PEFT_WEIGHTS, PICKLE_SUFFIXES, header_view, open_source
from loratool.header_only import dtype_name, read_header_only
from loratool.ops import Progress
from loratool.ops.inspect import adapter_family, base_model_hints, looks_like_base

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass
class ScanEntry:
    path: str
    size_bytes: int
    format: str | None = None  # a layout, "checkpoint" (a base model), or None when unreadable
    family: str | None = None
    modules: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int | None] = field(default_factory=lambda: {"min": None, "max": None})
    alphas: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    components: list[str] = field(default_factory=list)
    base_model: dict[str, str] = field(default_factory=dict)
    header_only: bool = True
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ScanReport:
    path: str
    entries: list[ScanEntry]
    format: str = "folder"

    @property
    def errors(self) -> int:
        return sum(e.error is not None for e in self.entries)

    @property
    def warnings(self) -> list[str]:
        return [e.error for e in self.entries if e.error is not None]  # each names its file

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` contract of ``info FOLDER``."""
        return {
            "path": self.path,
            "format": self.format,
            "file_count": len(self.entries),
            "error_count": self.errors,
            "formats": dict(Counter(e.format or "error" for e in self.entries).most_common()),
            "families": dict(Counter(e.family or "unknown" for e in self.entries if e.error is None).most_common()),
            "size_bytes": sum(e.size_bytes for e in self.entries),
            "entries": [e.to_json() for e in self.entries],
        }


def is_library_folder(path: str | os.PathLike) -> bool:
    """A folder that is not one adapter (no PEFT weights, not exactly one .safetensors file)."""
    p = Path(path)
    if not p.is_dir() or any((p / n).is_file() for n in (*PEFT_WEIGHTS, CONFIG_NAME)):
        return False
    return len(list(p.glob("*.safetensors"))) != 1 or any(d.is_dir() for d in p.iterdir() if not d.name.startswith("."))


def adapter_paths(folder: Path) -> list[Path]:
    """Weight files and PEFT folders under ``folder``, sorted; a PEFT folder's own files are not listed."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if here != folder and any(n in filenames for n in (*PEFT_WEIGHTS, CONFIG_NAME)):
            found.append(here)
            dirnames[:] = []
            continue
        found += [here / n for n in sorted(filenames) if not n.startswith(".") and n.lower().endswith(WEIGHT_SUFFIXES)]
    return found


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def scan_file(path: str | os.PathLike, family: str | None = None) -> ScanEntry:
    """The header-only summary of one adapter file or PEFT folder (errors in ``error``)."""
    path = Path(path)
    entry = ScanEntry(path=str(path), size_bytes=_size(path))
    try:
        src = open_source(path)
        view = header_view(src)
        try:
            name = formats.detect(view or src)
        except FormatError:
            if looks_like_base((view or src).keys):
                entry.format = "checkpoint"
                return entry
            raise
        adapter, entry.header_only = read_header_only(src, name, formats.ReadOptions(family=family), path, view=view)
    except LoratoolError as exc:
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        entry.error = message if str(path) in message else f"{path}: {message}"
        return entry
    modules = list(adapter)
    ranks = [m.rank for m in modules]
    entry.format = name
    entry.family = adapter_family(view or src, adapter, adapter.metadata or src.metadata, family)
    entry.modules = len(modules)
    entry.kinds = dict(Counter(m.kind for m in modules).most_common())
    entry.ranks = {"min": min(ranks, default=None), "max": max(ranks, default=None)}
    entry.alphas = dict(Counter(f"{m.effective_alpha:g}" for m in modules).most_common())
    entry.dtypes = dict(Counter(dtype_name(m.dtype) for m in modules).most_common())
    entry.components = adapter.components
    entry.base_model = base_model_hints(src, adapter, adapter.metadata or src.metadata)
    return entry


def scan(folder: str | os.PathLike, *, family: str | None = None, progress: Progress | None = None) -> ScanReport:
    """:func:`scan_file` for every adapter under ``folder`` (see the module docstring)."""
    root = Path(folder)
    paths = adapter_paths(root)
    entries = []
    for i, p in enumerate(paths):
        entries.append(scan_file(p, family))
        if progress is not None:
            progress("scanning", i + 1, len(paths))
    return ScanReport(path=str(root), entries=entries)
