"""Merge one or more adapters into a base checkpoint, streaming one tensor at a time.

Each touched weight W becomes W + Σ λᵢ·ΔWᵢ (DoRA modules: PEFT's form, in adapter order),
computed in float32 and cast back once: the maths is in :mod:`loratool.ops.merge_tensors`.

The output mirrors the base: same file names, tensor order, dtypes and header (kept byte for
byte unless ``dtype`` changes it); untouched tensors are copied as bytes; quantized weights (fp8,
scaled fp8, GGUF; bitsandbytes with ``requantize``) are merged in float32 and rounded once back to
their kind, scales recomputed (docs/quantized.md), or written dequantized in ``dtype``
(bitsandbytes' default: bf16); a GGUF base gives a ``.gguf`` (same types) or, asked for, a
``.safetensors`` output (dequantized); a folder base gives
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

import contextlib
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from loratool.arch.llm import VOCAB_FIELD, VOCAB_TENSORS
from loratool.errors import LoratoolError, UsageError
from loratool.float_dtypes import float_code
from loratool.io.atomic import atomic_path, check_output
from loratool.io.checkpoint import WEIGHT_SUFFIXES, Checkpoint, Part, open_checkpoint
from loratool.io.codecs import QuantPolicy, layout_of
from loratool.io.copy_ahead import CopyAhead
from loratool.io.gguf_file import GGUFFile
from loratool.io.model_config import CONFIG_NAME, retyped
from loratool.io.safetensors_file import read_header
from loratool.ops import Progress
from loratool.ops.argument_order import check_merge_order
from loratool.ops.merge_quant import (
    DTYPE_NAMES,
    base_kinds,
    check_pair,
    check_pair_values,
    check_quantized,
    drop_quantization_config,
    kept_warnings,
    quant_policy,
    rewritten,
)

if TYPE_CHECKING:
    import torch

    from loratool.adapter import Adapter
    from loratool.ops.merge_tensors import PartMerger


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
    # unmatched modules the base's family explains (a LoRA for another variant), per group with the reason
    unmatched_groups: list[dict] = field(default_factory=list)
    kept: dict | None = None  # the kept-update report of a merge into quantized weights (ops.kept)
    quantized: dict[str, int] = field(default_factory=dict)  # base storage kind -> weights of that kind
    rounding: str = "nearest"
    seed: int | None = None
    dequantized: str | None = None  # the dtype quantized weights were written in (None: kept in their kind)
    warnings: list[str] = field(default_factory=list)
    # the unmatched modules by cause, one group each, as ``check`` reports them (loratool.ops.check.Group.to_json)
    unmatched_groups: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "base": self.base,
            "inputs": [{"file": a, "strength": s} for a, s in zip(self.adapters, self.strengths)],
            "matched": self.matched,
            "matched_total": sum(self.matched.values()),
            "unmatched": self.unmatched,
            "unmatched_count": len(self.unmatched),
            "unmatched_groups": self.unmatched_groups,
            "merged_tensors": self.merged_tensors,
            "copied_tensors": self.skipped,
            "dropped_files": self.dropped_files,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "device": self.device,
            "dtype": self.dtype,
            "quantized": self.quantized,
            "rounding": self.rounding,
            "seed": self.seed,
            "dequantized": self.dequantized,
            "kept_update": self.kept,
            "warnings": self.warnings,
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


def keeps_layout(part: Part, out_code: str | None, policy: QuantPolicy | None = None, container: str | None = None
                 ) -> bool:
    """Whether the output file of ``part`` has the base file's layout (no tensor changes dtype, no
    quantized weight is dequantized, a GGUF file stays GGUF: ``container`` is the output's suffix)."""
    if isinstance(part.file, GGUFFile) and container not in (None, ".gguf"):
        return False
    if policy is not None and policy.dequantize is not None and layout_of(part.file):
        return False
    return all(target_code(i.dtype_name, out_code) == i.dtype_name for i in part.file.header.tensors.values())


def _copies(ckpt: Checkpoint, tmp: Path, out_code: str | None, policy: QuantPolicy | None = None,
            container: str | None = None) -> list[tuple[Part, Path]]:
    """(base part, output file) for every part whose layout the output keeps: those are copied ahead."""
    out = []
    for group in ckpt.groups:
        for part in group.parts:
            if keeps_layout(part, out_code, policy, container):
                dest = tmp / part.rel if ckpt.is_folder else tmp
                dest.parent.mkdir(parents=True, exist_ok=True)
                out.append((part, dest))
    return out


def _span(part: Part, key: str) -> tuple[int, int]:
    """Absolute byte span of tensor ``key`` in ``part``'s file."""
    info = part.file.info(key)
    at = part.file.header.data_offset
    return at + info.start, at + info.end


def _spans(part: Part) -> list[tuple[int, int]]:
    """The header and every tensor of ``part``'s file, in file order (GGUF: with the padding between)."""
    if isinstance(part.file, GGUFFile):
        return part.file.spans()
    return [(0, part.file.header.data_offset)] + sorted(_span(part, k) for k in part.file.keys())


def _adapter_names(loras: Sequence) -> str:
    """Every tensor name of the local safetensors adapters (and module paths of in-memory ones),
    dots as underscores, each wrapped in ``_``, one per line: what :func:`_guess_rewrites` searches."""
    names: list[str] = []
    for item in loras:
        if not isinstance(item, (str, os.PathLike)):
            names.extend(m.path for m in item)  # an Adapter: torch is imported already
            continue
        path = Path(item)
        if str(item).startswith("hf://") or not path.exists():
            continue
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*/*.safetensors"))
        for file in files:
            if file.suffix == ".safetensors":
                with contextlib.suppress(LoratoolError):  # the adapter reader reports a bad file
                    names.extend(read_header(file).tensors)
    return "\n".join("_" + n.replace(".", "_").lower() + "_" for n in names)


def _guess_rewrites(copies: list[tuple[Part, Path]], loras: Sequence) -> dict[Path, list[tuple[int, int]]]:
    """Tensors the adapters probably change, from names alone (before any adapter is loaded).

    A base tensor ``a.b.weight`` is guessed when ``_a_b_`` occurs in an adapter tensor name with
    dots as underscores (PEFT, kohya and diffusers names all embed the module path that way).
    A guess only orders the copy (guessed tensors are copied last, and only if the merge turns
    out not to rewrite them); a wrong one costs time, never correctness.
    """
    names = _adapter_names(loras)
    if not names:
        return {}
    out: dict[Path, list[tuple[int, int]]] = {}
    for part, dest in copies:
        for key in part.file.keys():
            module = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
            if "_" + module.replace(".", "_").lower() + "_" in names:
                out.setdefault(dest, []).append(_span(part, key))
    return out


def _rewrites(copies: list[tuple[Part, Path]], keys) -> dict[Path, list[tuple[int, int]]]:
    """The byte spans of the copied parts that the merge writes itself (``keys``: (file, tensor) pairs)."""
    out: dict[Path, list[tuple[int, int]]] = {}
    for part, dest in copies:
        out[dest] = [_span(part, k) for k in part.file.keys() if (part.path, k) in keys]
    return out


def _mirror_folder(ckpt: Checkpoint, merger: PartMerger, tmp: Path,
                   dtype_name: str | None = None) -> tuple[list[str], list[str]]:
    """Write every group into ``tmp`` and copy the other files; returns (files written, dropped).

    ``dtype_name``: the dtype the weights are now stored in (``--dtype``); each ``config.json``
    saying another float dtype (``torch_dtype`` / ``dtype``) is rewritten to say this one."""
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
    for rel in _base_files(ckpt):
        src, name = ckpt.root / rel, rel.name
        if os.path.normpath(src) in handled:
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".safetensors.index.json") \
                or name.endswith(".bin.index.json"):
            dropped.append(str(rel))
            continue
        (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
        text = retyped(src, dtype_name) if dtype_name and name == CONFIG_NAME else None
        if text is not None:
            (tmp / rel).write_text(text, encoding="utf-8")
        else:
            shutil.copyfile(src, tmp / rel)
    return written, dropped


def _base_files(ckpt: Checkpoint) -> Iterator[Path]:
    """Every file of a folder base that a merged folder mirrors, relative to its root (dot files skipped)."""
    for dirpath, dirnames, filenames in os.walk(ckpt.root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(ckpt.root)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield rel_dir / name


# A reshaped weight changes its model's config: the stored key (regex) -> (config.json field, the axis that
# holds it). A control LoRA widens x_embedder's input (diffusers _MODULE_NAME_TO_ATTRIBUTE_MAP_FLUX); a PEFT
# adapter trained after resize_token_embeddings brings embeddings with more rows (transformers vocab_size).
RESHAPED_CONFIG = ((r"^x_embedder\.weight$", "in_channels", 1), (VOCAB_TENSORS, VOCAB_FIELD, 0))


def _widen_configs(ckpt: Checkpoint, reshaped: dict, tmp: Path) -> None:
    """Update ``config.json`` beside a folder component whose weight changed shape, as diffusers / transformers
    would write it (``x_embedder`` [D, 64] -> [D, 128] sets ``in_channels`` to 128; 72 embedding rows set
    ``vocab_size`` to 72), so the merged model loads."""
    import json
    import re

    for group in ckpt.groups:
        for part in group.parts:
            for (path, key), shape in reshaped.items():
                config = tmp / part.rel.parent / "config.json"
                found = next(((f, axis) for pattern, f, axis in RESHAPED_CONFIG if re.search(pattern, key)), None)
                if path != part.path or found is None or not config.is_file():
                    continue
                field_name, axis = found
                data = json.loads(config.read_text(encoding="utf-8"))
                if field_name == "in_channels" and data.get("out_channels") is None:
                    data["out_channels"] = data.get("in_channels")  # Flux: out_channels defaults to in_channels
                data[field_name] = int(shape[axis])
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def merge(
    base: str | os.PathLike,
    loras: Sequence[str | os.PathLike | Adapter],
    out: str | os.PathLike,
    strengths: float | Sequence[float] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "auto",
    threads: int | None = None,
    strict: bool = False,
    force: bool = False,
    allow_nonfinite: bool = False,
    sync: bool = False,
    ignore_family: bool = False,
    progress: Progress | None = None,
    block_weights: Sequence[str] | None = None,
    strength_patterns: Sequence[str] | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    requantize: bool = False,
    base_16bit: str | os.PathLike | None = None,
) -> MergeResult:
    """Merge ``loras`` (paths, ``hf://`` refs or :class:`Adapter` objects) into ``base``; write ``out``.

    ``block_weights`` (LoRA Block Weight presets / vectors, once or once per LoRA) and
    ``strength_patterns`` (``PATTERN:VALUE``) scale modules: see :mod:`loratool.ops.block_weights`.
    Quantized bases (docs/quantized.md): ``rounding`` (``nearest`` / ``stochastic``, seeded per key
    by ``seed``) rounds merged float8 weights; bitsandbytes weights are written in bf16 (or ``dtype``)
    unless ``requantize``; ``base_16bit`` names the 16-bit original of a bitsandbytes base: its
    names and shapes are checked against the quantized one, then the merge goes into it.

    ``sync`` flushes the output to disk before it is renamed into place (see
    :func:`loratool.io.atomic.atomic_path`). Raises :class:`~loratool.errors.MatchError` when
    nothing matches, when shapes disagree, or (``strict``) when any module is unmatched;
    :class:`~loratool.errors.NonFiniteError` for NaN/Inf in an adapter or a result unless
    ``allow_nonfinite``; a :class:`~loratool.errors.MatchError` when an adapter's model family and the
    base's are both known and unrelated (an SD1 LoRA into a Llama base), unless ``ignore_family``
    (:mod:`loratool.ops.family_check`). Nothing is written on any error.
    """
    start = time.perf_counter()
    if not loras:
        raise UsageError("give at least one LoRA to merge")
    check_merge_order(base, list(loras))
    out_code = _out_code(dtype)
    values = _strengths(strengths, len(loras))
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise UsageError(f"--threads {threads}: must be a positive integer")
    ckpt = open_checkpoint(base)
    quantized_base = None
    if base_16bit is not None:
        quantized_base, ckpt = ckpt, open_checkpoint(base_16bit)
        check_pair(quantized_base, ckpt)
    out = Path(out)
    gguf = any(isinstance(p.file, GGUFFile) for g in ckpt.groups for p in g.parts)
    if ckpt.is_folder and out.suffix == ".safetensors":
        raise UsageError(f"{out}: the base {ckpt.root} is a folder, so the output is a folder too; drop the suffix")
    if not ckpt.is_folder and out.suffix not in ((".gguf", ".safetensors") if gguf else (".safetensors",)):
        kinds = "*.gguf (same tensor types) or *.safetensors (dequantized)" if gguf else "*.safetensors"
        raise UsageError(f"{out}: the base is one {'GGUF' if gguf else '.safetensors'} file; name the output {kinds}")
    policy, warnings = quant_policy(ckpt, out_code, out.suffix, rounding, seed, requantize)
    # Refuse a bad output before the (possibly slow) adapter loading.
    local_inputs = [ckpt.root] + [p for p in loras if isinstance(p, (str, os.PathLike)) and not str(p).startswith("hf://")]
    if quantized_base is not None:
        local_inputs.append(quantized_base.root)
    # --force may replace a folder holding only what this merge writes: the base's files, mirrored
    mirrored = {PurePosixPath(rel.as_posix()) for rel in _base_files(ckpt)} if ckpt.is_folder else set()
    check_output(out, inputs=local_inputs, force=force, folder=ckpt.is_folder, owned=mirrored.__contains__)

    with atomic_path(out, folder=ckpt.is_folder, sync=sync) as tmp:
        copies = _copies(ckpt, tmp, out_code, policy, None if ckpt.is_folder else out.suffix)
        jobs = [(part.path, dest, _spans(part)) for part, dest in copies]
        with CopyAhead(jobs, defer=_guess_rewrites(copies, loras), sync=sync) as copier:
            from loratool.ops import merge_tensors  # torch: imported while the copy runs
            from loratool.ops.device import ThreadPolicy, single_threaded

            with single_threaded():  # one torch thread unless the policy measures more to be faster
                plan, names, dev = merge_tensors.plan_merge(ckpt, loras, values, device, strict, allow_nonfinite,
                                                            block_weights, strength_patterns, warnings, ignore_family)
                check_quantized(ckpt, plan, policy)
                if quantized_base is not None:
                    check_pair_values(quantized_base, ckpt, plan)
                for part, dest in copies:  # a widened tensor changes the file's layout: written from scratch
                    if any(fp == part.path for fp, _ in plan.reshaped):
                        copier.drop(dest)
                copier.settle(_rewrites([c for c in copies if c[1] in copier], rewritten(ckpt, plan)))
                merger = merge_tensors.PartMerger(ckpt, plan, out_code, dev, allow_nonfinite, progress, copier,
                                                  policy, ThreadPolicy(threads, dev))
                dropped: list[str] = []
                if ckpt.is_folder:
                    files, dropped = _mirror_folder(ckpt, merger, tmp, DTYPE_NAMES.get(out_code))
                    _widen_configs(ckpt, plan.reshaped, tmp)
                    if policy.dequantize is not None:
                        drop_quantization_config(ckpt, tmp, policy.dequantize)
                else:
                    merger.write_part(ckpt.groups[0].parts[0], tmp)
                    files = [out.name]
    warnings += kept_warnings(merger.kept)
    result_kinds = base_kinds(ckpt)
    return MergeResult(
        output=out,
        base=str(base),
        adapters=names,
        strengths=values,
        matched=dict(plan.matched),
        unmatched=list(plan.unmatched),
        unmatched_groups=list(plan.unmatched_groups),
        merged_tensors=merger.merged,
        skipped=merger.skipped,
        dropped_files=dropped,
        files=files,
        seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
        device=str(dev),
        dtype=DTYPE_NAMES.get(out_code),
        kept=merger.kept.to_json(),
        quantized=result_kinds,
        rounding=policy.rounding.mode,
        seed=policy.rounding.seed if policy.rounding.mode == "stochastic" else None,
        dequantized=DTYPE_NAMES.get(policy.dequantize) if result_kinds else None,
        warnings=warnings,
    )
