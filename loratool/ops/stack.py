"""Add several adapters into one: ΔW = Σᵢ wᵢ · ΔWᵢ, module by module over the union of modules.

Every contribution is first brought to its exact factor form ΔMᵢ = sᵢ · upᵢ @ downᵢ
(:mod:`loratool.ops.factor_form`); a dense one (``full``, large LoHa products) or a Kronecker one
(LoKr, through the Kronecker product of its factors' SVDs) is factored exactly by its SVD, keeping
every singular value above the usual rounding tolerance (:func:`~loratool.ops.factor_form.explicit_factors`).

* ``concat`` (exact): up = [c₁·up₁ | c₂·up₂ | …], down = [down₁; down₂; …] with
  cᵢ = wᵢ · sᵢ / s', so s' · up @ down = Σ wᵢ sᵢ upᵢ downᵢ. Ranks add up; the weight is applied
  once, to the up side only (never to both factors, never by summing factors of equal rank,
  which would create cross terms). Negative weights subtract.
* ``svd``: the best rank-N approximation of the same sum, from the SVD of the stacked factors
  (QR of the stacked up and downᵀ, then a small core SVD; ΔW is never formed). The parts of a fused
  native module (Flux ``qkv``, ``linear1``) are truncated together as the one matrix the file holds
  (:func:`stack_fused`), so it gets rank N, not N per part.

Output scale s': the common scale when every contribution is a plain LoRA with the same scale
(so alpha/r keeps its meaning, alpha' = s' · R); otherwise 1 (alpha' = R). rsLoRA is kept
when every contribution uses it (alpha' = s' · √R). Bias deltas (PEFT ``lora_bias``,
a full module's ``diff_b``) become bias' = Σ wᵢ Δbᵢ / s'.
DoRA modules cannot be added (their magnitudes are absolute, not deltas) unless only one
input has that module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.delta import delta_bias
from loratool.errors import MatchError, NonFiniteError, UsageError
from loratool.float_dtypes import float_code
from loratool.ops import Progress
from loratool.ops.device import ThreadPolicy, check_threads, pick_device, single_threaded, single_threaded_op
from loratool.ops.factor_form import FactorForm, explicit_factors, svd_flops, to_factor_form, to_module, transposed
from loratool.ops.linalg import compute_dtype, split_factors, stacked_factor_svd
from loratool.ops.rank_rules import select_rank
from loratool.ops.resize import STALE_KEYS, network_metadata, output_layout

METHODS = ("concat", "svd")


@dataclass
class ModuleStack:
    component: str
    path: str
    sources: list[int]  # indexes of the inputs that hold this module
    rank_out: int
    fro_kept: float  # ‖result‖ / ‖Σ wᵢ ΔWᵢ‖ (1.0 for concat)

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "path": self.path, "sources": self.sources,
                "rank_out": self.rank_out, "fro_kept": self.fro_kept}


@dataclass
class StackResult:
    adapter: Adapter
    modules: list[ModuleStack]
    method: str
    rank: int | None
    weights: list[float]
    labels: list[str]
    device: str
    output: Path | None = None
    files: list[Path] = field(default_factory=list)
    output_format: str | None = None
    warnings: list[str] = field(default_factory=list)
    dtype: str | None = None  # the written factors' dtype when one was asked for
    combine: dict[str, Any] | None = None  # the combination method's parameters (ties, dare_*, ...)
    block_weights: dict[str, Any] | None = None

    @property
    def mean_fro_kept(self) -> float:
        return float(sum(m.fro_kept for m in self.modules) / len(self.modules)) if self.modules else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "format": self.output_format,
            "files": [str(f) for f in self.files],
            "method": self.method,
            "rank": self.rank,
            "inputs": [{"file": lab, "weight": w, "module_count": sum(1 for m in self.modules if i in m.sources)}
                       for i, (lab, w) in enumerate(zip(self.labels, self.weights))],
            "dtype": self.dtype,
            "device": self.device,
            "modules": [m.to_json() for m in self.modules],
            "mean_fro_kept": self.mean_fro_kept,
            "warnings": list(self.warnings),
            "combine": self.combine,
            "block_weights": self.block_weights,
        }


def _kernel(form: FactorForm) -> tuple[int, ...]:
    """The spatial kernel of the weight, () for a Linear and for a 1×1 conv (the same ΔW matrix)."""
    return tuple(int(k) for k in form.weight_shape[2:]) if math.prod(form.weight_shape[2:]) > 1 else ()


def _check_same_target(key: tuple[str, str], entries: list[tuple[int, LoraModule, FactorForm]],
                       labels: list[str]) -> tuple[LoraModule, FactorForm]:
    """Refuse contributions that adapt different weights; return the (module, form) whose layout the
    sum takes: a conv over a linear-typed one (a 1×1 conv and a Linear are the same ΔW; a flattened
    LoHa / LoKr product of unknown kernel fits the conv whose matrix it is)."""
    i0, m0, f0 = entries[0]
    for i, m, f in entries[1:]:
        kernels = {_kernel(f0), _kernel(f)}
        flattened = "linear" in (m.layer, m0.layer) and "conv" in (m.layer, m0.layer)
        if transposed(m) != transposed(m0) or f.shape != f0.shape or (len(kernels) > 1 and not flattened) \
                or "embedding" in (m.layer, m0.layer) and m.layer != m0.layer:
            raise MatchError(
                f"{key[0]}:{key[1]}: {labels[i0]} adapts a {m0.layer} weight of shape {tuple(f0.weight_shape)}, "
                f"{labels[i]} a {m.layer} weight of shape {tuple(f.weight_shape)}; they cannot be added"
            )
    _, m, f = max(entries, key=lambda e: (len(e[2].weight_shape), math.prod(e[2].weight_shape[2:])))
    return m, f


def _output_scale(modules: list[LoraModule]) -> tuple[float, bool]:
    """(s', rslora) for the output module (see the module docstring)."""
    rslora = all(m.kind == "lora" and m.rslora for m in modules)
    scales = [m.scale for m in modules]
    if all(m.kind == "lora" for m in modules) and all(math.isfinite(s) and s > 0 for s in scales):
        if max(scales) - min(scales) <= 1e-12 * max(scales):
            return scales[0], rslora
    return 1.0, rslora


def _contributions(key: tuple[str, str], entries: list[tuple[int, LoraModule]], weights: list[float],
                   labels: list[str], device: torch.device):
    """(template module, its form, the modules, ups, downs, coefficients): Σ cᵢ · upᵢ @ downᵢ is Σ wᵢ ΔMᵢ."""
    work = compute_dtype(device, 0)
    forms = [(i, m, to_factor_form(m, dtype=work, device=device)) for i, m in entries]
    template, template_form = _check_same_target(key, forms, labels)
    ups, downs, coefs = [], [], []
    for i, _m, form in forms:
        up, down, s = explicit_factors(form)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise NonFiniteError(f"{key[0]}:{key[1]} in {labels[i]}: factors hold NaN or Inf")
        ups.append(up)
        downs.append(down)
        coefs.append(weights[i] * s)
    return template, template_form, [m for _, m, _ in forms], ups, downs, coefs


def _with_bias(out: LoraModule, entries: list[tuple[int, LoraModule]], weights: list[float], scale: float,
               dtype: torch.dtype) -> LoraModule:
    biases = [(weights[i], delta_bias(m, dtype=torch.float64)) for i, m in entries]
    biases = [(w, b) for w, b in biases if b is not None]
    if biases:  # s' · bias' = Σ wᵢ Δbᵢ
        out.tensors["bias"] = (sum(w * b for w, b in biases) / scale).to(dtype)
    return out


def stack_module(
    key: tuple[str, str],
    entries: list[tuple[int, LoraModule]],
    weights: list[float],
    method: str,
    rank: int | None,
    labels: list[str],
    device: torch.device,
) -> tuple[LoraModule, ModuleStack]:
    """One output module from the inputs' modules at ``key``."""
    template, template_form, modules, ups, downs, coefs = _contributions(key, entries, weights, labels, device)
    scale, rslora = _output_scale(modules)
    shape = template_form.weight_shape
    if method == "concat":
        up = torch.cat([u * (c / scale) for u, c in zip(ups, coefs)], dim=1)
        down = torch.cat(downs, dim=0)
        kept = 1.0
    else:
        svd = stacked_factor_svd(ups, downs, coefs, dtype=compute_dtype(device, 0))
        k = select_rank(svd.S, rank)
        kept = svd.fro_kept(k)
        up, down = split_factors(svd.truncate(k), scale)
    out = to_module(template, shape, up, down, scale=scale, rslora=rslora, dtype=template.dtype)
    _with_bias(out, entries, weights, scale, template.dtype)
    report = ModuleStack(key[0], key[1], [i for i, _ in entries], int(up.shape[1]), kept)
    return out, report


def stack_fused(
    items: list[tuple[tuple[str, str], list[tuple[int, LoraModule]], list[float]]],
    rank: int,
    labels: list[str],
    device: torch.device,
) -> list[tuple[LoraModule, ModuleStack]]:
    """``svd`` for the parts of one fused native module (row blocks in order: Flux ``qkv`` / ``linear1``), as
    :func:`loratool.ops.resize.resize_fused` does for one input: the native Σ wᵢ [ΔMᵢ₁; ΔMᵢ₂; …] is truncated
    as one matrix, each (input, part) contributing its up padded to its rows, so every part gets the shared
    down' and its rows of up' (rank k for the module the file holds, not G·k). ``fro_kept`` of a part is
    ‖its rows of U_k·S_k‖ / ‖its rows of U·S‖."""
    parts = [_contributions(key, entries, weights, labels, device) for key, entries, weights in items]
    rows = [int(form.shape[0]) for _, form, *_ in parts]
    if len({int(form.shape[1]) for _, form, *_ in parts}) != 1:
        names = ", ".join(f"{k[0]}:{k[1]}" for k, _, _ in items)
        raise UsageError(f"{names}: the parts of one fused module differ in input width")
    total, ups, downs, coefs = sum(rows), [], [], []
    for g, (_, _, _, part_ups, part_downs, part_coefs) in enumerate(parts):
        for up, down, c in zip(part_ups, part_downs, part_coefs):
            padded = up.new_zeros(total, up.shape[1])
            padded[sum(rows[:g]):sum(rows[:g + 1])] = up
            ups.append(padded)
            downs.append(down)
            coefs.append(c)
    svd = stacked_factor_svd(ups, downs, coefs, dtype=compute_dtype(device, 0))
    k = select_rank(svd.S, rank)
    scale, rslora = _output_scale([m for part in parts for m in part[2]])
    up, down = split_factors(svd.truncate(k), scale)
    us = svd.U * svd.S
    out = []
    for g, ((key, entries, weights), (template, form, *_)) in enumerate(zip(items, parts)):
        a, b = sum(rows[:g]), sum(rows[:g + 1])
        full = float(us[a:b].double().norm())
        kept = float(us[a:b, :k].double().norm()) / full if full > 0 else 1.0
        module = to_module(template, form.weight_shape, up[a:b], down, scale=scale, rslora=rslora,
                           dtype=template.dtype)
        _with_bias(module, entries, weights, scale, template.dtype)
        out.append((module, ModuleStack(key[0], key[1], [i for i, _ in entries], k, kept)))
    return out


def _fused_work(work: list) -> tuple[list, list[list]]:
    """``work`` split into single modules and the parts of fused native modules (``hints["fused"]`` of the
    first input holding each, every part present), each group in row order."""
    groups: dict[tuple[str, str, int], dict[int, Any]] = {}
    for item in work:
        fused = item[1][0][1].hints.get("fused")
        if fused is not None and int(fused[2]) > 1:
            groups.setdefault((item[0][0], str(fused[0]), int(fused[2])), {})[int(fused[1])] = item
    whole = [[parts[i] for i in sorted(parts)] for (_, _, n), parts in groups.items() if len(parts) == n]
    taken = {id(item) for group in whole for item in group}
    return [item for item in work if id(item) not in taken], whole


@single_threaded_op
def stack(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    *,
    method: str = "concat",
    rank: int | None = None,
    labels: Sequence[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    progress: Progress | None = None,
    options: Any = None,
    module_weights: Any = None,
) -> StackResult:
    """Σ wᵢ ΔWᵢ of ``adapters`` over the union of their modules (see the module docstring).

    ``method`` may also be a combination method of :mod:`loratool.ops.combine_methods` (``ties``,
    ``dare_ties``, ``dare_linear``, ``magnitude_prune``; ``options`` a ``CombineOptions``).
    ``module_weights`` (:class:`loratool.ops.block_weights.ModuleWeights`) multiplies wᵢ per module.
    """
    from loratool.ops import combine_methods

    n = len(adapters)
    if n < 1:
        raise UsageError("stack needs at least one adapter")
    weights = [1.0] * n if weights is None or len(weights) == 0 else [float(w) for w in weights]
    if len(weights) != n:
        raise UsageError(f"--weights: {len(weights)} weights for {n} adapters; give one per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights {weights}: weights must be finite numbers")
    if method not in METHODS and method not in combine_methods.METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS + tuple(combine_methods.METHODS))}")
    if method == "svd" and (rank is None or int(rank) < 1):
        raise UsageError("--method svd needs --rank N (N ≥ 1)")
    if method == "concat" and rank is not None:
        raise UsageError("--rank applies to --method svd only (concat is exact: ranks add up)")
    if options is not None and method in METHODS:
        raise UsageError(f"--density / --seed / --factor-space apply to {', '.join(combine_methods.METHODS)}, "
                         f"not to --method {method}")
    labels = list(labels) if labels is not None else [f"adapter {i + 1}" for i in range(n)]
    dev = pick_device(device)
    combiner = combine_methods.combiner(method, rank, options, n, labels, dev) \
        if method in combine_methods.METHODS else None

    keys: dict[tuple[str, str], list[tuple[int, LoraModule]]] = {}
    for i, adapter in enumerate(adapters):
        for key, module in adapter.modules.items():
            keys.setdefault(key, []).append((i, module))

    warnings: list[str] = []
    families = {a.family for a in adapters}
    out = Adapter(metadata=dict(adapters[0].metadata), source_format=adapters[0].source_format,
                  family=families.pop() if len(families) == 1 else None)
    for adapter in adapters:
        for comp, cfg in adapter.config.items():
            out.config.setdefault(comp, dict(cfg))
        for key, tensor in adapter.extras.items():
            if key in out.extras:
                if not torch.equal(out.extras[key], tensor):
                    warnings.append(f"{key[0]}:{key[1]}: whole tensor differs between inputs; kept the first")
                continue
            out.extras[key] = tensor

    reports: list[ModuleStack] = []
    # (key, contributing entries, per-input weights for this module)
    work: list[tuple[tuple[str, str], list[tuple[int, LoraModule]], list[float]]] = []
    for done, (key, all_entries) in enumerate(keys.items(), start=1):
        mod_weights = weights if module_weights is None else module_weights.scaled(weights, all_entries)
        if combiner is not None:  # every input takes part, as in mergekit (a missing module is ΔW = 0)
            with combiner.threads():
                module, report = combiner.module(key, all_entries, mod_weights)
            out.add(module)
            reports.append(report)
            if progress is not None:
                progress("combining", done, len(keys))
            continue
        entries = [(i, m) for i, m in all_entries if mod_weights[i] != 0.0]
        if not entries:
            warnings.append(f"{key[0]}:{key[1]}: every input holding it has weight 0; left out")
            continue
        if len(entries) > 1 and any(m.magnitude is not None for _, m in entries):
            raise UsageError(
                f"{key[0]}:{key[1]}: DoRA module in {', '.join(labels[i] for i, _ in entries)}; "
                "DoRA magnitudes are absolute, not deltas, and cannot be added"
            )
        work.append((key, entries, mod_weights))

    singles, fused = _fused_work(work) if method == "svd" else (work, [])
    tasks: list = [[item] for item in singles] + fused

    def one(task: list) -> list[tuple[LoraModule, ModuleStack]]:
        if len(task) > 1:
            return stack_fused(task, int(rank), labels, dev)
        key, entries, mod_weights = task[0]
        return [stack_module(key, entries, mod_weights, method, rank, labels, dev)]

    def cost(task: list) -> float:
        return sum(svd_flops(m) for item in task for _, m in item[1])

    stacked: dict[tuple[str, str], tuple[LoraModule, ModuleStack]] = {}
    for results in ThreadPolicy(threads, dev).map(one, tasks, cost=cost):
        for module, report in results:
            stacked[module.key] = (module, report)
            if progress is not None:
                progress("stacking", len(stacked), len(work))
    for key, _, _ in work:  # the inputs' module order
        out.add(stacked[key][0])
        reports.append(stacked[key][1])

    result = StackResult(adapter=out, modules=reports, method=method, rank=int(rank) if rank else None,
                         weights=weights, labels=labels, device=str(dev), warnings=warnings)
    if combiner is not None:
        result.combine = combiner.describe()
    if module_weights is not None:
        result.warnings += module_weights.warnings()
        result.block_weights = module_weights.describe()
    _update_metadata(out, result)
    return result


def _update_metadata(out: Adapter, result: StackResult) -> None:
    meta = out.metadata
    for key in STALE_KEYS:
        meta.pop(key, None)
    network_metadata(out)
    parts = ", ".join(f"{w:g} × {lab}" for lab, w in zip(result.labels, result.weights))
    what = {"concat": "concatenated", "svd": f"SVD rank {result.rank}"}.get(
        result.method, f"{result.method}, rank {result.rank or 'dynamic'}")
    meta["ss_training_comment"] = f"stacked by loratool ({what}): {parts}"
    record: dict[str, Any] = {
        "method": result.method, "rank": result.rank,
        "inputs": [{"file": lab, "weight": w} for lab, w in zip(result.labels, result.weights)],
        "mean_fro_kept": round(result.mean_fro_kept, 6),
    }
    for extra in ("combine", "block_weights"):
        if getattr(result, extra) is not None:
            record[extra] = getattr(result, extra)
    meta["loratool_stack"] = json.dumps(record, sort_keys=True)


def cast_factors(result: StackResult, dtype: str) -> None:
    """Store the stacked modules' factors (and DoRA magnitudes) in ``dtype`` (``fp16``, ``bf16``, ``fp32``)."""
    from loratool.io.safetensors_file import torch_dtypes

    target = torch_dtypes()[float_code(dtype, "--dtype")]
    for module in result.adapter:
        module.tensors = {k: v.to(target) for k, v in module.tensors.items()}
        if module.magnitude is not None:
            module.magnitude = module.magnitude.to(target)
    result.dtype = str(target).removeprefix("torch.")


def stack_files(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    *,
    method: str = "concat",
    rank: int | None = None,
    to: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    force: bool = False,
    base: str | os.PathLike | None = None,
    family: str | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
    options: Any = None,
    block_weights: Sequence[str] | None = None,
    strength_patterns: Sequence[str] | None = None,
) -> StackResult:
    """load each → :func:`stack` → save in ``to`` or the first input's layout.

    ``dtype`` (``fp16``, ``bf16``, ``fp32``) is the dtype of the written factors; by default each
    output module keeps the dtype the stacking computed it in. ``block_weights`` (once, or once per
    input) and ``strength_patterns`` (``PATTERN:VALUE``) are parsed by
    :func:`loratool.ops.block_weights.module_weights`.
    """
    from loratool.api import load, save
    from loratool.formats.outputs import check_target
    from loratool.io.atomic import check_output

    code = float_code(dtype, "--dtype") if dtype is not None else None  # a bad name fails before any reading
    if weights and len(weights) != len(paths):
        raise UsageError(f"--weights: {len(weights)} weights for {len(paths)} adapters; give one per adapter")
    layout = output_layout(None, to) if to else None
    check_threads(threads)
    check_output(out, inputs=tuple(paths), force=force)
    from loratool.ops import combine_methods

    if method in combine_methods.METHODS:  # refuse bad options before loading anything
        combine_methods.combiner(method, rank, options, len(paths), [], pick_device(device))
    with single_threaded():  # reading and writing split / fuse tensors too: no thread team for those
        adapters = [load(p, base=base, family=family) for p in paths]
        layout = layout or output_layout(adapters[0].source_format, None)
        check_target(layout, out, tuple(paths), force)  # a name contradicting the layout fails before the work
        labels = [Path(str(p)).name for p in paths]
        mw = None
        if block_weights or strength_patterns:
            from loratool.ops.block_weights import module_weights

            mw = module_weights(adapters, block_weights, strength_patterns, family=family)
        result = stack(adapters, weights, method=method, rank=rank, labels=labels, device=device, threads=threads,
                       progress=progress, options=options, module_weights=mw)
        if code is not None:
            cast_factors(result, dtype)
        result.files = save(result.adapter, out, layout, force=force, inputs=tuple(paths), family=family)
    result.output = Path(out)
    result.output_format = layout
    return result
