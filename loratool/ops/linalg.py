"""Exact low-rank linear algebra on LoRA factors, without forming ΔW.

For ΔW = s · up @ down with up [m, r] and down [r, n]:

    up    = Qu · Ru            (reduced QR, Qu [m, p] orthonormal, p = min(m, r))
    downᵀ = Qd · Rd            (reduced QR, Qd [n, q] orthonormal, q = min(n, r))
    ΔW    = Qu · (s · Ru · Rdᵀ) · Qdᵀ
    s · Ru · Rdᵀ = Uc · diag(S) · Vcᵀ     (SVD of a p × q core)
    ΔW    = (Qu · Uc) · diag(S) · (Vcᵀ · Qdᵀ)

which is the exact SVD of ΔW: Qu·Uc and Qd·Vc have orthonormal columns. Ru and Rd may come
from any factorisation with orthonormal Q: Householder QR, or (faster, float64, well-conditioned
factors) the Cholesky factor of the r×r Gram matrix, upᵀ·up = Ruᵀ·Ru. The cost is
O((m + n)·r²) instead of the O(m·n·min(m, n)) of a dense SVD, and by Eckart–Young the first k
triplets give the best rank-k approximation in the Frobenius and spectral norms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Factor work up to this many elements is done in float64 (cheap at LoRA sizes and leaves
# rounding far below the 1e-5 relative error we promise); larger modules use float32.
FLOAT64_MAX_ELEMENTS = 1 << 23
# Gram route only when the Cholesky diagonal of G spans less than this (squared), and the Q it
# gives is orthonormal to 1e-9 (κ(G) ≲ 1e7).
GRAM_MAX_COND = 1e-9


@dataclass
class LowRankSVD:
    """ΔW ≈ U · diag(S) · Vh with U [m, k], S [k] (descending, ≥ 0), Vh [k, n]."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    # Σ σᵢ² over every singular value of ΔW (= ‖ΔW‖_F²), kept when U/S/Vh are truncated.
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.energy is None:
            self.energy = float((self.S.double() ** 2).sum())

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def truncate(self, k: int) -> LowRankSVD:
        return LowRankSVD(self.U[:, :k], self.S[:k], self.Vh[:k], self.energy)

    def fro_kept(self, k: int) -> float:
        """‖ΔW_k‖_F / ‖ΔW‖_F = √(Σ_{i≤k} σᵢ² / Σ σᵢ²); 1.0 for ΔW = 0."""
        sq = self.S.double() ** 2
        total = float(self.energy)
        if total == 0.0:
            return 1.0
        return float(sq[:k].sum() / total) ** 0.5


def compute_dtype(device: torch.device, elements: int) -> torch.dtype:
    """float64 for small work on devices that have it, float32 otherwise."""
    if device.type == "mps":
        return torch.float32
    return torch.float64 if elements <= FLOAT64_MAX_ELEMENTS else torch.float32


def _gram_root(a: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(R, R⁻¹) with a = Q·R, Q orthonormal, from the r×r Gram matrix only.

    G = aᵀa (side 0) or a·aᵀ (side 1) = L·Lᵀ (Cholesky); R = Lᵀ, so Q = a·R⁻¹. Only in float64,
    and only when the Cholesky factor's diagonal spans less than :data:`GRAM_MAX_COND` (squared):
    None otherwise (and for a singular G), and the caller takes the QR route. Q's orthonormality
    is then checked on the result (:func:`_orthonormal`): κ(G) can exceed what the diagonal shows.
    """
    if a.dtype != torch.float64:
        return None
    g = a.T @ a if side == 0 else a @ a.T
    if not torch.isfinite(g).all():
        raise FloatingPointError("factors hold NaN or Inf")
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return None
    d = chol.diagonal()
    lo, hi = float(d.min()), float(d.max())
    if not (hi > 0 and lo * lo > hi * hi * GRAM_MAX_COND):
        return None
    r = chol.T
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    return r, torch.linalg.solve_triangular(r, eye, upper=True)


def _orthonormal(a: torch.Tensor, r_inv: torch.Tensor, side: int, tol: float = 1e-9) -> bool:
    """Whether Q = a·R⁻¹ (side 0; Qᵀ = R⁻ᵀ·a for side 1) has orthonormal columns, probed with a
    few fixed random vectors x: ‖Q·X‖ must equal ‖X‖ (XᵀQᵀQX = XᵀX) to ``tol`` relative.
    Costs a few products with a, against the r² ones of the Gram matrix."""
    gen = torch.Generator(device=a.device).manual_seed(0)
    x = torch.randn(r_inv.shape[0], 4, generator=gen, dtype=a.dtype, device=a.device)
    y = a @ (r_inv @ x) if side == 0 else (x.T @ r_inv.T @ a).T
    want = x.T @ x
    return float((y.T @ y - want).abs().max()) <= tol * float(want.abs().max())


def factor_svd(
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float = 1.0,
    *,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    choose: Callable[[torch.Tensor], int] | None = None,
) -> LowRankSVD:
    """SVD of ΔW = scale · up @ down from the factors (see the module docstring).

    ``up`` [m, r] and ``down`` [r, n] are used on their own device; ``dtype`` defaults to
    :func:`compute_dtype`. ``rank`` truncates the result; ``choose(S)`` picks the rank from all
    singular values before the tall singular vectors are formed (only k columns are computed).
    Well-conditioned float64 factors take the Gram route (two r×r Cholesky factorisations
    instead of two tall QRs: the same R factors up to signs, an order of magnitude faster on
    CPUs); others take Householder QR. Raises
    ``FloatingPointError`` when the factors hold NaN or Inf.
    """
    m, r = up.shape
    r2, n = down.shape
    if r != r2:
        raise ValueError(f"factor shapes do not chain: up {tuple(up.shape)}, down {tuple(down.shape)}")
    if dtype is None:
        dtype = compute_dtype(up.device, (m + n) * r)
    up = up.to(dtype)
    down = down.to(dtype)
    gu = _gram_root(up, 0) if r <= min(m, n) else None
    gd = _gram_root(down, 1) if gu is not None else None
    if gu is not None and gd is not None and _orthonormal(up, gu[1], 0) and _orthonormal(down, gd[1], 1):
        (ru, ru_inv), (rd, rd_inv) = gu, gd
        uc, s, vch = torch.linalg.svd((ru @ rd.T) * scale, full_matrices=False)
        energy = float((s.double() ** 2).sum())
        k = choose(s) if choose is not None else rank
        if k is not None:
            uc, s, vch = uc[:, :k], s[:k], vch[:k]
        # U = Qu·Uc = up·(Ru⁺·Uc), Vh = Vcᵀ·Qdᵀ = (Vcᵀ·Rd⁺ᵀ)·down
        return LowRankSVD(up @ (ru_inv @ uc), s, (vch @ rd_inv.T) @ down, energy)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise FloatingPointError("factors hold NaN or Inf")
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    core = (ru @ rd.T) * scale
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    out = LowRankSVD(qu @ uc, s, vch @ qd.T)
    k = choose(s) if choose is not None else rank
    return out.truncate(k) if k is not None else out


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


def kron_svd(
    a: LowRankSVD,
    b: LowRankSVD,
    scale: float = 1.0,
    *,
    rank: int | None = None,
    choose: Callable[[torch.Tensor], int] | None = None,
) -> LowRankSVD:
    """SVD of scale · kron(A, B) from full SVDs of A [a₁, b₁] and B [a₂, b₂].

    kron(Ua·Sa·Vaᵀ, Ub·Sb·Vbᵀ) = kron(Ua, Ub) · kron(Sa, Sb) · kron(Va, Vb)ᵀ, and the Kronecker
    product of matrices with orthonormal columns has orthonormal columns, so this is an SVD:
    the singular values are every product σa_i·σb_j·|scale|, the vectors kron(ua_i, ub_j) and
    kron(va_i, vb_j). They are sorted descending, ``rank`` / ``choose(S)`` picks k, and only
    the k kept vectors are formed (O(k·(a₁a₂ + b₁b₂)) after the two small SVDs).
    """
    prod = (a.S[:, None] * b.S[None, :]).reshape(-1) * abs(float(scale))
    s, order = torch.sort(prod, descending=True, stable=True)
    energy = float(a.energy) * float(b.energy) * float(scale) ** 2
    k = choose(s) if choose is not None else rank
    if k is not None:
        s, order = s[:k], order[:k]
    i, j = order // b.S.shape[0], order % b.S.shape[0]
    k = int(s.shape[0])
    u = (a.U[:, i].unsqueeze(1) * b.U[:, j].unsqueeze(0)).reshape(-1, k)
    vh = (a.Vh[i].unsqueeze(2) * b.Vh[j].unsqueeze(1)).reshape(k, -1)
    return LowRankSVD(-u if scale < 0 else u, s, vh, energy)


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
