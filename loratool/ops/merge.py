"""Merge one or more adapters into a base checkpoint, streaming one tensor at a time.

For every stored tensor W that modules touch, in adapter order (strength λᵢ):

    W ← merge_weight(W, moduleᵢ, λᵢ)        (W + λ·ΔW, or the DoRA form m ⊙ (W+λΔW)/‖W+λΔW‖)

computed in float32 (float64 for float64 bases) on the chosen device and cast back to the
stored dtype (or ``dtype``) once at the end (on the CPU, weights whose modules are all
row-separable go through the same ops a block of rows at a time: :class:`loratool.delta.RowMerge`).
Single-file weights stored transposed (OpenCLIP ``text_projection``) or with their two row halves
swapped (Flux / SD3 final modulation) are merged in the canonical orientation:
W_stored ← T(merge_weight(T(W_stored), module, λ)) with T the transpose / half swap (T∘T = id),
so DoRA norms are taken over the canonical weight's rows.
Plain modules therefore sum (W + Σ λᵢ·ΔWᵢ); DoRA
modules apply one after another as PEFT does when merging adapters in turn. A module with a
bias delta adds λ·Δb to ``<path>.bias``. PEFT ``modules_to_save`` tensors replace the base's.

The output mirrors the base: same file names, tensor order, dtypes and header (kept byte for
byte unless ``dtype`` changes it); untouched tensors are copied as bytes; a folder base gives
a folder out with its other files (configs, tokenizers) copied and weight files the merge does
not read dropped (listed in the result). Everything is written beside the target and renamed
at the end: on any error nothing appears.

Order of work: this module does not import torch. It opens the base (headers only) and the
output, and starts copying every base file whose layout the output keeps
(:class:`~loratool.io.copy_ahead.CopyAhead`, kernel-side, on its own thread); only then is torch
imported (seconds) and are the adapters loaded and matched, while the copy runs. The tensors the
merge changes are then written over their copied (or skipped) bytes
(:mod:`loratool.ops.merge_tensors`).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratool.errors import UsageError
from loratool.float_dtypes import float_code
from loratool.io.atomic import atomic_path, check_output
from loratool.io.checkpoint import WEIGHT_SUFFIXES, Checkpoint, Part, open_checkpoint
from loratool.io.copy_ahead import CopyAhead

if TYPE_CHECKING:
    import torch

    from loratool.adapter import Adapter
    from loratool.ops.merge_tensors import PartMerger

Progress = Callable[[str, int, int], None]

# Stored dtypes that ``dtype`` converts; integer / bool / fp8 tensors stay as they are.
CONVERTIBLE = ("F16", "BF16", "F32", "F64")


@dataclass
class MergeResult:
    output: Path
    base: str
    adapters: list[str]
    strengths: list[float]
    matched: dict[str, int]
    unmatched: list[str]
    merged_tensors: int  # tensors whose values changed
    skipped: int  # tensors copied untouched
    dropped_files: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    device: str = "cpu"
    dtype: str | None = None

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "base": self.base,
            "adapters": self.adapters,
            "strengths": self.strengths,
            "matched": self.matched,
            "matched_total": sum(self.matched.values()),
            "unmatched": self.unmatched,
            "merged_tensors": self.merged_tensors,
            "skipped": self.skipped,
            "dropped_files": self.dropped_files,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "device": self.device,
            "dtype": self.dtype,
        }


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def target_code(stored: str, out_code: str | None) -> str:
    """The dtype code a stored tensor of dtype code ``stored`` is written in."""
    return out_code if out_code is not None and stored in CONVERTIBLE else stored


def _out_code(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return float_code(dtype, "--dtype")
    from loratool.io.safetensors_file import dtype_codes

    code = dtype_codes().get(dtype)
    if code not in ("F16", "BF16", "F32"):
        raise UsageError(f"dtype {dtype}: choose fp16, bf16 or fp32")
    return code


def _strengths(strengths: float | Sequence[float] | None, n: int) -> list[float]:
    if strengths is None:
        return [1.0] * n
    if isinstance(strengths, (int, float)):
        return [float(strengths)] * n
    values = [float(s) for s in strengths]
    if not values:
        return [1.0] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"--alpha given {len(values)} times for {n} LoRAs: give it once, or once per LoRA")
    return values


def keeps_layout(part: Part, out_code: str | None) -> bool:
    """Whether the output file of ``part`` has the base file's layout (no tensor changes dtype)."""
    return all(target_code(i.dtype_name, out_code) == i.dtype_name for i in part.file.header.tensors.values())


def _copy_jobs(ckpt: Checkpoint, tmp: Path, out_code: str | None) -> list[tuple[Path, Path, list[tuple[int, int]]]]:
    """(base file, output file, byte spans of header and tensors) for every part copied ahead."""
    jobs = []
    for group in ckpt.groups:
        for part in group.parts:
            if not keeps_layout(part, out_code):
                continue
            dest = tmp / part.rel if ckpt.is_folder else tmp
            dest.parent.mkdir(parents=True, exist_ok=True)
            header = part.file.header
            at = header.data_offset
            spans = [(0, at)] + sorted((at + i.start, at + i.end) for i in header.tensors.values())
            jobs.append((part.path, dest, spans))
    return jobs


def _mirror_folder(ckpt: Checkpoint, merger: PartMerger, tmp: Path) -> tuple[list[str], list[str]]:
    """Write every group into ``tmp`` and copy the other files; returns (files written, dropped)."""
    handled = {os.path.normpath(p) for p in ckpt.weight_files()}
    written: list[str] = []
    dropped: list[str] = []
    for group in ckpt.groups:
        for part in group.parts:
            dest = tmp / part.rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            merger.write_part(part, dest)
            written.append(str(part.rel))
        if group.index_rel is not None:
            dest = tmp / group.index_rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            merger.write_index(group, dest)
            written.append(str(group.index_rel))
    for dirpath, dirnames, filenames in os.walk(ckpt.root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(ckpt.root)
        for name in sorted(filenames):
            src = Path(dirpath) / name
            if name.startswith(".") or os.path.normpath(src) in handled:
                continue
            rel = rel_dir / name
            if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".safetensors.index.json") \
                    or name.endswith(".bin.index.json"):
                dropped.append(str(rel))
                continue
            (tmp / rel_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
    return written, dropped


def merge(
    base: str | os.PathLike,
    loras: Sequence[str | os.PathLike | Adapter],
    out: str | os.PathLike,
    strengths: float | Sequence[float] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "auto",
    strict: bool = False,
    force: bool = False,
    allow_nonfinite: bool = False,
    sync: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge ``loras`` (paths, ``hf://`` refs or :class:`Adapter` objects) into ``base``; write ``out``.

    ``sync`` flushes the output to disk before it is renamed into place (see
    :func:`loratool.io.atomic.atomic_path`). Raises :class:`~loratool.errors.MatchError` when
    nothing matches, when shapes disagree, or (``strict``) when any module is unmatched;
    :class:`~loratool.errors.NonFiniteError` for NaN/Inf in an adapter or a result unless
    ``allow_nonfinite``. Nothing is written on any error.
    """
    start = time.perf_counter()
    if not loras:
        raise UsageError("give at least one LoRA to merge")
    out_code = _out_code(dtype)
    values = _strengths(strengths, len(loras))
    ckpt = open_checkpoint(base)
    out = Path(out)
    if ckpt.is_folder and out.suffix == ".safetensors":
        raise UsageError(f"{out}: the base {ckpt.root} is a folder, so the output is a folder too; drop the suffix")
    if not ckpt.is_folder and out.suffix != ".safetensors":
        raise UsageError(f"{out}: the base is one .safetensors file; name the output *.safetensors")
    # Refuse a bad output before the (possibly slow) adapter loading.
    local_inputs = [ckpt.root] + [p for p in loras if isinstance(p, (str, os.PathLike)) and not str(p).startswith("hf://")]
    check_output(out, inputs=local_inputs, force=force, folder=ckpt.is_folder)

    with atomic_path(out, folder=ckpt.is_folder, sync=sync) as tmp, \
            CopyAhead(_copy_jobs(ckpt, tmp, out_code), sync=sync) as copier:
        from loratool.ops import merge_tensors  # torch: imported while the copy runs

        plan, names, dev = merge_tensors.plan_merge(ckpt, loras, values, device, strict, allow_nonfinite)
        with merge_tensors.compute_threads(dev):
            merger = merge_tensors.PartMerger(ckpt, plan, out_code, dev, allow_nonfinite, progress, copier)
            dropped: list[str] = []
            if ckpt.is_folder:
                files, dropped = _mirror_folder(ckpt, merger, tmp)
            else:
                merger.write_part(ckpt.groups[0].parts[0], tmp)
                files = [out.name]
    return MergeResult(
        output=out,
        base=str(base),
        adapters=names,
        strengths=values,
        matched=dict(plan.matched),
        unmatched=list(plan.unmatched),
        merged_tensors=merger.merged,
        skipped=merger.skipped,
        dropped_files=dropped,
        files=files,
        seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
        device=str(dev),
        dtype={"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(out_code),
    )
