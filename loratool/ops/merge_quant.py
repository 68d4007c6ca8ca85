"""Merging into quantized bases: how they are written, what is refused, what the output kept.

The decisions :func:`loratool.ops.merge.merge` takes before it writes anything, for bases whose
weights are quantized or low-precision (:mod:`loratool.io.codecs`): the :class:`QuantPolicy`
(rounded back to each weight's kind, or dequantized to a dtype), the refusals (kinds that cannot
be read or written back), the ``--base-16bit`` pairing checks, the warnings the kept-update
report (:mod:`loratool.ops.kept`) calls for, and the config a dequantized transformers folder
needs. The per-tensor work is :meth:`loratool.ops.merge_tensors.PartMerger._write_entry`.

This module does not import torch (``check_pair_values`` does, when called).
"""

from __future__ import annotations

import json
from pathlib import Path

from loratool.errors import MatchError, UsageError
from loratool.io.checkpoint import Checkpoint, Part
from loratool.io.codecs import Entry, QuantPolicy, Rounding, layout_of, logical_shape, unsupported
from loratool.io.gguf_file import GGUFFile

# ‖dequantized − original‖ / ‖original‖ past which a --base-16bit pair is not one model (NF4 rounds by ~10 %).
PAIR_TOLERANCE = 0.3
DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def base_kinds(ckpt: Checkpoint) -> dict[str, int]:
    """Storage kind -> number of quantized weights of that kind in ``ckpt`` (empty for a float base)."""
    out: dict[str, int] = {}
    for group in ckpt.groups:
        for part in group.parts:
            for label, n in layout_of(part.file).groups().items():
                out[label] = out.get(label, 0) + n
    return out


def _schemes(ckpt: Checkpoint) -> set[str]:
    return {e.scheme for g in ckpt.groups for p in g.parts for e in layout_of(p.file).entries.values()}


def quant_policy(ckpt: Checkpoint, out_code: str | None, suffix: str, rounding: str, seed: int,
                 requantize: bool) -> tuple[QuantPolicy, list[str]]:
    """How the merge writes the base's quantized weights, and the warnings that choice deserves.

    ``--dtype`` dequantizes every quantized weight to it; without it bitsandbytes weights become
    bf16 (unless ``requantize``) and a GGUF base written as ``.safetensors`` gets bf16 for its
    block-quantized tensors; every other kind is rounded back to itself.
    """
    if rounding not in ("nearest", "stochastic"):
        raise UsageError(f"--rounding {rounding}: choose nearest or stochastic")
    if requantize and out_code is not None:
        raise UsageError("--requantize keeps bitsandbytes weights quantized, --dtype dequantizes them: give one")
    gguf = any(isinstance(p.file, GGUFFile) for g in ckpt.groups for p in g.parts)
    if gguf and suffix == ".gguf" and out_code is not None:
        raise UsageError("a .gguf output keeps every tensor's type; --dtype needs a .safetensors output")
    schemes = _schemes(ckpt)
    bnb = "bitsandbytes" in schemes
    warnings: list[str] = []
    dequantize = out_code
    if dequantize is None and ((bnb and not requantize) or (gguf and suffix != ".gguf")):
        dequantize = "BF16"
    if requantize and bnb:
        warnings.append("requantizing bitsandbytes weights rounds the merged weight to 4 / 8 bits again (PEFT's "
                        "merge does the same): the update mostly vanishes; the 16-bit output (the default) keeps it")
    kinds_rounded = {label for label in base_kinds(ckpt) if "float8" in label}
    if rounding == "stochastic" and (dequantize is not None or not kinds_rounded):
        warnings.append("--rounding stochastic applies to float8 weights written as float8; nothing here is")
    return QuantPolicy(Rounding(rounding, seed), dequantize), warnings


def kept_warnings(report) -> list[str]:
    """Warnings for modules whose update the quantized output did not keep (:mod:`loratool.ops.kept`)."""
    out = []
    below = report.below()
    if below:
        shown = ", ".join(f"{', '.join(r.modules)} (kept {r.kept:.0%}, aligned {r.aligned:.0%})" for r in below[:5])
        more = f" and {len(below) - 5} more" if len(below) > 5 else ""
        out.append(f"{len(below)} module(s) kept under {report.threshold:.0%} of their update after rounding to the "
                   f"base's storage kind: {shown}{more}; overall kept {report.overall:.0%}, aligned "
                   f"{report.overall_aligned:.0%} (a 16-bit output, --dtype bf16, keeps it)")
    if report.saturated:
        out.append(f"{report.saturated} merged value(s) exceeded the float8 range and were clipped to its maximum")
    return out


def check_pair(quantized: Checkpoint, full: Checkpoint) -> None:
    """Refuse a ``--base-16bit`` pair whose parameters differ in names or shapes."""
    def params(ckpt: Checkpoint) -> dict[str, tuple[int, ...] | None]:
        out = {}
        for group in ckpt.groups:
            for part in group.parts:
                hidden = layout_of(part.file).hidden
                for key in part.file.keys():
                    if not hidden(key):
                        out[f"{group.component or ''}/{key}"] = logical_shape(part.file, key)
        return out

    q, f = params(quantized), params(full)
    problems = [f"{k.lstrip('/')} missing" for k in q if k not in f]
    problems += [f"{k.lstrip('/')} {list(q[k])} vs {list(f[k])}" for k in q
                 if k in f and q[k] is not None and f[k] is not None and tuple(q[k]) != tuple(f[k])]
    if not any(layout_of(p.file) for g in quantized.groups for p in g.parts):
        problems.insert(0, f"{quantized.root} holds no quantized weights")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise MatchError(f"--base-16bit {full.root} does not pair with {quantized.root}: "
                         f"{'; '.join(problems[:3])}{more}")


def drop_quantization_config(ckpt: Checkpoint, tmp: Path, code: str) -> None:
    """A dequantized transformers folder must not announce a quantization (transformers would apply it)."""
    name = DTYPE_NAMES[code]
    for group in ckpt.groups:
        rel = group.parts[0].rel.parent
        config = tmp / rel / "config.json"
        if not config.is_file():
            continue
        try:
            obj = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(obj, dict) or "quantization_config" not in obj:
            continue
        obj.pop("quantization_config")
        obj["torch_dtype" if "dtype" not in obj else "dtype"] = name
        config.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def touched_entries(ckpt: Checkpoint, plan) -> list[tuple[Part, Entry]]:
    """The quantized weights the plan changes, with their parts."""
    out = []
    for group in ckpt.groups:
        for part in group.parts:
            entries = layout_of(part.file).entries
            for key in entries:
                if (part.path, key) in plan.applications or (part.path, key) in plan.replacements:
                    out.append((part, entries[key]))
    return out


def rewritten(ckpt: Checkpoint, plan) -> set[tuple[Path, str]]:
    """(file, stored key) of every tensor the merge writes over a copy: the changed ones and the
    auxiliary tensors (scales, block maxima) of the changed quantized weights."""
    keys = set(plan.applications) | set(plan.replacements)
    for part, entry in touched_entries(ckpt, plan):
        keys.update((entry.where[k].path if k in entry.where else part.path, k) for k in entry.keys())
    return keys


def check_quantized(ckpt: Checkpoint, plan, policy: QuantPolicy) -> None:
    """Refuse, before anything is written, a merge into quantized weights that cannot be read, or
    (kept in their kind) written back."""
    found = touched_entries(ckpt, plan)
    for part, entry in found:
        if entry.shape is None:  # a kind that hides the weight: it cannot be decoded either
            unsupported([entry], part.path)
    if policy.dequantize is not None:  # every quantized weight of the output is decoded
        for group in ckpt.groups:
            for part in group.parts:
                unsupported([e for e in layout_of(part.file).entries.values() if e.shape is None], part.path)
    else:
        by_part: dict[Path, list[Entry]] = {}
        for part, entry in found:
            by_part.setdefault(part.path, []).append(entry)
        for path, entries in by_part.items():
            unsupported(entries, path)
            split = [e.key for e in entries if e.where]
            if split:
                raise UsageError(f"{path}: {', '.join(split[:3])}: the weight and its quantization state lie in "
                                 f"different shards; loratool writes those dequantized only (drop --requantize)")


def check_pair_values(quantized: Checkpoint, full: Checkpoint, plan, limit: int = 3) -> None:
    """Refuse a ``--base-16bit`` original that is not the quantized base's: the first ``limit`` changed
    weights must dequantize to within the quantization's error of the 16-bit ones."""
    import torch

    files = {part.path: part.file for g in full.groups for part in g.parts}
    quant_files = [part.file for g in quantized.groups for part in g.parts]
    checked = 0
    for path, key in plan.applications:
        qfile = next((f for f in quant_files if key in layout_of(f).entries), None)
        if qfile is None:
            continue
        original = Checkpoint.read_weight(files[path], key).to(torch.float32)
        dequantized = Checkpoint.read_weight(qfile, key).to(torch.float32)
        scale = float(original.norm())
        rel = float((dequantized - original).norm()) / scale if scale else float(dequantized.norm())
        if rel > PAIR_TOLERANCE:
            raise MatchError(f"--base-16bit {full.root}: {key} differs from the quantized base's by {rel:.0%} "
                             f"(quantization explains under {PAIR_TOLERANCE:.0%}); is it the original of "
                             f"{quantized.root}?")
        checked += 1
        if checked >= limit:
            return
