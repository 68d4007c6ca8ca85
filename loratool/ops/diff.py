"""``loratool diff A B``: how two LoRAs relate, module by module and block by block, from their factors.

Every module both adapters hold (same component and path) is compared on ΔM, ΔW as an output-major
matrix [out, in·k·k] (:mod:`loratool.ops.factor_form`: LoRA, LoCon Tucker, LoHa and LoKr as exact
products ΔM = s · U @ D; ``full`` modules dense), in float64, never forming a dense ΔW of a factored module:

* ⟨ΔM_a, ΔM_b⟩_F = s_a·s_b · trace((U_aᵀ U_b)(D_b D_aᵀ))      (r_a × r_b products only)
  (one side dense: s_b · Σ (U_bᵀ ΔM_a) ⊙ D_b; both dense: Σ ΔM_a ⊙ ΔM_b)
* ‖ΔM‖_F = √⟨ΔM, ΔM⟩; ``cosine`` = ⟨ΔM_a, ΔM_b⟩ / (‖ΔM_a‖·‖ΔM_b‖); ``norm_ratio`` = ‖ΔM_b‖ / ‖ΔM_a‖
* subspace overlap: with Q_a, Q_b orthonormal bases of the column spaces of ΔM_a, ΔM_b (the left singular
  vectors of the exact factor SVD, :func:`loratool.ops.linalg.factor_svd`: QR of the factors and an SVD of
  the small core; σᵢ above σ₁·max(m, n)·eps), the cosines of the principal angles are the singular values
  of Q_aᵀ Q_b and ``out_overlap`` = ‖Q_aᵀ Q_b‖_F² / min(k_a, k_b), the mean cos² over the smaller rank (1: one
  space inside the other, ≈ k/n for unrelated random spaces); ``in_overlap`` likewise for the row spaces.

Per block (:mod:`loratool.ops.blocks`) and for the whole adapter: ``cosine`` = Σ⟨a, b⟩ / √(Σ‖a‖²·Σ‖b‖²) and
``norm_ratio`` = √(Σ‖b‖² / Σ‖a‖²) (the modules' ΔM taken as one vector), ``overlap`` the mean of the modules'
out / in overlaps.

Verdict (:func:`verdict`, thresholds in :data:`THRESHOLDS`), over the modules both hold:

* ``identical``: every cosine is 1 and every norm ratio 1 (to float rounding), the same modules;
* ``rescaled``: every cosine is 1, the ratios are not 1: B = c × A, c their median (one c for all:
  "same LoRA, different alpha"; else per-module factors, e.g. only conv alphas changed);
* ``derived``: not a rescaled copy, but one's subspaces lie inside the other's (mean overlap of the modules
  whose larger rank is below min(out, in): resized by SVD keeps a subset of the directions) or the cosine is
  high: resized, fine-tuned further, or stacked from it;
* ``unrelated``: none of these.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.ops import Progress
from loratool.ops.blocks import grouped, label
from loratool.ops.factor_form import FactorForm, explicit_factors, to_factor_form
from loratool.ops.linalg import dense_svd, factor_svd

THRESHOLDS = {
    "same_cosine": 1 - 1e-6,  # 1 − cos below this: the same direction (fp16 factors round-trip exactly)
    "same_ratio": 1e-3,  # |ratio − 1| (or the spread of the ratios) below this: the same scale
    "nested_overlap": 0.99,  # a subspace inside the other (a resized copy)
    "derived_cosine": 0.5,
}


@dataclass
class ModuleDiff:
    component: str
    path: str
    shape: list[int]
    rank_a: int  # numerical rank of ΔW
    rank_b: int
    norm_a: float
    norm_b: float
    inner: float  # ⟨ΔW_a, ΔW_b⟩_F
    cosine: float
    norm_ratio: float  # ‖ΔW_b‖ / ‖ΔW_a‖ (inf when ΔW_a = 0)
    out_overlap: float
    in_overlap: float


@dataclass
class BlockDiff:
    block: str
    component: str
    module_count: int
    cosine: float
    norm_ratio: float
    overlap: float


@dataclass
class DiffReport:
    a: str
    b: str
    modules: list[ModuleDiff]
    blocks: list[BlockDiff]
    only_a: list[str]  # component:path of modules only A holds
    only_b: list[str]
    mismatched: list[str]  # held by both with another shape (not compared)
    cosine: float
    norm_ratio: float
    overlap: float
    verdict: str  # identical | rescaled | derived | unrelated
    factor: float | None  # rescaled: B = factor × A (the median ratio)
    summary: str  # the verdict line
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "verdict": self.verdict, "factor": self.factor, "summary": self.summary,
            "cosine": self.cosine, "norm_ratio": self.norm_ratio, "overlap": self.overlap,
            "module_count": len(self.modules), "only_a": self.only_a, "only_b": self.only_b,
            "mismatched": self.mismatched, "blocks": [asdict(b) for b in self.blocks],
            "modules": [asdict(m) for m in self.modules], "warnings": self.warnings,
        }


# ---------------------------------------------------------------- one module


def _inner(fa: FactorForm, fb: FactorForm) -> float:
    """⟨ΔM_a, ΔM_b⟩_F from the factor forms (module docstring)."""
    if fa.is_dense and fb.is_dense:
        return float((fa.dense * fb.dense).sum())
    if fa.is_dense or fb.is_dense:
        dense, form = (fa.dense, fb) if fa.is_dense else (fb.dense, fa)
        return form.scale * float(((form.up.T @ dense) * form.down).sum())
    return fa.scale * fb.scale * float(torch.trace((fa.up.T @ fb.up) @ (fb.down @ fa.down.T)))


def _bases(form: FactorForm) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the column and row spaces of ΔM (σ above the matrix_rank tolerance)."""
    svd = dense_svd(form.dense, dtype=torch.float64) if form.is_dense else \
        factor_svd(form.up, form.down, form.scale, dtype=torch.float64)
    s = svd.S
    if not s.numel() or float(s[0]) == 0.0:
        return svd.U[:, :0], svd.Vh[:0].T
    k = int((s > float(s[0]) * max(form.shape) * torch.finfo(torch.float64).eps).sum())
    return svd.U[:, :k], svd.Vh[:k].T


def _overlap(qa: torch.Tensor, qb: torch.Tensor) -> float:
    """Mean cos² of the principal angles between span(qa) and span(qb), over the smaller dimension."""
    k = min(qa.shape[1], qb.shape[1])
    if k == 0:
        return 0.0
    return float((qa.T @ qb).pow(2).sum()) / k


def _factored(m: LoraModule) -> FactorForm:
    """ΔM of ``m`` in float64 as factors or dense: a Kronecker form (LoKr) as U·Σ, Vh of its exact SVD."""
    form = to_factor_form(m, dtype=torch.float64)
    if not form.is_kron:
        return form
    up, down, scale = explicit_factors(form)
    return FactorForm(form.shape, form.weight_shape, up=up, down=down, scale=scale)


def module_diff(a: LoraModule, b: LoraModule) -> ModuleDiff | None:
    """The figures of one module pair; None when their ΔW shapes differ."""
    fa, fb = _factored(a), _factored(b)
    if fa.shape != fb.shape:
        return None
    inner = _inner(fa, fb)
    na, nb = math.sqrt(max(_inner(fa, fa), 0.0)), math.sqrt(max(_inner(fb, fb), 0.0))
    cosine = inner / (na * nb) if na > 0 and nb > 0 else 0.0
    (ua, va), (ub, vb) = _bases(fa), _bases(fb)
    return ModuleDiff(
        component=a.component, path=a.path, shape=[int(x) for x in fa.weight_shape],
        rank_a=int(ua.shape[1]), rank_b=int(ub.shape[1]), norm_a=na, norm_b=nb, inner=inner,
        cosine=max(-1.0, min(1.0, cosine)), norm_ratio=nb / na if na > 0 else (1.0 if nb == 0 else math.inf),
        out_overlap=_overlap(ua, ub), in_overlap=_overlap(va, vb),
    )


# ---------------------------------------------------------------- aggregates and the verdict


def _aggregate(mods: list[ModuleDiff]) -> tuple[float, float, float]:
    """(cosine, norm ratio, overlap) of modules taken together (module docstring)."""
    aa = sum(m.norm_a ** 2 for m in mods)
    bb = sum(m.norm_b ** 2 for m in mods)
    ab = sum(m.inner for m in mods)
    cosine = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
    ratio = math.sqrt(bb / aa) if aa > 0 else (1.0 if bb == 0 else math.inf)
    overlap = sum((m.out_overlap + m.in_overlap) / 2 for m in mods) / len(mods) if mods else 0.0
    return cosine, ratio, overlap


def _cols(m: ModuleDiff) -> int:
    return math.prod(m.shape[1:])


def verdict(mods: list[ModuleDiff], same_modules: bool) -> tuple[str, float | None, str]:
    """(verdict, factor, summary line) from the per-module figures (module docstring, :data:`THRESHOLDS`)."""
    if not mods:
        return "unrelated", None, "unrelated: no module in common"
    t = THRESHOLDS
    cosine, ratio, overlap = _aggregate(mods)
    aligned = all(m.cosine >= t["same_cosine"] for m in mods)
    ratios = [m.norm_ratio for m in mods if math.isfinite(m.norm_ratio)]
    subset = "" if same_modules else " (on the modules both hold)"
    if aligned and ratios:
        factor = statistics.median(ratios)
        spread = max(ratios) / min(ratios) - 1 if min(ratios) > 0 else math.inf
        if spread <= t["same_ratio"] and abs(factor - 1) <= t["same_ratio"]:
            return "identical", 1.0, f"identical: every module's ΔW is the same{subset}"
        if spread <= t["same_ratio"]:
            return "rescaled", factor, (f"rescaled copy: B = {factor:.6g} × A in every module{subset} "
                                        f"(same LoRA, different alpha or strength)")
        return "rescaled", factor, (f"rescaled copy per module: same directions, B / A from {min(ratios):.4g} to "
                                    f"{max(ratios):.4g} (median {factor:.4g}){subset}: alphas changed per module")
    # one space inside the other says something only when the larger one is not the whole space
    proper = [max(m.out_overlap, m.in_overlap) for m in mods if max(m.rank_a, m.rank_b) < min(m.shape[0], _cols(m))]
    nested = statistics.mean(proper) if proper else 0.0
    if nested >= t["nested_overlap"] or cosine >= t["derived_cosine"]:
        how = "one's subspaces lie inside the other's (resized)" if nested >= t["nested_overlap"] else \
            "high cosine"
        return "derived", None, (f"resized / derived: {how}; cosine {cosine:.3f}, norm ratio {ratio:.3f}, "
                                 f"subspace overlap {overlap:.3f}{subset}")
    return "unrelated", None, (f"unrelated: cosine {cosine:.3f}, norm ratio {ratio:.3f}, subspace overlap "
                               f"{overlap:.3f}{subset}")


def _load(ref: str | os.PathLike | Adapter) -> tuple[Adapter, str]:
    if isinstance(ref, Adapter):
        return ref, "adapter"
    from loratool.api import load

    return load(ref), str(ref)


def diff(a: str | os.PathLike | Adapter, b: str | os.PathLike | Adapter, *,
         progress: Progress | None = None) -> DiffReport:
    """Compare two LoRAs module by module (module docstring); reads both whole, writes nothing."""
    from loratool.validate import nonfinite_modules

    adapter_a, name_a = _load(a)
    adapter_b, name_b = _load(b)
    broken = set(nonfinite_modules(adapter_a)) | set(nonfinite_modules(adapter_b))
    common = [k for k in adapter_a.modules if k in adapter_b.modules]
    mods: list[ModuleDiff] = []
    mismatched: list[str] = []
    warnings: list[str] = []
    for i, key in enumerate(common):
        if progress is not None:
            progress("comparing", i, len(common))
        name = f"{key[0]}:{key[1]}"
        if name in broken:
            mismatched.append(name)
            continue
        d = module_diff(adapter_a[key], adapter_b[key])
        if d is None:
            mismatched.append(name)
        else:
            mods.append(d)
    if progress is not None:
        progress("comparing", len(common), len(common))
    if broken & {f"{c}:{p}" for c, p in common}:
        warnings.append(f"{len(broken)} module(s) hold NaN or Inf and are not compared")
    if mismatched:
        warnings.append(f"{len(mismatched)} module(s) held by both have other shapes (or NaN / Inf): not compared: "
                        f"{', '.join(mismatched[:5])}")
    only_a = [f"{c}:{p}" for c, p in adapter_a.modules if (c, p) not in adapter_b.modules]
    only_b = [f"{c}:{p}" for c, p in adapter_b.modules if (c, p) not in adapter_a.modules]
    blocks = []
    for component, block, items in grouped(mods):
        cos, ratio, overlap = _aggregate(items)
        blocks.append(BlockDiff(label(component, block), component, len(items), cos, ratio, overlap))
    cosine, ratio, overlap = _aggregate(mods)
    kind, factor, summary = verdict(mods, not only_a and not only_b and not mismatched)
    return DiffReport(a=name_a, b=name_b, modules=mods, blocks=blocks, only_a=only_a, only_b=only_b,
                      mismatched=mismatched, cosine=cosine, norm_ratio=ratio, overlap=overlap, verdict=kind,
                      factor=factor, summary=summary, warnings=warnings)
