"""Exact low-rank linear algebra on LoRA factors, without forming ΔW.

For ΔW = s · up @ down with up [m, r] and down [r, n]:

    up    = Qu · Ru            (reduced QR, Qu [m, p] orthonormal, p = min(m, r))
    downᵀ = Qd · Rd            (reduced QR, Qd [n, q] orthonormal, q = min(n, r))
    ΔW    = Qu · (s · Ru · Rdᵀ) · Qdᵀ
    s · Ru · Rdᵀ = Uc · diag(S) · Vcᵀ     (SVD of a p × q core)
    ΔW    = (Qu · Uc) · diag(S) · (Vcᵀ · Qdᵀ)

which is the exact SVD of ΔW: Qu·Uc and Qd·Vc have orthonormal columns. The cost is
O((m + n)·r²) instead of the O(m·n·min(m, n)) of a dense SVD, and by Eckart–Young the first k
triplets give the best rank-k approximation in the Frobenius and spectral norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Factor work up to this many elements is done in float64 (cheap at LoRA sizes and leaves
# rounding far below the 1e-5 relative error we promise); larger modules use float32.
FLOAT64_MAX_ELEMENTS = 1 << 23


@dataclass
class LowRankSVD:
    """ΔW ≈ U · diag(S) · Vh with U [m, k], S [k] (descending, ≥ 0), Vh [k, n]."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def truncate(self, k: int) -> LowRankSVD:
        return LowRankSVD(self.U[:, :k], self.S[:k], self.Vh[:k])

    def fro_kept(self, k: int) -> float:
        """‖ΔW_k‖_F / ‖ΔW‖_F = √(Σ_{i≤k} σᵢ² / Σ σᵢ²); 1.0 for ΔW = 0."""
        sq = self.S.double() ** 2
        total = float(sq.sum())
        if total == 0.0:
            return 1.0
        return float(sq[:k].sum() / total) ** 0.5


def compute_dtype(device: torch.device, elements: int) -> torch.dtype:
    """float64 for small work on devices that have it, float32 otherwise."""
    if device.type == "mps":
        return torch.float32
    return torch.float64 if elements <= FLOAT64_MAX_ELEMENTS else torch.float32


def factor_svd(
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float = 1.0,
    *,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> LowRankSVD:
    """SVD of ΔW = scale · up @ down from the factors (see the module docstring).

    ``up`` [m, r] and ``down`` [r, n] are used on their own device; ``dtype`` defaults to
    :func:`compute_dtype`. ``rank`` truncates the result.
    """
    m, r = up.shape
    r2, n = down.shape
    if r != r2:
        raise ValueError(f"factor shapes do not chain: up {tuple(up.shape)}, down {tuple(down.shape)}")
    if dtype is None:
        dtype = compute_dtype(up.device, (m + n) * r)
    up = up.to(dtype)
    down = down.to(dtype)
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    core = (ru @ rd.T) * scale
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    out = LowRankSVD(qu @ uc, s, vch @ qd.T)
    return out.truncate(rank) if rank is not None else out


def stacked_factor_svd(
    ups: list[torch.Tensor],
    downs: list[torch.Tensor],
    scales: list[float],
    *,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> LowRankSVD:
    """SVD of Σᵢ scaleᵢ · upᵢ @ downᵢ = [scale₁·up₁ | scale₂·up₂ | …] @ [down₁; down₂; …]."""
    m = ups[0].shape[0]
    n = downs[0].shape[1]
    total_r = sum(int(u.shape[1]) for u in ups)
    if dtype is None:
        dtype = compute_dtype(ups[0].device, (m + n) * total_r)
    up = torch.cat([u.to(dtype) * s for u, s in zip(ups, scales)], dim=1)
    down = torch.cat([d.to(dtype) for d in downs], dim=0)
    return factor_svd(up, down, 1.0, rank=rank, dtype=dtype)


def dense_svd(matrix: torch.Tensor, *, rank: int | None = None, dtype: torch.dtype | None = None) -> LowRankSVD:
    """Thin SVD of a dense matrix (for modules with no useful exact factor form)."""
    if dtype is None:
        dtype = compute_dtype(matrix.device, matrix.numel())
    u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    out = LowRankSVD(u, s, vh)
    return out.truncate(rank) if rank is not None else out


def numerical_rank(svd: LowRankSVD, shape: tuple[int, int]) -> int:
    """Count of σᵢ > σ₀ · max(m, n) · eps (the usual matrix_rank tolerance); at least 1."""
    if svd.rank == 0:
        return 1
    eps = torch.finfo(svd.S.dtype).eps
    tol = float(svd.S[0]) * max(shape) * eps
    return max(1, int((svd.S > tol).sum()))


def split_factors(svd: LowRankSVD, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with scale · up @ down = U · diag(S) · Vh, the singular values split evenly.

    up = U · √S / √scale, down = √S · Vh / √scale (the kohya convention of √S on each side,
    divided by √scale so the stored scale keeps its meaning). ``scale`` must be > 0.
    """
    root = svd.S.clamp(min=0).sqrt()
    c = 1.0 / float(scale) ** 0.5
    return svd.U * (root * c), (root * c).unsqueeze(1) * svd.Vh
