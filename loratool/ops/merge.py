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
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratool.adapter import Adapter
from loratool.delta import RowMerge, delta_bias, merge_weight, row_merge
from loratool.errors import NonFiniteError, UsageError
from loratool.io.atomic import atomic_path, check_output
from loratool.io.checkpoint import WEIGHT_SUFFIXES, Checkpoint, Part, open_checkpoint, read_into
from loratool.io.safetensors_file import itemsize
from loratool.io.safetensors_writer import SEGMENT_BYTES, StreamingWriter, TensorSpec, copy_file
from loratool.ops.device import pick_device
from loratool.ops.matching import MatchPlan, match

Progress = Callable[[str, int, int], None]

DTYPE_CHOICES: dict[str, torch.dtype] = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
# Only these stored dtypes are converted by ``dtype``; integer / bool / fp8 tensors stay as they are.
_CONVERTIBLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Work block of the row-blocked merge (bytes of float32 rows): fits in L2 with its fp16 source;
# 1-4 MiB measured fastest for 4096×5120 weights on a 2-core EPYC (bench/bench_merge.py).
_BLOCK_BYTES = 2 * 1024 * 1024


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


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    key = name.lower()
    if key not in DTYPE_CHOICES:
        raise UsageError(f"--dtype {name}: choose fp16, bf16 or fp32")
    return DTYPE_CHOICES[key]


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


def _nonfinite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def _result_nonfinite(work: torch.Tensor, result: torch.Tensor) -> bool:
    """NaN/Inf in ``result`` (``work`` cast to the stored dtype), cheaply.

    One vectorised aminmax over ``work`` settles it when both extremes are finite and lie within
    the stored dtype's range (NaN propagates into the extremes); only otherwise is every
    element of the cast result examined (values just above the range may still round down).
    """
    if work.numel() == 0 or not result.is_floating_point():
        return False
    lo, hi = torch.aminmax(work)
    lo, hi = float(lo), float(hi)
    top = torch.finfo(result.dtype).max
    if -top <= lo and hi <= top:  # also False for NaN / ±Inf
        return False
    return _nonfinite(result)


def _check_adapter_finite(adapter: Adapter, name: str) -> None:
    for m in adapter:
        for tname, t in m.all_tensors().items():
            if _nonfinite(t):
                raise NonFiniteError(
                    f"{name}: module {m.component}:{m.path} holds NaN/Inf in {tname} "
                    f"(use --allow-nonfinite to merge it anyway)"
                )
    for (comp, tname), t in adapter.extras.items():
        if _nonfinite(t):
            raise NonFiniteError(f"{name}: saved tensor {comp}:{tname} holds NaN/Inf (use --allow-nonfinite)")


def _oriented(tensor: torch.Tensor, transform: str) -> torch.Tensor:
    """``tensor`` transposed or with its row halves swapped (:func:`loratool.arch.checkpoints.to_stored`)."""
    from loratool.arch.checkpoints import Target, to_stored

    return to_stored(tensor, Target("", None, transform))


class _Merger:
    """Writes the parts of one checkpoint; counts progress over every stored tensor."""

    def __init__(self, ckpt: Checkpoint, plan: MatchPlan, out_dtype: torch.dtype | None, device: torch.device,
                 allow_nonfinite: bool, progress: Progress | None):
        self.ckpt = ckpt
        self.plan = plan
        self.out_dtype = out_dtype
        self.device = device
        self.allow_nonfinite = allow_nonfinite
        self.progress = progress
        self.total = sum(len(f.keys()) for _, _, f in ckpt.parts())
        self.done = 0
        self.merged = 0
        self.skipped = 0

    def _tick(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress("merging", self.done, self.total)

    def _target_dtype(self, stored: torch.dtype) -> torch.dtype:
        if self.out_dtype is not None and stored in _CONVERTIBLE:
            return self.out_dtype
        return stored

    def _touched(self, f_path: Path, key: str) -> bool:
        return (f_path, key) in self.plan.applications or (f_path, key) in self.plan.replacements

    def write_part(self, part: Part, dest: Path) -> None:
        f = part.file
        header = f.header
        order = sorted(header.tensors.values(), key=lambda i: (i.start, i.end))
        changes_dtype = any(self._target_dtype(i.dtype) != i.dtype for i in order)
        if not changes_dtype and not any(self._touched(f.path, i.name) for i in order):
            copy_file(f.path, dest)  # kernel-side copy; byte-identical by construction
            self.skipped += len(order)
            self._tick(len(order))
            return
        specs = [TensorSpec(i.name, self._target_dtype(i.dtype), i.shape) for i in order]
        prefix = None
        if not changes_dtype:
            with open(f.path, "rb") as fh:
                prefix = fh.read(header.data_offset)
        src = os.open(f.path, os.O_RDONLY)
        try:
            with StreamingWriter(dest, specs, header.metadata, header=prefix) as writer:
                for info in order:
                    touched = self._touched(f.path, info.name)
                    if touched or self._target_dtype(info.dtype) != info.dtype:
                        rows = self._row_merges(f, info)
                        if rows is not None:
                            self._write_blocked(writer, f, src, info, rows)
                        else:
                            tensor = self._compute(f, info.name) if touched else Checkpoint.read_tensor(f, info.name)
                            writer.write_tensor(info.name, tensor.to(self._target_dtype(info.dtype)))
                        self.merged += touched
                        self.skipped += not touched
                    else:
                        writer.copy_tensor(info.name, f.path, header.data_offset + info.start, info.nbytes)
                        self.skipped += 1
                    self._tick()
        finally:
            os.close(src)

    def _row_merges(self, f, info) -> list[tuple[int, int, RowMerge]] | None:
        """(first row, end row, RowMerge) per application when the tensor can be merged by row blocks, else None.

        Block-wise merging is the same arithmetic as :meth:`_compute` on fewer rows at a time;
        it is used on the CPU for float tensors whose every application is row-separable
        (plain Linear LoRA, PEFT DoRA) and that no ``modules_to_save`` tensor replaces.
        """
        key = (f.path, info.name)
        if self.device.type != "cpu" or info.dtype not in _CONVERTIBLE or key in self.plan.replacements:
            return None
        work_dtype = torch.float64 if info.dtype == torch.float64 else torch.float32
        out: list[tuple[int, int, RowMerge]] = []
        for app in self.plan.applications.get(key, ()):
            if app.bias or len(info.shape) != 2 or app.transform is not None:
                return None  # a transposed / half-swapped weight is not merged row block by row block
            lo, hi = app.rows if app.rows is not None else (0, info.shape[0])
            rm = row_merge(app.module, app.strength, (hi - lo, info.shape[1]), dtype=work_dtype)
            if rm is None:
                return None
            out.append((lo, hi, rm))
        return out

    def _write_blocked(self, writer: StreamingWriter, f, src: int, info, merges) -> None:
        """Read, merge and write one tensor a few rows at a time (cache-sized blocks, bounded memory).

        Per block: stored rows -> float32 (float64 for float64) -> each application's rows in
        order -> NaN/Inf check -> cast once to the output dtype, into a writer segment that the
        writer thread writes while the next segment is computed.
        """
        target = self._target_dtype(info.dtype)
        work_dtype = torch.float64 if info.dtype == torch.float64 else torch.float32
        numel = 1
        for s in info.shape:
            numel *= int(s)
        writer.begin_tensor(info.name)
        if numel == 0:
            return
        # rows of the weight when merging; any split into contiguous runs when only casting
        n_rows = int(info.shape[0]) if merges else numel
        row = numel // n_rows
        in_size, out_size = itemsize(info.dtype), itemsize(target)
        block = max(1, _BLOCK_BYTES // (row * itemsize(work_dtype)))
        seg_rows = max(block, (SEGMENT_BYTES // (row * max(in_size, out_size))) // block * block)
        seg_rows = min(seg_rows, n_rows)
        block = min(block, seg_rows)
        labels = [f"{rm.module.component}:{rm.module.path}" for _, _, rm in merges]
        stored_at = f.header.data_offset + info.start
        raw = torch.empty(seg_rows * row * in_size, dtype=torch.uint8)
        work_buf = torch.empty(block * row, dtype=work_dtype)
        for r0 in range(0, n_rows, seg_rows):
            n = min(seg_rows, n_rows - r0)
            stored = raw[: n * row * in_size]
            read_into(src, memoryview(stored.numpy()), stored_at + r0 * row * in_size, f.path, info.name)
            stored = stored.view(info.dtype).view(n, row)
            seg = writer.segment(n * row * out_size)
            result = seg[: n * row * out_size].view(target).view(n, row)
            try:
                for b0 in range(0, n, block):
                    b1 = min(n, b0 + block)
                    work = work_buf[: (b1 - b0) * row].view(b1 - b0, row)
                    work.copy_(stored[b0:b1])
                    for lo, hi, rm in merges:
                        a, b = max(lo, r0 + b0), min(hi, r0 + b1)
                        if a < b:
                            rm.apply_(work[a - r0 - b0: b - r0 - b0], a - lo)
                    out = result[b0:b1]
                    out.copy_(work)
                    if merges and not self.allow_nonfinite and _result_nonfinite(work, out):
                        raise NonFiniteError(
                            f"merging {', '.join(dict.fromkeys(labels))} into {info.name} gives NaN/Inf in "
                            f"{target} (use --allow-nonfinite to write it anyway)"
                        )
            except BaseException:
                writer.give_back(seg)
                raise
            writer.write_segment(seg, n * row * out_size)

    def _compute(self, f, key: str) -> torch.Tensor:
        stored = Checkpoint.read_tensor(f, key)
        work_dtype = torch.float64 if stored.dtype == torch.float64 else torch.float32
        labels: list[str] = []
        replacement = self.plan.replacements.get((f.path, key))
        if replacement is not None:
            _, label, tensor = replacement
            work = tensor.to(device=self.device, dtype=work_dtype)
            labels.append(label)
        else:
            work = stored.to(device=self.device).to(work_dtype)
        del stored
        for app in self.plan.applications.get((f.path, key), ()):
            m = app.module
            labels.append(f"{m.component}:{m.path}")
            region = work if app.rows is None else work[app.rows[0]:app.rows[1]]
            if app.transform is not None:
                region = _oriented(region, app.transform)  # stored -> canonical orientation
            if app.bias:
                new = region + app.strength * delta_bias(m, dtype=work_dtype, device=self.device)
            else:
                new = merge_weight(region, m, app.strength, dtype=work_dtype)
            if app.transform is not None:
                new = _oriented(new, app.transform)  # canonical -> stored (each transform is its own inverse)
            if app.rows is None:
                work = new
            else:
                work[app.rows[0]:app.rows[1]] = new
        target = self._target_dtype(f.info(key).dtype)
        result = work.to(target)
        if not self.allow_nonfinite and _result_nonfinite(work, result):
            raise NonFiniteError(
                f"merging {', '.join(dict.fromkeys(labels))} into {key} gives NaN/Inf in "
                f"{result.dtype} (use --allow-nonfinite to write it anyway)"
            )
        return result.to("cpu")

    def write_index(self, group, dest: Path) -> None:
        src = self.ckpt.root / group.index_rel
        if self.out_dtype is None:
            shutil.copyfile(src, dest)
            return
        index = dict(group.index)
        total = 0
        for part in group.parts:
            for info in part.file.header.tensors.values():
                spec = TensorSpec(info.name, self._target_dtype(info.dtype), info.shape)
                total += spec.nbytes
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = total
        index["metadata"] = meta
        dest.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _mirror_folder(ckpt: Checkpoint, merger: _Merger, tmp: Path) -> tuple[list[str], list[str]]:
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
    progress: Progress | None = None,
) -> MergeResult:
    """Merge ``loras`` (paths, ``hf://`` refs or :class:`Adapter` objects) into ``base``; write ``out``.

    Raises :class:`~loratool.errors.MatchError` when nothing matches, when shapes disagree, or
    (``strict``) when any module is unmatched; :class:`~loratool.errors.NonFiniteError` for NaN/Inf
    in an adapter or a result unless ``allow_nonfinite``. Nothing is written on any error.
    """
    from loratool.api import load

    start = time.perf_counter()
    if not loras:
        raise UsageError("give at least one LoRA to merge")
    out_dtype = dtype if isinstance(dtype, torch.dtype) or dtype is None else parse_dtype(dtype)
    dev = pick_device(device)
    values = _strengths(strengths, len(loras))
    ckpt = open_checkpoint(base)
    out = Path(out)
    if ckpt.is_folder and out.suffix == ".safetensors":
        raise UsageError(f"{out}: the base {ckpt.root} is a folder, so the output is a folder too; drop the suffix")
    if not ckpt.is_folder and out.suffix != ".safetensors":
        raise UsageError(f"{out}: the base is one .safetensors file; name the output *.safetensors")
    # Refuse a bad output before the (possibly slow) adapter loading.
    local_inputs = [ckpt.root] + [p for p in loras if not isinstance(p, Adapter) and not str(p).startswith("hf://")]
    check_output(out, inputs=local_inputs, force=force, folder=ckpt.is_folder)

    adapters: list[Adapter] = []
    names: list[str] = []
    for i, item in enumerate(loras):
        if isinstance(item, Adapter):
            adapters.append(item)
            names.append(f"adapter {i + 1}")
        else:
            adapters.append(load(item, base=ckpt.root))
            names.append(str(item))
    with _compute_threads(dev):
        return _merge_loaded(base, ckpt, out, adapters, names, values, out_dtype, dev, strict, allow_nonfinite,
                             progress, start)


@contextlib.contextmanager
def _compute_threads(dev: torch.device) -> Iterator[None]:
    """One torch thread while merging on the CPU; the previous setting is restored after.

    The work is streamed in cache-sized blocks while a writer thread does the I/O: with one
    compute thread a core stays free for the kernel copies, and small ops do not pay OpenMP's
    hand-off (measured: 2 threads made a 4096×5120 block merge 4× slower on a busy 2-core box).
    """
    if dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _merge_loaded(base, ckpt: Checkpoint, out: Path, adapters: list[Adapter], names: list[str], values: list[float],
                  out_dtype: torch.dtype | None, dev: torch.device, strict: bool, allow_nonfinite: bool,
                  progress: Progress | None, start: float) -> MergeResult:
    if not allow_nonfinite:
        for adapter, name in zip(adapters, names):
            _check_adapter_finite(adapter, name)

    plan = match(adapters, values, ckpt, names=names)
    if strict and plan.unmatched:
        from loratool.errors import MatchError

        more = f" and {len(plan.unmatched) - 10} more" if len(plan.unmatched) > 10 else ""
        raise MatchError(
            f"{len(plan.unmatched)} adapter modules match no base weight (--strict): "
            f"{', '.join(plan.unmatched[:10])}{more}"
        )

    merger = _Merger(ckpt, plan, out_dtype, dev, allow_nonfinite, progress)
    dropped: list[str] = []
    if ckpt.is_folder:
        with atomic_path(out, folder=True) as tmp:
            files, dropped = _mirror_folder(ckpt, merger, tmp)
    else:
        part = ckpt.groups[0].parts[0]
        with atomic_path(out) as tmp:
            merger.write_part(part, tmp)
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
        dtype=None if out_dtype is None else str(out_dtype).replace("torch.", ""),
    )
