"""The best rank-k LoRA factors of a ΔM, and the Frobenius error of the factors as written.

Shared by the combination methods (a dense TIES / DARE result) and ``convert --as-lora`` (a
LyCORIS product, a DoRA-folded weight, a full ``diff``). ΔM is the output-major matrix of
:mod:`loratool.ops.factor_form` ([out, in·kh·kw]; embeddings / fan_in_fan_out transposed back).

* Dense ΔM: truncated SVD ΔM ≈ U_k Σ_k V_kᵀ (the adaptive randomized solver of
  :mod:`loratool.ops.randomized_svd`, within 1 % of the Eckart–Young error, or the exact SVD);
* factored ΔM = s · up @ down (exact factor forms): the exact SVD from the factors
  (:func:`loratool.ops.linalg.factor_svd`), no dense matrix.

Either way up = U_k Σ_k^½, down = Σ_k^½ V_kᵀ (scale 1, alpha = k). The rank is ``max_rank``
(capped by the matrix), or chosen by a :class:`~loratool.ops.rank_rules.RankRule` under that cap;
with neither, the numerical rank (σᵢ > σ₀·max(m, n)·eps): an exact conversion.

The error reported is ‖ΔM − up' @ down'‖_F of the factors after their cast to the output dtype:
measured on the dense residual when ΔM is dense; from Gram matrices when ΔM is factored
(‖P Q‖²_F = Σ (PᵀP) ⊙ (Q Qᵀ) with P = [s·up | −up'], Q = [down; down'], in float64, so an
exact result reads ≈ 1e-8 · ‖ΔM‖, never below rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loratool.ops.linalg import factor_svd
from loratool.ops.randomized_svd import exact_svd, frobenius_sq, truncated_svd
from loratool.ops.rank_rules import RankRule, select_rank


@dataclass
class Fit:
    """ΔM ≈ up @ down (scale 1)."""

    up: torch.Tensor  # [m, k], output dtype, CPU
    down: torch.Tensor  # [k, n]
    rank: int
    norm: float  # ‖ΔM‖_F
    error: float  # ‖ΔM − up @ down‖_F of the factors as returned
    solver: str  # "factor" | "exact" | "randomized"

    @property
    def rel_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = S[:k].clamp(min=0).sqrt()
    return U[:, :k] * root, root.unsqueeze(1) * Vh[:k]


def _choose(S: torch.Tensor, shape: tuple[int, int], max_rank: int | None, rule: RankRule | None,
            total_energy: float | None = None) -> int:
    """k from the singular values (the whole spectrum, or its head plus ``total_energy``)."""
    cap = min(shape) if max_rank is None else max(1, min(int(max_rank), *shape))
    if rule is None or rule.method is None:
        if max_rank is not None:
            return min(cap, int(S.numel()))
        if S.numel() == 0 or float(S[0]) == 0.0:
            return 1
        tol = float(S[0]) * max(shape) * torch.finfo(S.dtype).eps  # numerical_rank's tolerance
        return max(1, min(cap, int((S > tol).sum())))
    s = S.detach().double().cpu()
    if total_energy is not None and rule.method == "sv_fro":
        tail = max(total_energy - float(s.square().sum()), 0.0)
        s = torch.cat([s, torch.tensor([math.sqrt(tail)], dtype=torch.float64)])
    return min(select_rank(s, cap, rule), int(S.numel()))


def fit_dense(
    matrix: torch.Tensor,
    max_rank: int | None,
    rule: RankRule | None = None,
    *,
    out_dtype: torch.dtype = torch.float32,
    exact: bool = False,
    generator: torch.Generator | None = None,
) -> Fit:
    """Factors of a dense ΔM [m, n] (its dtype and device are the work dtype and device)."""
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    total = frobenius_sq(matrix)
    need_all = max_rank is None or (rule is not None and rule.method == "sv_cumulative")
    if need_all or exact:
        svd = exact_svd(matrix, min(shape), total)
    else:
        cap = max(1, min(int(max_rank), *shape))
        svd = truncated_svd(matrix, cap, generator=generator, total_energy=total)
    k = _choose(svd.S, shape, max_rank, rule, total_energy=total)
    up, down = _split(svd.U, svd.S, svd.Vh, k)
    up, down = up.to(out_dtype), down.to(out_dtype)
    residual = (up.to(matrix.dtype) @ down.to(matrix.dtype)).sub_(matrix)
    err = math.sqrt(frobenius_sq(residual))
    return Fit(up.cpu().contiguous(), down.cpu().contiguous(), k, math.sqrt(total), err, svd.solver)


def factored_norm(p: torch.Tensor, q: torch.Tensor) -> float:
    """‖p @ q‖_F without forming the product: √Σ (pᵀp) ⊙ (q qᵀ)."""
    return math.sqrt(max(float(((p.T @ p) * (q @ q.T)).sum()), 0.0))


def fit_factors(
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float,
    max_rank: int | None,
    rule: RankRule | None = None,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> Fit:
    """Factors of ΔM = scale · up @ down (exact SVD from the factors, float64)."""
    up64, down64 = up.to(torch.float64), down.to(torch.float64)
    shape = (int(up.shape[0]), int(down.shape[1]))
    svd = factor_svd(up64, down64, scale, dtype=torch.float64)
    k = _choose(svd.S, shape, max_rank, rule)
    new_up, new_down = _split(svd.U, svd.S, svd.Vh, k)
    new_up, new_down = new_up.to(out_dtype), new_down.to(out_dtype)
    p = torch.cat([up64 * scale, -new_up.to(device=up64.device, dtype=torch.float64)], dim=1)
    q = torch.cat([down64, new_down.to(device=down64.device, dtype=torch.float64)], dim=0)
    norm = math.sqrt(float(svd.energy))
    return Fit(new_up.cpu().contiguous(), new_down.cpu().contiguous(), k, norm, factored_norm(p, q), "factor")
