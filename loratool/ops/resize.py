"""Re-rank every module of an adapter to its best rank-k approximation (Eckart–Young).

Per module: ΔM in its exact factor form (see :mod:`loratool.ops.factor_form`: s · up @ down for
LoRA / LoCon / Tucker and LoHa, s · kron(W₁, W₂) for LoKr) → exact SVD from that form
(:func:`loratool.ops.factor_form.form_svd`, no dense ΔW) → k by the rank rule → the first k
triplets. Only modules with no smaller form (``full``, LoHa products whose rank r₁·r₂ reaches
the matrix size) take a dense SVD of their ΔM.

Scale rule: the output keeps the module's scale s' = s (alpha/r keeps its meaning, as kohya
users expect), so alpha' = s · k (s · √k with rsLoRA) and

    up' = U_k · √S_k / √s,   down' = √S_k · Vh_k / √s,   s' · up' @ down' = ΔM_k.

A module whose scale is not positive (alpha ≤ 0) is written with scale 1 (alpha' = k).
A bias delta Δb (PEFT ``lora_bias``, a full module's ``diff_b``) is stored as bias' = Δb / s'.
A DoRA magnitude is kept as is: the merged weight is still m ⊙ (W + ΔW_k) / ‖W + ΔW_k‖
(the truncated ΔW only changes its direction).
Modules already at or below the target rank are copied untouched (bit for bit).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.delta import delta_bias
from loratool.errors import NonFiniteError, UsageError
from loratool.ops import Progress
from loratool.ops.device import ThreadPolicy, check_threads, pick_device, single_threaded, single_threaded_op
from loratool.ops.factor_form import explicit_factors, form_svd, svd_flops, to_factor_form, to_module
from loratool.ops.linalg import compute_dtype, split_factors, stacked_factor_svd
from loratool.ops.rank_rules import RankRule, select_rank

STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


@dataclass
class ModuleResize:
    component: str
    path: str
    kind: str
    layer: str
    rank_in: int
    rank_out: int
    fro_kept: float  # ‖ΔW_k‖_F / ‖ΔW‖_F
    method: str  # "factor", "kron" (Kronecker SVD), "dense" or "unchanged"
    norm: float = 0.0  # ‖ΔW‖_F = √(Σ σᵢ²)

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component, "path": self.path, "kind": self.kind, "layer": self.layer,
            "rank_in": self.rank_in, "rank_out": self.rank_out, "fro_kept": self.fro_kept, "method": self.method,
            "norm": self.norm,
        }


@dataclass
class ResizeResult:
    adapter: Adapter
    modules: list[ModuleResize]
    rank: int
    conv_rank: int
    rule: RankRule
    device: str
    mean_fro_kept: float  # mean over modules of ‖ΔW_k‖/‖ΔW‖
    total_fro_kept: float  # √(Σ ‖ΔW_k‖² / Σ ‖ΔW‖²) over all modules
    output: Path | None = None
    files: list[Path] = field(default_factory=list)
    output_format: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "format": self.output_format,
            "files": [str(f) for f in self.files],
            "rank": self.rank,
            "conv_rank": self.conv_rank,
            "dynamic": self.rule.method,
            "param": self.rule.param,
            "device": self.device,
            "modules": [m.to_json() for m in self.modules],
            "mean_fro_kept": self.mean_fro_kept,
            "total_fro_kept": self.total_fro_kept,
            "rank_min": min((m.rank_out for m in self.modules), default=0),
            "rank_max": max((m.rank_out for m in self.modules), default=0),
            "warnings": list(self.warnings),
        }


def is_kxk_conv(module: LoraModule) -> bool:
    """Conv modules with a spatial kernel (3×3 …): the ones ``--conv-rank`` applies to."""
    if module.layer != "conv":
        return False
    shape = module.weight_shape
    return math.prod(int(x) for x in shape[2:]) > 1


def _target_scale(module: LoraModule) -> float:
    s = module.scale
    return s if math.isfinite(s) and s > 0 else 1.0


def resize_module(
    module: LoraModule,
    max_rank: int,
    rule: RankRule | None = None,
    *,
    device: torch.device | None = None,
) -> tuple[LoraModule, ModuleResize]:
    """The best rank-k version of one module (k from ``rule`` capped at ``max_rank``)."""
    device = device or torch.device("cpu")
    name = f"{module.component}:{module.path}"
    form = to_factor_form(module, dtype=compute_dtype(device, 0), device=device)
    try:
        if rule is None or rule.method is None:  # a fixed rank: only the kept triplets need resolving
            svd = form_svd(form, rank=max(1, int(max_rank)))  # = select_rank's fixed rule
        else:
            svd = form_svd(form, choose=lambda S: select_rank(S, max_rank, rule))
    except FloatingPointError:
        raise NonFiniteError(f"{name}: {'ΔW holds' if form.is_dense else 'LoRA factors hold'} NaN or Inf") from None
    method = "dense" if form.is_dense else "kron" if form.is_kron else "factor"
    k = svd.rank
    kept = svd.fro_kept(k)
    report = ModuleResize(module.component, module.path, module.kind, module.layer, module.rank or form.rank,
                          k, kept, method, float(svd.energy) ** 0.5)
    if module.kind == "lora" and "mid" not in module.tensors and k >= module.rank:
        report.rank_out = module.rank
        report.fro_kept = 1.0
        report.method = "unchanged"
        return module, report
    scale = _target_scale(module)
    up, down = split_factors(svd.truncate(k), scale)
    out = to_module(module, form.weight_shape, up, down, scale=scale,
                    rslora=module.rslora if module.kind == "lora" else False, dtype=module.dtype)
    db = delta_bias(module, dtype=torch.float64)
    if db is not None:  # stored so that s' · bias' = Δb (PEFT lora_bias; a full module's diff_b)
        out.tensors["bias"] = (db / scale).to(module.dtype)
    return out, report


def _fused_groups(modules: list[LoraModule]) -> dict[tuple[str, str], list[LoraModule]]:
    """Parts of one fused native module (``hints["fused"]``, set when a family splits it), in row order."""
    groups: dict[tuple[str, str], dict[int, LoraModule]] = {}
    for m in modules:
        fused = m.hints.get("fused")
        if fused is not None and int(fused[2]) > 1:
            groups.setdefault((m.component, str(fused[0])), {})[int(fused[1])] = m
    return {key: [parts[i] for i in sorted(parts)] for key, parts in groups.items() if len(parts) > 1}


def _native_rank(parts: list[LoraModule]) -> int:
    """Rank of the fused module as the file stores it: one shared down → its rank, else the ranks add up."""
    first = parts[0]
    shared = all(p.kind == "lora" and "mid" not in p.tensors and p.tensors["down"].shape == first.tensors["down"].shape
                 and torch.equal(p.tensors["down"], first.tensors["down"]) and p.scale == first.scale
                 for p in parts)
    return first.rank if shared else sum(p.rank or min(p.weight_shape[:2]) for p in parts)


def resize_fused(
    parts: list[LoraModule],
    max_rank: int,
    rule: RankRule | None = None,
    *,
    device: torch.device | None = None,
) -> list[tuple[LoraModule, ModuleResize]]:
    """The best rank-k version of a fused native module given as its parts (row blocks, in order).

    The native ΔM = [ΔM₁; ΔM₂; …] (one input, rows stacked) is truncated as one matrix, so the
    file gets back one module of rank k (Eckart–Young on the module it holds), not G parts of rank
    k joined block-diagonally into rank G·k. Every part gets the shared down' and its rows of up':
    a writer fuses parts sharing one down into (down', cat(up'_g)) at rank k. ``fro_kept`` of a
    part is ‖ΔM_g,k‖ / ‖ΔM_g‖ (its rows of U_k·S_k against its rows of U·S); ``rank_in`` is the
    native module's rank. Parts already at or below the rank are returned untouched.
    """
    device = device or torch.device("cpu")
    names = ", ".join(f"{p.component}:{p.path}" for p in parts)
    native = _native_rank(parts)
    forms = [to_factor_form(p, dtype=compute_dtype(device, 0), device=device) for p in parts]
    if len({f.shape[1] for f in forms}) != 1:
        raise UsageError(f"{names}: the parts of one fused module differ in input width")
    rows = [int(f.shape[0]) for f in forms]
    total = sum(rows)
    ups, downs, coefs = [], [], []
    for g, form in enumerate(forms):
        up, down, s = explicit_factors(form)
        padded = torch.zeros(total, up.shape[1], dtype=up.dtype, device=up.device)
        padded[sum(rows[:g]):sum(rows[:g + 1])] = up
        ups.append(padded)
        downs.append(down)
        coefs.append(s)
    try:
        svd = stacked_factor_svd(ups, downs, coefs, dtype=compute_dtype(device, (total + forms[0].shape[1]) * native))
    except FloatingPointError:
        raise NonFiniteError(f"{names}: LoRA factors hold NaN or Inf") from None
    unchanged = native <= max_rank and all(p.kind == "lora" and "mid" not in p.tensors for p in parts)
    k = native if unchanged else select_rank(svd.S, max_rank, rule)
    scale = _target_scale(parts[0]) if len({p.scale for p in parts}) == 1 and parts[0].kind == "lora" else 1.0
    rslora = all(p.kind == "lora" and p.rslora for p in parts)
    up, down = split_factors(svd.truncate(k), scale)
    us = svd.U * svd.S
    out = []
    for g, (p, form) in enumerate(zip(parts, forms)):
        a, b = sum(rows[:g]), sum(rows[:g + 1])
        full = float(us[a:b].double().norm())
        if unchanged:
            out.append((p, ModuleResize(p.component, p.path, p.kind, p.layer, native, native, 1.0, "unchanged", full)))
            continue
        kept = float(us[a:b, :k].double().norm()) / full if full > 0 else 1.0
        new = to_module(p, form.weight_shape, up[a:b], down, scale=scale, rslora=rslora, dtype=p.dtype)
        db = delta_bias(p, dtype=torch.float64)
        if db is not None:  # s' · bias' = Δb, as resize_module stores it
            new.tensors["bias"] = (db / scale).to(p.dtype)
        out.append((new, ModuleResize(p.component, p.path, p.kind, p.layer, native, k, kept, "fused", full)))
    return out


@single_threaded_op
def resize(
    adapter: Adapter,
    rank: int,
    *,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    device: str = "auto",
    threads: int | None = None,
    progress: Progress | None = None,
) -> ResizeResult:
    """Resize every module; ``conv_rank`` (default ``rank``) caps conv k×k modules.

    ``threads`` caps the CPU threads (:class:`~loratool.ops.device.ThreadPolicy`; default: all)."""
    if rank is None or int(rank) < 1:
        raise UsageError(f"--rank {rank}: must be a positive integer")
    if conv_rank is not None and int(conv_rank) < 1:
        raise UsageError(f"--conv-rank {conv_rank}: must be a positive integer")
    rule = RankRule(dynamic, param)
    conv_rank = int(conv_rank) if conv_rank is not None else int(rank)
    dev = pick_device(device)
    out = Adapter(metadata=dict(adapter.metadata), source_format=adapter.source_format, family=adapter.family,
                  config={k: dict(v) for k, v in adapter.config.items()}, extras=dict(adapter.extras))
    reports: list[ModuleResize] = []
    total = len(adapter.modules)
    warnings: list[str] = []
    policy = ThreadPolicy(threads, dev)
    modules = list(adapter.modules.values())
    groups = _fused_groups(modules)
    items: list[tuple[LoraModule, ...]] = []  # one module, or the parts of one fused native module
    in_group: set[tuple[str, str]] = set()
    for module in modules:
        fused = module.hints.get("fused")
        group = groups.get((module.component, str(fused[0]))) if fused is not None else None
        if group is None:
            items.append((module,))
        elif module.key not in in_group:
            in_group.update(p.key for p in group)
            items.append(tuple(group))

    def one(item: tuple[LoraModule, ...]) -> list[tuple[LoraModule, ModuleResize]]:
        cap = conv_rank if is_kxk_conv(item[0]) else int(rank)
        if len(item) > 1:
            return resize_fused(list(item), cap, rule, device=dev)
        return [resize_module(item[0], cap, rule, device=dev)]

    done: set[tuple[str, str]] = set()
    for results in policy.map(one, items, cost=lambda item: sum(svd_flops(p) for p in item)):
        for new, report in results:
            out.add(new)
            reports.append(report)
            done.add(new.key)
        if progress is not None:
            progress("resizing", len(done), total)
    if any(m.magnitude is not None for m in adapter.modules.values()):
        warnings.append("DoRA magnitudes are kept unchanged; the resized ΔW changes the merged weight's direction only")
    result = ResizeResult(
        adapter=out, modules=reports, rank=int(rank), conv_rank=conv_rank, rule=rule, device=str(dev),
        mean_fro_kept=_mean([r.fro_kept for r in reports]),
        total_fro_kept=_total_kept(reports),
        warnings=warnings,
    )
    _update_metadata(out, adapter, result)
    return result


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 1.0


def _total_kept(reports: list[ModuleResize]) -> float:
    """√(Σ ‖ΔW_k‖² / Σ ‖ΔW‖²) over all modules."""
    num = sum((r.norm * r.fro_kept) ** 2 for r in reports)
    den = sum(r.norm ** 2 for r in reports)
    return math.sqrt(num / den) if den > 0 else 1.0


def _ranks_text(values: list[float]) -> str:
    uniq = {round(float(v), 6) for v in values}
    if len(uniq) != 1:
        return "Dynamic"
    v = uniq.pop()
    return str(int(v)) if v.is_integer() else f"{v:g}"


def network_metadata(out: Adapter) -> None:
    """ss_network_dim / ss_network_alpha from the modules ("Dynamic" when they differ).

    Every module written by resize / stack is a plain LoRA, so a LyCORIS ``ss_network_module``
    becomes ``networks.lora``.
    """
    meta = out.metadata
    modules = list(out.modules.values())
    if not modules:
        return
    meta["ss_network_dim"] = _ranks_text([m.rank for m in modules])
    meta["ss_network_alpha"] = _ranks_text([m.effective_alpha for m in modules])
    if "lycoris" in meta.get("ss_network_module", "") and all(m.kind == "lora" for m in modules):
        meta["ss_network_module"] = "networks.lora"
        meta.pop("ss_network_args", None)


def _update_metadata(out: Adapter, source: Adapter, result: ResizeResult) -> None:
    meta = out.metadata
    for key in STALE_KEYS:  # the writer recomputes them from the new bytes
        meta.pop(key, None)
    old_dim = meta.get("ss_network_dim") or _ranks_text([m.rank for m in source.modules.values()])
    network_metadata(out)
    what = (f"dynamic resize ({result.rule.describe()}, max rank {result.rank})" if result.rule.method
            else f"resized to rank {result.rank}")
    comment = f"{what} from rank {old_dim} by loratool (mean Frobenius norm kept {result.mean_fro_kept:.4f})"
    previous = meta.get("ss_training_comment")
    meta["ss_training_comment"] = f"{comment}; {previous}" if previous and previous != "None" else comment
    meta["loratool_resize"] = json.dumps({
        "rank": result.rank, "conv_rank": result.conv_rank, "dynamic": result.rule.method,
        "param": result.rule.param, "from_rank": old_dim, "mean_fro_kept": round(result.mean_fro_kept, 6),
        "total_fro_kept": round(result.total_fro_kept, 6),
    }, sort_keys=True)


def output_layout(source_format: str | None, to: str | None) -> str:
    """The layout to write: ``to``, else the input's (LyCORIS results are plain LoRA → kohya)."""
    from loratool import formats

    name = to or source_format or "kohya"
    if name == "lycoris" and to is None:
        name = "kohya"
    if name not in formats.WRITABLE:
        raise UsageError(f"--to {name}: cannot write that layout; writable: {', '.join(formats.WRITABLE)}")
    return name


def resize_file(
    path: str | os.PathLike,
    out: str | os.PathLike,
    rank: int,
    *,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    device: str = "auto",
    threads: int | None = None,
    to: str | None = None,
    force: bool = False,
    format: str | None = None,
    base: str | os.PathLike | None = None,
    family: str | None = None,
    config: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> ResizeResult:
    """load → :func:`resize` → save, in the input's layout unless ``to`` says otherwise."""
    from loratool.api import load, save
    from loratool.formats.outputs import check_target
    from loratool.io.atomic import check_output

    RankRule(dynamic, param)  # argument errors before any reading
    check_threads(threads)
    layout = output_layout(None, to) if to else None
    check_output(out, inputs=(path,), force=force)
    with single_threaded():  # reading and writing split / fuse tensors too: no thread team for those
        adapter = load(path, format=format, base=base, config=config, family=family)
        layout = layout or output_layout(adapter.source_format, None)
        check_target(layout, out, (path,), force)  # a name contradicting the layout fails before the work
        result = resize(adapter, rank, conv_rank=conv_rank, dynamic=dynamic, param=param, device=device,
                        threads=threads, progress=progress)
        result.files = save(result.adapter, out, layout, force=force, inputs=(path,), family=family)
    result.output = Path(out)
    result.output_format = layout
    return result
