"""``loratool info FOLDER``: one summary per adapter file in a folder (a LoRA library), header only.

Every ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file under the folder (subfolders
included, hidden ones skipped) and every PEFT folder (``adapter_config.json`` beside its weights) is
summarised; a file that cannot be read is listed with its one-line error and the scan goes on, a file no
layout claims and whose keys carry no LoRA marker is listed as a base checkpoint.

* by default, from the header alone (no tensor data): layout (``formats.detect``), family (the kohya key
  and metadata scores of :func:`loratool.arch.detect`, else a PEFT config naming a language model),
  tensor / parameter counts and dtypes, size, the training metadata a listing shows (``ss_network_dim`` /
  ``_alpha`` as ``network_dim`` / ``network_alpha``; PEFT ``r`` / ``lora_alpha``), trigger phrases, base
  model hints, and the model hashes sd-scripts stores (``sshs_model_hash``: sha256 of the tensor data,
  CivitAI's AutoV3; ``sshs_legacy_hash``);
* with ``modules=True``: what ``info`` says per file (:func:`loratool.ops.inspect.inspect`, the layout's
  reader on the header): exact ranks and alphas, kinds, components, dialect and the family from names and
  shapes — about ten times slower.

The API mirrors the folder scan of the performance work (same names: :func:`scan`, :func:`scan_file`,
:class:`ScanEntry`, :class:`ScanReport`); this module holds no torch code of its own.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool import formats
from loratool.errors import FormatError, LoratoolError
from loratool.ops import Progress
from loratool.ops.training_metadata import trigger_phrases

# loratool.formats.source's suffixes and PEFT file names (that module imports torch; this one does not)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# Metadata a library listing shows (kohya ss_* and modelspec.* keys).
SUMMARY_KEYS = ("ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "modelspec.title", "modelspec.author", "modelspec.trigger_phrase")
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
BASE_KEYS = ("ss_sd_model_name", "ss_base_model_version", "modelspec.architecture")
# dtype codes of safetensors headers -> torch names (without importing torch)
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "BOOL": "bool"}


@dataclass
class ScanEntry:
    path: str
    size_bytes: int
    format: str | None = None  # a layout, "checkpoint" (a base model), or None when unreadable
    family: str | None = None
    dialect: str | None = None  # modules=True only (the reader names it)
    tensors: int = 0
    parameters: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # stored dtype -> tensors
    training: dict[str, str] = field(default_factory=dict)  # the metadata of SUMMARY_KEYS the file has
    base_model: dict[str, str] = field(default_factory=dict)
    trigger_phrases: list[str] = field(default_factory=list)
    network_dim: str | None = None  # as declared (ss_network_dim, PEFT r): "16", "Dynamic"
    network_alpha: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)  # the sshs_* hashes stored in the header
    # with modules=True (None otherwise): what the layout's reader builds
    modules: int | None = None
    kinds: dict[str, int] | None = None
    ranks: dict[str, int | None] | None = None
    alphas: dict[str, int] | None = None
    components: list[str] | None = None
    header_only: bool = True
    error: str | None = None

    @property
    def rank(self) -> str:
        """The rank a listing shows: the modules' (``4`` or ``4–16``), else the declared one, else ``-``."""
        if self.ranks and self.ranks.get("min") is not None:
            lo, hi = self.ranks["min"], self.ranks["max"]
            return str(lo) if lo == hi else f"{lo}–{hi}"
        return self.network_dim or "-"

    @property
    def alpha(self) -> str:
        if self.alphas:
            return "/".join(self.alphas)
        return self.network_alpha or "-"

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["module_count"] = out.pop("modules")  # "modules" is a list of objects in every other document
        return out


@dataclass
class ScanReport:
    path: str
    entries: list[ScanEntry]
    format: str = "folder"
    seconds: float = 0.0

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
            "seconds": round(self.seconds, 3),
            "entries": [e.to_json() for e in self.entries],
            "warnings": self.warnings,
        }


def _peft_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and any((folder / n).is_file() for n in PEFT_FILES[1:])


def is_library_folder(path: str | os.PathLike) -> bool:
    """A folder that is not one adapter (no PEFT files, not exactly one .safetensors file and no subfolder, not
    PEFT folders named by component: ``P/unet``, ``P/text_encoder``) and not a base model (no
    ``model_index.json``, no shard index, no ``config.json``)."""
    from loratool.components import COMPONENTS

    p = Path(path)
    if not p.is_dir() or any((p / n).is_file() for n in (*PEFT_FILES, "model_index.json", "config.json")):
        return False
    if any(p.glob("*.safetensors.index.json")):
        return False
    subfolders = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if subfolders and not any(p.glob("*.safetensors")) and all(d.name in COMPONENTS and _peft_folder(d)
                                                               for d in subfolders):
        return False  # one adapter in component folders (what convert --to peft writes for a pipeline)
    return bool(subfolders) or len(list(p.glob("*.safetensors"))) != 1


def adapter_paths(folder: Path) -> list[Path]:
    """Weight files and PEFT folders under ``folder``, sorted; a PEFT folder's own files are not listed."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if here != folder and any(n in filenames for n in PEFT_FILES):
            found.append(here)
            dirnames[:] = []
            continue
        found += [here / n for n in sorted(filenames) if not n.startswith(".") and n.lower().endswith(WEIGHT_SUFFIXES)]
    return found


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _declared_rank(metadata: dict[str, str], config: dict | None) -> tuple[str | None, str | None]:
    """(network dim, network alpha) as the file declares them: kohya ``ss_network_*``, PEFT ``r`` / ``lora_alpha``."""
    if metadata.get("ss_network_dim"):
        return metadata["ss_network_dim"], metadata.get("ss_network_alpha") or None
    if isinstance(config, dict) and config.get("r") is not None:
        alpha = config.get("lora_alpha")
        return str(config["r"]), None if alpha is None else f"{alpha:g}" if isinstance(alpha, float) else str(alpha)
    return None, None


def _quick_family(src, metadata: dict[str, str], given: str | None) -> str | None:
    """The family a header tells: ``given``, kohya keys / metadata (:func:`loratool.arch.detect`), or a PEFT
    config declaring a transformers language model."""
    if given:
        return given
    from loratool import arch
    from loratool.arch.evidence import Evidence

    fam = arch.detect(src.keys, metadata)
    if fam is not None:
        return fam.name
    if src.config is not None and Evidence({}, metadata, (src.config,)).lm_declared:
        return "llm"
    return None


def _header_facts(entry: ScanEntry, src) -> dict[str, str]:
    """Fill tensor counts, dtypes, training metadata, hashes, trigger phrases; return the metadata."""
    if src._safetensors is not None:
        infos = [(i.shape, DTYPE_NAMES.get(i.dtype_name, i.dtype_name))
                 for i in src._safetensors.header.tensors.values()]
    else:
        infos = [(shape, str(dtype).removeprefix("torch.")) for shape, dtype in src.tensor_infos().values()]
    entry.tensors = len(infos)
    entry.parameters = sum(math.prod(shape) for shape, _ in infos)
    entry.dtypes = dict(Counter(d for _, d in infos).most_common())
    metadata = dict(src.metadata)
    entry.training = {k: metadata[k] for k in SUMMARY_KEYS if metadata.get(k)}
    entry.hashes = {k: metadata[k] for k in HASH_KEYS if metadata.get(k)}
    entry.trigger_phrases = trigger_phrases(metadata)
    entry.base_model = {k: metadata[k] for k in BASE_KEYS if metadata.get(k)}
    name = (src.config or {}).get("base_model_name_or_path") if isinstance(src.config, dict) else None
    if isinstance(name, str) and name:
        entry.base_model["base_model_name_or_path"] = name
    entry.network_dim, entry.network_alpha = _declared_rank(metadata, src.config)
    return metadata


def scan_file(path: str | os.PathLike, family: str | None = None, modules: bool = False) -> ScanEntry:
    """The summary of one adapter file or PEFT folder (errors in ``error``; see the module docstring)."""
    from loratool.formats.source import open_source
    from loratool.ops.argument_order import looks_like_base

    path = Path(path)
    entry = ScanEntry(path=str(path), size_bytes=_size(path))
    try:
        src = open_source(path)
        metadata = _header_facts(entry, src)
        try:
            entry.format = formats.detect(src)
        except FormatError:
            if looks_like_base(src.keys):
                entry.format = "checkpoint"
                return entry
            raise
        entry.header_only = src._safetensors is not None or bool(src.parts)
        if not modules:
            entry.family = _quick_family(src, metadata, family)
            return entry
        from loratool.ops.inspect import inspect

        report = inspect(path, entry.format, family=family)
    except LoratoolError as exc:
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        entry.error = message if str(path) in message else f"{path}: {message}"
        return entry
    data = report.to_json()
    entry.family, entry.dialect = report.family, report.dialect
    entry.modules, entry.kinds, entry.components = data["module_count"], data["kinds"], data["components"]
    entry.ranks = {"min": data["ranks"]["min"], "max": data["ranks"]["max"]}
    entry.alphas = data["alphas"]
    entry.trigger_phrases = report.trigger_phrases
    entry.base_model = {**entry.base_model, **report.base_model}
    entry.header_only = report.header_only
    return entry


def scan(folder: str | os.PathLike, *, family: str | None = None, modules: bool = False,
         progress: Progress | None = None) -> ScanReport:
    """:func:`scan_file` for every adapter under ``folder`` (see the module docstring)."""
    import time

    start = time.perf_counter()
    root = Path(folder)
    paths = adapter_paths(root)
    entries = []
    for i, p in enumerate(paths):
        entries.append(scan_file(p, family, modules))
        if progress is not None:
            progress("scanning", i + 1, len(paths))
    return ScanReport(path=str(root), entries=entries, seconds=time.perf_counter() - start)
