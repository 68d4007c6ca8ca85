"""The torch side of a merge: match adapters to base tensors, merge each tensor, write it.

:mod:`loratool.ops.merge` opens the base and the output and starts the copy before importing
this module. For every stored tensor W that modules touch, in adapter order (strength λᵢ):

    W ← merge_weight(W, moduleᵢ, λᵢ)        (W + λ·ΔW, or the DoRA form m ⊙ (W+λΔW)/‖W+λΔW‖)

computed in float32 (float64 for float64 bases) on the chosen device and cast back to the
stored dtype (or the requested one) once at the end (on the CPU, weights whose modules are all
row-separable go through the same ops a block of rows at a time: :class:`loratool.delta.RowMerge`).
Single-file weights stored transposed (OpenCLIP ``text_projection``) or with their two row halves
swapped (Flux / SD3 final modulation) are merged in the canonical orientation:
W_stored ← T(merge_weight(T(W_stored), module, λ)) with T the transpose / half swap (T∘T = id),
so DoRA norms are taken over the canonical weight's rows.
Plain modules therefore sum (W + Σ λᵢ·ΔWᵢ); DoRA
modules apply one after another as PEFT does when merging adapters in turn. A module with a
bias delta adds λ·Δb to ``<path>.bias``. PEFT ``modules_to_save`` tensors replace the base's.

A file whose layout the output keeps was copied ahead; only the changed tensors are written,
over it, at their offsets (:class:`~loratool.io.patch_writer.PatchWriter`). A file whose dtypes
change is written from scratch in order (:class:`~loratool.io.safetensors_writer.StreamingWriter`).

Quantized and low-precision weights (an :class:`~loratool.io.codecs.Entry` of their file's layout:
fp8, scaled fp8, bitsandbytes, GGUF) go through the same loop, asking their codec::

    W = decode(stored);  W' = merge_weight(W, ...) in float32;  stored' = encode(W')   (rounded once)

with their scales / block maxima rewritten beside them, or, when the policy dequantizes
(``--dtype``, bitsandbytes' default), W' cast to that dtype and the auxiliary tensors dropped.
Every such merge reports the update each module kept (:mod:`loratool.ops.kept`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from loratool.adapter import Adapter
from loratool.delta import RowMerge, delta_bias, merge_weight, row_merge
from loratool.errors import MatchError, NonFiniteError
from loratool.io.checkpoint import Checkpoint, Part, read_into
from loratool.io.codecs import Entry, QuantPolicy, layout_of
from loratool.io.codecs.fp8 import FP8
from loratool.io.copy_ahead import CopyAhead
from loratool.io.patch_writer import PatchWriter
from loratool.io.read_ahead import ReadAhead
from loratool.io.safetensors_file import itemsize, torch_dtypes
from loratool.io.safetensors_writer import SEGMENT_BYTES, StreamingWriter, TensorSpec
from loratool.ops import Progress
from loratool.ops.device import ThreadPolicy, pick_device
from loratool.ops.family_check import check_families
from loratool.ops.kept import KeptReport, region_records
from loratool.ops.matching import MatchPlan, match
from loratool.ops.merge import CONVERTIBLE, target_code

# Work block of the row-blocked merge (bytes of float32 rows): fits in L2 with its fp16 source;
# 1-4 MiB measured fastest for 4096×5120 weights on a 2-core EPYC (bench/bench_merge.py).
_BLOCK_BYTES = 2 * 1024 * 1024


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


def _written_nonfinite(work: torch.Tensor, stored: torch.Tensor, written: torch.Tensor) -> bool:
    """NaN/Inf in ``written`` (the decoded output of ``work``): for a float stored kind (float8) one
    aminmax of ``work`` within its range settles it, as in :func:`_result_nonfinite`."""
    if stored.is_floating_point() and work.numel():
        lo, hi = torch.aminmax(work)
        top = torch.finfo(stored.dtype).max
        if -top <= float(lo) and float(hi) <= top:
            return False
    return _nonfinite(written)


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


class PartMerger:
    """Writes the parts of one checkpoint; counts progress over every stored tensor."""

    def __init__(self, ckpt: Checkpoint, plan: MatchPlan, out_code: str | None, device: torch.device,
                 allow_nonfinite: bool, progress: Progress | None, copier: CopyAhead,
                 policy: QuantPolicy | None = None, threads: ThreadPolicy | None = None):
        self.ckpt = ckpt
        self.threads = threads or ThreadPolicy(None, device)  # CPU threads of the float work
        self.plan = plan
        self.out_code = out_code
        self.policy = policy or QuantPolicy()
        self.kept = KeptReport()
        self.device = device
        self.allow_nonfinite = allow_nonfinite
        self.progress = progress
        self.copier = copier
        self.total = sum(len(f.keys()) for _, _, f in ckpt.parts())
        self.done = 0
        self.merged = 0
        self.skipped = 0

    def _tick(self, n: int = 1) -> None:
        if n:
            self.done += n
            if self.progress is not None:
                self.progress("merging", self.done, self.total)

    def _target_dtype(self, info) -> torch.dtype:
        return torch_dtypes()[target_code(info.dtype_name, self.out_code)]

    def _touched(self, f_path: Path, key: str) -> bool:
        return (f_path, key) in self.plan.applications or (f_path, key) in self.plan.replacements

    def _out_spec(self, f, info) -> TensorSpec | None:
        """The output tensor of stored tensor ``info`` (None: dropped, an auxiliary of a dequantized weight)."""
        layout = layout_of(f)
        if self.policy.dequantize is not None and layout:
            if layout.hidden(info.name):
                return None
            entry = layout.entries.get(info.name)
            if entry is not None:
                return TensorSpec(info.name, torch_dtypes()[self.policy.dequantize], entry.shape)
        if info.name in layout.entries or layout.hidden(info.name):
            raise ValueError(f"{f.path}: {info.name} keeps its kind but its file is rewritten in order")
        # a control LoRA may widen the weight (matching records the new shape)
        return TensorSpec(info.name, self._target_dtype(info), self.plan.reshaped.get((f.path, info.name), info.shape))

    def write_part(self, part: Part, dest: Path) -> None:
        order = sorted(part.file.header.tensors.values(), key=lambda i: (i.start, i.end))
        if dest in self.copier:  # the output keeps this file's layout
            self._write_over_copy(part, dest, order)
        else:
            self._write_streamed(part, dest, order)

    def _write_over_copy(self, part: Part, dest: Path, order: list) -> None:
        """Write the changed tensors over the copy of ``part`` that :class:`CopyAhead` makes at ``dest``."""
        f = part.file
        at = f.header.data_offset
        entries = layout_of(f).entries
        changed = [i for i in order if self._touched(f.path, i.name)]
        spans = {}  # the copy skips them (CopyAhead.settle); a quantized weight's aux tensors go with it
        for i in changed:
            for key in entries[i.name].keys() if i.name in entries else [i.name]:
                spans[key] = (at + f.info(key).start, at + f.info(key).end)
        unchanged = iter([at + i.end for i in order if i.name not in spans])
        pending = [next(unchanged, None)]  # end of the next unchanged tensor not yet counted as copied

        def copied(upto: int) -> None:
            n = 0
            while pending[0] is not None and pending[0] <= upto:
                n += 1
                pending[0] = next(unchanged, None)
            self.skipped += n
            self._tick(n)

        src = os.open(f.path, os.O_RDONLY)
        try:
            ahead = ReadAhead(src, list(spans.values()))
            with PatchWriter(dest, spans, self.copier) as writer:
                for info in changed:
                    ahead.reached(spans[info.name][0])
                    self._write_changed(writer, f, src, info, touched=True)
                    copied(self.copier.settled(dest))
            self._tick(len(spans) - len(changed))  # the aux tensors written with their weights
        finally:
            os.close(src)
        self.copier.wait_file(dest, copied)

    def _write_streamed(self, part: Part, dest: Path, order: list) -> None:
        """Write ``part`` from its first byte: the dtype of some tensors changes, and with it every offset."""
        f = part.file
        header = f.header
        entries = layout_of(f).entries
        out = {i.name: self._out_spec(f, i) for i in order}
        specs = [spec for spec in out.values() if spec is not None]
        src = os.open(f.path, os.O_RDONLY)
        try:
            at = header.data_offset
            ahead = ReadAhead(src, [(at + i.start, at + i.end) for i in order if self._touched(f.path, i.name)])
            with StreamingWriter(dest, specs, header.metadata) as writer:
                for info in order:
                    touched = self._touched(f.path, info.name)
                    if out[info.name] is None:
                        self._tick()  # an auxiliary tensor of a weight written dequantized
                    elif touched or info.name in entries or out[info.name].dtype != info.dtype:
                        ahead.reached(at + info.start)
                        self._write_changed(writer, f, src, info, touched)
                    else:
                        writer.copy_tensor(info.name, f.path, header.data_offset + info.start, info.nbytes)
                        self.skipped += 1
                        self._tick()
        finally:
            os.close(src)

    def _write_changed(self, writer: StreamingWriter | PatchWriter, f, src: int, info, touched: bool) -> None:
        """Merge (``touched``) and / or cast one tensor and hand its bytes to ``writer``."""
        entry = layout_of(f).entries.get(info.name)
        if entry is not None:
            self._write_entry(writer, f, entry, touched)
            self.merged += touched
            self.skipped += not touched
            self._tick()
            return
        rows = self._row_merges(f, info)
        with self.threads.work(self._flops(f, info) if touched else 0.0):
            if rows is not None:
                self._write_blocked(writer, f, src, info, rows)
            else:
                tensor = self._compute(f, info.name) if touched else Checkpoint.read_tensor(f, info.name)
                writer.write_tensor(info.name, tensor.to(self._target_dtype(info)))
        self.merged += touched
        self.skipped += not touched
        self._tick()

    def _flops(self, f, info) -> float:
        """Rough float work of merging one tensor (sizes it for the thread policy)."""
        numel = 1
        for s in info.shape:
            numel *= int(s)
        ranks = sum(a.module.rank or 1 for a in self.plan.applications.get((f.path, info.name), ()))
        return float(numel) * (2 * ranks + 8)

    def _row_merges(self, f, info) -> list[tuple[int, int, RowMerge]] | None:
        """(first row, end row, RowMerge) per application when the tensor can be merged by row blocks, else None.

        Block-wise merging is the same arithmetic as :meth:`_compute` on fewer rows at a time;
        it is used for float tensors whose every application is row-separable (plain Linear LoRA,
        PEFT DoRA) and that no ``modules_to_save`` tensor replaces, on any device (the float work
        runs there, block by block; the stored and the written bytes stay in host memory).
        """
        key = (f.path, info.name)
        if info.dtype_name not in CONVERTIBLE or key in self.plan.replacements or key in self.plan.reshaped:
            return None
        work_dtype = torch.float64 if info.dtype == torch.float64 else torch.float32
        out: list[tuple[int, int, RowMerge]] = []
        for app in self.plan.applications.get(key, ()):
            if app.bias or len(info.shape) != 2 or app.transform is not None:
                return None  # a transposed / half-swapped weight is not merged row block by row block
            lo, hi = app.rows if app.rows is not None else (0, info.shape[0])
            rm = row_merge(app.module, app.strength, (hi - lo, info.shape[1]), dtype=work_dtype, device=self.device)
            if rm is None:
                return None
            out.append((lo, hi, rm))
        return out

    def _write_blocked(self, writer: StreamingWriter | PatchWriter, f, src: int, info, merges) -> None:
        """Read, merge and write one tensor a few rows at a time (cache-sized blocks, bounded memory).

        Per block: stored rows -> float32 (float64 for float64) -> each application's rows in
        order -> NaN/Inf check -> cast once to the output dtype, into a writer segment that the
        writer thread writes while the next segment is computed.
        """
        target = self._target_dtype(info)
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
        # cache-sized blocks on the CPU; on an accelerator a whole segment per transfer
        block = min(block, seg_rows) if self.device.type == "cpu" else seg_rows
        labels = [f"{rm.module.component}:{rm.module.path}" for _, _, rm in merges]
        stored_at = f.header.data_offset + info.start
        raw = torch.empty(seg_rows * row * in_size, dtype=torch.uint8)
        work_buf = torch.empty(block * row, dtype=work_dtype, device=self.device)
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
        work, labels = self._apply(f, key, Checkpoint.read_tensor(f, key))
        target = self._target_dtype(f.info(key))
        result = work.to(target)
        if not self.allow_nonfinite and _result_nonfinite(work, result):
            raise NonFiniteError(
                f"merging {', '.join(dict.fromkeys(labels))} into {key} gives NaN/Inf in "
                f"{result.dtype} (use --allow-nonfinite to write it anyway)"
            )
        return result.to("cpu")

    def _write_entry(self, writer: StreamingWriter | PatchWriter, f, entry: Entry, touched: bool) -> None:
        """Decode a quantized weight, merge it (``touched``), and write it in its kind or dequantized.

        W = decode(stored) and W' (float32) on the device; the output holds encode(W') (its aux
        tensors rewritten too) or W' cast to the policy's dtype. For a touched weight the update each
        module kept, ‖Q(W') − W‖ / ‖W' − W‖, is recorded (:mod:`loratool.ops.kept`).
        """
        codec = entry.codec
        stored = codec.read(f, entry)
        base = codec.decode(stored, entry).to(self.device)
        # _apply writes row ranges in place: only then does it need its own copy of W
        rows = any(app.rows is not None for app in self.plan.applications.get((f.path, entry.key), ()))
        work, labels = self._apply(f, entry.key, base.clone() if rows else base) if touched else (base, [])
        saturated = None
        if self.policy.dequantize is not None:
            target = torch_dtypes()[self.policy.dequantize]
            result = work.to(target)
            if not self.allow_nonfinite and _result_nonfinite(work, result):
                raise NonFiniteError(f"merging {', '.join(dict.fromkeys(labels))} into {entry.key} gives NaN/Inf in "
                                     f"{target} (use --allow-nonfinite to write it anyway)")
            writer.write_tensor(entry.key, result.to("cpu"))
            written, kind = (result.to(torch.float32) if touched else None), str(target).removeprefix("torch.")
        else:
            new = codec.encode(work, stored, entry, self.policy.rounding)
            new.aux = {**stored.aux, **new.aux}  # roles encode leaves alone (code maps, states) stay
            written, kind = codec.decode(new, entry).to(self.device), codec.label
            if touched and not self.allow_nonfinite and _written_nonfinite(work, new.tensor, written):
                raise NonFiniteError(f"merging {', '.join(dict.fromkeys(labels))} into {entry.key} gives NaN/Inf in "
                                     f"{codec.label} (use --allow-nonfinite to write it anyway)")
            if isinstance(codec, FP8):  # torch's cast clips e4m3fn at ±448 (one aminmax settles most tensors)
                top = torch.finfo(new.tensor.dtype).max
                lo, hi = torch.aminmax(work)
                saturated = work.abs() > top if max(-float(lo), float(hi)) > top else None
            writer.write_tensor(entry.key, new.tensor.to("cpu"))
            for role, key in entry.aux.items():
                writer.write_tensor(key, new.aux[role].to("cpu"))
        if touched:
            self.kept.records += region_records(base, work, written, self._regions(f, entry.key), entry.key, kind,
                                                saturated)

    def _regions(self, f, key: str) -> list[tuple[tuple[int, int] | None, list[str]]]:
        """(row range or None, module labels) of the applications to one stored tensor, rows merged."""
        regions: dict[tuple[int, int] | None, list[str]] = {}
        replacement = self.plan.replacements.get((f.path, key))
        if replacement is not None:
            regions[None] = [replacement[1]]
        for app in self.plan.applications.get((f.path, key), ()):
            regions.setdefault(app.rows, []).append(f"{app.module.component}:{app.module.path}")
        return [(rows, list(dict.fromkeys(labels))) for rows, labels in regions.items()]

    def _apply(self, f, key: str, stored: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """``stored`` with every application (or the replacement) to ``key`` applied, in the work dtype
        on the device; and the labels of what was applied. ``stored`` may be modified."""
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
        return work, labels

    def write_index(self, group, dest: Path) -> None:
        src = self.ckpt.root / group.index_rel
        widened = any(path == part.path for path, _ in self.plan.reshaped for part in group.parts)
        if self.out_code is None and self.policy.dequantize is None and not widened:
            shutil.copyfile(src, dest)
            return
        index = dict(group.index)
        total = 0
        dropped: set[str] = set()
        for part in group.parts:
            for info in part.file.header.tensors.values():
                spec = self._out_spec(part.file, info)
                if spec is None:
                    dropped.add(info.name)
                else:
                    total += spec.nbytes
        if dropped:
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in dropped}
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = total
        index["metadata"] = meta
        dest.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def load_adapters(ckpt: Checkpoint, loras: Sequence) -> tuple[list[Adapter], list[str]]:
    """The adapters (paths / ``hf://`` refs read with ``ckpt``'s names as vocabulary, or Adapter objects) and
    their names (the path as given, ``adapter N`` for an object)."""
    from loratool.api import load

    adapters: list[Adapter] = []
    names: list[str] = []
    for i, item in enumerate(loras):
        if isinstance(item, Adapter):
            adapters.append(item)
            names.append(f"adapter {i + 1}")
        else:
            adapters.append(load(item, base=ckpt.root))
            names.append(str(item))
    return adapters, names


def plan_merge(ckpt: Checkpoint, loras: Sequence, values: list[float], device: str, strict: bool,
               allow_nonfinite: bool, block_weights: Sequence[str] | None = None,
               strength_patterns: Sequence[str] | None = None,
               warnings: list[str] | None = None,
               ignore_family: bool = False) -> tuple[MatchPlan, list[str], torch.device]:
    """Load the adapters, check them (family: :mod:`loratool.ops.family_check`, unless ``ignore_family``),
    match them to ``ckpt``: (plan, adapter names, device).

    ``block_weights`` / ``strength_patterns`` scale each application (:mod:`loratool.ops.block_weights`);
    their warnings are appended to ``warnings``."""
    dev = pick_device(device)
    adapters, names = load_adapters(ckpt, loras)
    if not ignore_family:
        check_families(adapters, names, ckpt)
    if not allow_nonfinite:
        for adapter, name in zip(adapters, names):
            _check_adapter_finite(adapter, name)
    from loratool.arch.dit_checkpoints import route_expert

    adapters = [route_expert(ckpt, a) for a in adapters]
    plan = match(adapters, values, ckpt, names=names)
    from loratool.ops.check import unmatched_groups

    plan.unmatched_groups = unmatched_groups(adapters, plan, ckpt)
    if block_weights or strength_patterns:
        from loratool.ops.block_weights import apply_to_plan, module_weights

        weights = module_weights(adapters, block_weights, strength_patterns)
        apply_to_plan(plan, weights)
        if warnings is not None:
            warnings.extend(weights.warnings())

    if strict and plan.unmatched:
        more = f" and {len(plan.unmatched) - 10} more" if len(plan.unmatched) > 10 else ""
        raise MatchError(
            f"{len(plan.unmatched)} adapter modules match no base weight (--strict): "
            f"{', '.join(plan.unmatched[:10])}{more}"
        )
    return plan, names, dev
