"""``loratool info FOLDER``: one header-only summary per adapter file in a folder (a LoRA library).

Every ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file under the folder
(subfolders included, hidden ones skipped) and every PEFT folder (``adapter_config.json``
beside its weights) is summarised from its header alone (no tensor data, no torch):

* always: the layout and its dialect (``formats.detect_dialect``: a trainer's variant, from the keys),
  the model family (``arch.detect`` on the keys and
  metadata, as ``info`` decides it), tensor and parameter counts, stored dtypes, size, the
  training metadata a library listing shows (``ss_network_dim`` / ``_alpha`` as ``network_dim`` /
  ``network_alpha``, PEFT ``r`` / ``lora_alpha``; ``ss_network_module``, base model, title, output
  name), trigger phrases, and the model hashes sd-scripts stores (``sshs_model_hash``: sha256 of the
  tensor data, CivitAI's AutoV3; ``sshs_legacy_hash``);
* with ``modules=True``: also what ``info`` says about the modules (count, kinds, ranks, alphas),
  through the layout's own reader on the header
  (:func:`loratool.header_only.read_header_only`) — exact, and about ten times slower (a reader
  builds every module).

A file no layout claims is reported as a base checkpoint when its keys carry no LoRA marker, and
any file that cannot be read is listed with its one-line error instead of stopping the scan.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool import formats
from loratool.delta_rank import delta_rank
from loratool.errors import FormatError, LoratoolError
from loratool.formats.peft import CONFIG_NAME
from loratool.formats.source import PEFT_WEIGHTS, PICKLE_SUFFIXES, header_view, open_source
from loratool.header_only import DTYPES, dtype_name, read_header_only
from loratool.ops import Progress
from loratool.ops.inspect import adapter_family, base_model_hints, looks_like_base, module_info
from loratool.ops.training_metadata import trigger_phrases

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Metadata a library listing shows (kohya ss_* and modelspec.* keys).
SUMMARY_KEYS = ("ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "modelspec.title", "modelspec.author", "modelspec.trigger_phrase")
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


@dataclass
class ScanEntry:
    path: str
    size_bytes: int
    format: str | None = None  # a layout, "checkpoint" (a base model), or None when unreadable
    family: str | None = None
    dialect: str | None = None  # a trainer's variant of the layout, from the keys (as info names it)
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


def is_library_folder(path: str | os.PathLike) -> bool:
    """A folder that is not one adapter (no PEFT weights, not exactly one .safetensors file and no subfolder,
    not PEFT folders named by component: ``P/unet``, ``P/text_encoder``) and not a base model (no
    ``model_index.json``, no shard index, no ``config.json``)."""
    from loratool.formats.source import component_folders

    p = Path(path)
    if not p.is_dir() or any((p / n).is_file() for n in (*PEFT_WEIGHTS, CONFIG_NAME, "model_index.json",
                                                          "modular_model_index.json", "config.json")):
        return False
    if component_folders(p) or any(p.glob("*.safetensors.index.json")):
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


def _declared_rank(metadata: dict[str, str], config: dict | None) -> tuple[str | None, str | None]:
    """(network dim, network alpha) as the file declares them: kohya ``ss_network_*``, PEFT ``r`` / ``lora_alpha``."""
    if metadata.get("ss_network_dim"):
        return metadata["ss_network_dim"], metadata.get("ss_network_alpha") or None
    if isinstance(config, dict) and config.get("r") is not None:
        alpha = config.get("lora_alpha")
        return str(config["r"]), None if alpha is None else f"{alpha:g}" if isinstance(alpha, float) else str(alpha)
    return None, None


def scan_file(path: str | os.PathLike, family: str | None = None, modules: bool = False) -> ScanEntry:
    """The header-only summary of one adapter file or PEFT folder (errors in ``error``)."""
    path = Path(path)
    entry = ScanEntry(path=str(path), size_bytes=_size(path))
    try:
        src = open_source(path)
        view = header_view(src) if modules or src._safetensors is None else None
        keyed = view or src
        if src._safetensors is not None:  # dtype codes from the header: no torch dtypes looked up
            infos = src._safetensors.header.tensors.values()
            shapes = [i.shape for i in infos]
            dtypes = [DTYPES[i.dtype_name][0] for i in infos]
        else:
            infos = keyed.tensor_infos().values()
            shapes = [shape for shape, _ in infos]
            dtypes = [dtype_name(d) for _, d in infos]
        entry.tensors = len(shapes)
        entry.parameters = sum(map(math.prod, shapes))
        entry.dtypes = dict(Counter(dtypes).most_common())
        metadata = dict(src.metadata)
        entry.training = {k: metadata[k] for k in SUMMARY_KEYS if metadata.get(k)}
        entry.hashes = {k: metadata[k] for k in HASH_KEYS if metadata.get(k)}
        entry.trigger_phrases = trigger_phrases(metadata)
        entry.network_dim, entry.network_alpha = _declared_rank(metadata, src.config)
        try:
            name, entry.dialect = formats.detect_dialect(keyed)
        except FormatError:
            if looks_like_base(keyed.keys):
                entry.format = "checkpoint"
                return entry
            raise
        entry.format = name
        if not modules:
            entry.family = adapter_family(keyed, None, metadata, family)
            entry.base_model = base_model_hints(src, None, metadata)
            if entry.family is not None:
                return entry
            # keys and metadata do not say: the reader's module names and shapes do (as info decides it)
            adapter, entry.header_only = read_header_only(src, name, formats.ReadOptions(), path, view=view)
            entry.family, entry.dialect = adapter.family, adapter.dialect
            return entry
        adapter, entry.header_only = read_header_only(src, name, formats.ReadOptions(family=family), path, view=view)
    except LoratoolError as exc:
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        entry.error = message if str(path) in message else f"{path}: {message}"
        return entry
    found = list(adapter)
    ranks = [delta_rank(m) for m in found]  # as info counts them (LoKr: rank(w1)·rank(w2))
    entry.family = adapter_family(keyed, adapter, adapter.metadata or metadata, family)
    entry.base_model = base_model_hints(src, adapter, adapter.metadata or metadata)
    entry.modules = len(found)
    entry.kinds = dict(Counter(m.kind for m in found).most_common())
    entry.ranks = {"min": min(ranks, default=None), "max": max(ranks, default=None)}
    entry.alphas = dict(Counter(str(module_info(m).alpha) for m in found).most_common())  # as info counts them
    entry.components = adapter.components
    entry.dialect = adapter.dialect
    return entry


# A folder scan is header parsing in Python (json + per-entry validation, GIL-bound): from this many files on,
# worker processes share it. Fewer files do not pay back a worker's start (~0.1 s: an interpreter and imports).
PARALLEL_FROM = 64
MAX_WORKERS = 4
CHUNK = 16  # files per task: amortises the pickling of a task and its ScanEntry rows


def scan_workers(files: int, workers: int | None = None) -> int:
    """Processes for a scan of ``files`` files: ``workers`` when given (``--threads``), else one per CPU
    this process may run on (at most :data:`MAX_WORKERS`) for :data:`PARALLEL_FROM` files or more."""
    if workers is not None:
        return max(1, min(int(workers), files))
    if files < PARALLEL_FROM:
        return 1
    from loratool.cpus import usable_cpus

    return min(usable_cpus(), MAX_WORKERS)


def _scan_chunk(paths: list[str], family: str | None, modules: bool) -> list[ScanEntry]:
    return [scan_file(p, family, modules) for p in paths]


def scan(folder: str | os.PathLike, *, family: str | None = None, modules: bool = False,
         progress: Progress | None = None, workers: int | None = None) -> ScanReport:
    """:func:`scan_file` for every adapter under ``folder`` (see the module docstring), in file order;
    large folders in worker processes (:func:`scan_workers`; ``workers=1``: in this process)."""
    import time

    start = time.perf_counter()
    root = Path(folder)
    paths = adapter_paths(root)
    entries: list[ScanEntry] = []
    n = scan_workers(len(paths), workers)
    if n <= 1:
        for p in paths:
            entries.append(scan_file(p, family, modules))
            if progress is not None:
                progress("scanning", len(entries), len(paths))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        chunks = [[str(p) for p in paths[i:i + CHUNK]] for i in range(0, len(paths), CHUNK)]
        # spawn, not fork: the parent may hold threads (a progress bar's) whose locks a fork would copy held
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            for rows in pool.map(_scan_chunk, chunks, [family] * len(chunks), [modules] * len(chunks)):
                entries += rows
                if progress is not None:
                    progress("scanning", len(entries), len(paths))
    return ScanReport(path=str(root), entries=entries, seconds=time.perf_counter() - start)
