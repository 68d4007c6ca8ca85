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

Wide factors (r ≥ :data:`EIGH_MIN_RANK`: a LoHa's r₁·r₂ Khatri–Rao factors, 256 wide at dim 16)
make the r×r core SVD the largest cost. There the Gram–eigen route replaces it by a symmetric
eigendecomposition (about 3× cheaper for LAPACK at r = 256), needing the Cholesky factor of one
side only (Qu = up·Ru⁻¹ as above, Gd = down·downᵀ):

    ΔW·ΔWᵀ = s² · Qu · H · Quᵀ,   H = Ru · Gd · Ruᵀ = W · diag(λ) · Wᵀ   (eigh, λ descending)
    σᵢ = |s|·√λᵢ,   U = Qu·W = up·(Ru⁻¹·W),   Vh = Uᵀ·ΔW / σ = diag(s/σ) · (Wᵀ·Ru) · down
    ‖ΔW‖_F² = s² · trace(H)

H has the squared singular values, so rounding costs σᵢ about ε·σ₀²/σᵢ: the route is kept only
when every σ it hands out (the k kept ones; every one when ``choose`` looks at the spectrum)
has σᵢ² ≥ :data:`EIGH_MIN_RATIO` · σ₀², and the core SVD is done otherwise. U·diag(S)·Vh is
then U·Uᵀ·ΔW, the projection onto the kept left singular vectors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Factor work up to this many elements is done in float64 (cheap at LoRA sizes and leaves
# rounding far below the 1e-5 relative error we promise); larger modules use float32.
FLOAT64_MAX_ELEMENTS = 1 << 23
# Gram route only when the Cholesky diagonal of G spans less than this (squared), and the Q it
# gives is orthonormal to 1e-9 (κ(G) ≲ 1e7).
GRAM_MAX_COND = 1e-9
# Gram–eigen route (see the module docstring) for factors at least this wide: below it the core SVD
# costs little (measured on one CPU thread, float64: r = 256 core SVD 9.8 ms, eigh 3.3 ms).
EIGH_MIN_RANK = 128
# ... kept only when every σ it returns has σ² ≥ this · σ₀²: the eigenvalue perturbation |δλ| ≲
# r·ε·λ₀ then leaves each σ a relative error below ~1e-9 (measured ≤ 4e-14 on random LoHa factors).
EIGH_MIN_RATIO = 1e-6


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


@functools.lru_cache(maxsize=16)
def _pair_index(r: int) -> torch.Tensor:
    """index[p, q] = index[q, p] = the position of the pair {p, q} among the pairs p ≤ q of range(r),
    taken in row order (p, then q)."""
    p, q = torch.triu_indices(r, r)
    index = torch.empty(r, r, dtype=torch.long)
    index[p, q] = torch.arange(p.numel())
    index[q, p] = index[p, q]
    return index


def _pair_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, index): P's rows are x[p] ⊙ x[q] for p ≤ q (r(r+1)/2 rows of x [r, m], in row order),
    index[p, q] the row of the pair {p, q} (:func:`_pair_index`)."""
    r = int(x.shape[0])
    rows = x.new_empty(r * (r + 1) // 2, x.shape[1])
    at = 0
    for p in range(r):
        torch.mul(x[p:], x[p], out=rows[at:at + r - p])
        at += r - p
    return rows, _pair_index(r).to(x.device)


def face_split_gram(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """G = (A₁ • A₂)ᵀ·(A₁ • A₂) for the face-splitting (row-wise Khatri–Rao) product of A₁ [m, r₁] and
    A₂ [m, r₂], (A₁ • A₂)[o, (p, p')] = A₁[o, p]·A₂[o, p'], without forming it:

        G[(p, p'), (q, q')] = Σₒ A₁[o, p]·A₁[o, q] · A₂[o, p']·A₂[o, q'] = M[{p, q}, {p', q'}],
        M = P₁·P₂ᵀ,  Pᵢ[{p, q}, o] = Aᵢ[o, p]·Aᵢ[o, q]  (p ≤ q: rᵢ(rᵢ + 1)/2 rows)

    G is symmetric in p ↔ q and in p' ↔ q' apart, so M holds all of it: m·(r₁(r₁+1)/2)·(r₂(r₂+1)/2)
    multiply-adds instead of m·r₁²·r₂² (3.5× fewer at r₁ = r₂ = 16; measured 1.7–2.2× faster than
    forming the product and its Gram for m = 1280 … 10240, one thread). A LoHa's down = (B₁ᵀ • B₂ᵀ)ᵀ,
    so its down·downᵀ is ``face_split_gram(B₁ᵀ, B₂ᵀ)``.
    """
    p1, i1 = _pair_rows(a1.T.contiguous())
    p2, i2 = _pair_rows(a2.T.contiguous())
    m = p1 @ p2.T
    r1, r2 = int(a1.shape[1]), int(a2.shape[1])
    return m[i1[:, None, :, None], i2[None, :, None, :]].reshape(r1 * r2, r1 * r2)


def _gram_root(a: torch.Tensor, side: int, g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(R, R⁻¹) with a = Q·R, Q orthonormal, from the r×r Gram matrix only.

    G = aᵀa (side 0) or a·aᵀ (side 1) = L·Lᵀ (Cholesky); R = Lᵀ, so Q = a·R⁻¹. Only in float64,
    and only when the Cholesky factor's diagonal spans less than :data:`GRAM_MAX_COND` (squared):
    None otherwise (and for a singular G), and the caller takes the QR route. Q's orthonormality
    is then checked on the result (:func:`_orthonormal`): κ(G) can exceed what the diagonal shows.
    ``g``: G itself, where the caller has a cheaper way to it (float64).
    """
    if a.dtype != torch.float64:
        return None
    if g is None:
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


def _eigh_core(
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float,
    gu: tuple[torch.Tensor, torch.Tensor],
    gd: torch.Tensor | None,
    rank: int | None,
    choose: Callable[[torch.Tensor], int] | None,
) -> LowRankSVD | None:
    """The Gram–eigen route (module docstring) from up's Gram root ``gu`` = (Ru, Ru⁻¹); None when
    a σ it would return is below :data:`EIGH_MIN_RATIO` (squared) of σ₀, or ΔW = 0."""
    if not (math.isfinite(scale) and scale != 0):
        return None
    ru, ru_inv = gu
    h = ru @ (down @ down.T if gd is None else gd) @ ru.T
    if not torch.isfinite(h).all():
        raise FloatingPointError("factors hold NaN or Inf")
    try:
        lam, w = torch.linalg.eigh(h)  # reads the lower triangle: H symmetric up to rounding
    except torch.linalg.LinAlgError:
        return None
    lam, w = lam.flip(0), w.flip(1)
    top = float(lam[0])
    if not top > 0:
        return None
    s = lam.clamp(min=0).sqrt() * abs(float(scale))
    if choose is not None and float(lam[-1]) < EIGH_MIN_RATIO * top:  # choose sees every σ
        return None
    k = choose(s) if choose is not None else rank
    k = int(s.shape[0]) if k is None else min(int(k), int(s.shape[0]))
    if k > 0 and float(lam[k - 1]) < EIGH_MIN_RATIO * top:
        return None
    energy = float(h.diagonal().sum()) * float(scale) ** 2
    wk, sk = w[:, :k], s[:k]
    return LowRankSVD(up @ (ru_inv @ wk), sk, ((wk.T @ ru) * (float(scale) / sk)[:, None]) @ down, energy)


def factor_svd(
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float = 1.0,
    *,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    choose: Callable[[torch.Tensor], int] | None = None,
    grams: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LowRankSVD:
    """SVD of ΔW = scale · up @ down from the factors (see the module docstring).

    ``up`` [m, r] and ``down`` [r, n] are used on their own device; ``dtype`` defaults to
    :func:`compute_dtype`. ``rank`` truncates the result; ``choose(S)`` picks the rank from all
    singular values before the tall singular vectors are formed (only k columns are computed).
    Well-conditioned float64 factors take the Gram route (two r×r Cholesky factorisations
    instead of two tall QRs: the same R factors up to signs, an order of magnitude faster on
    CPUs), factors at least :data:`EIGH_MIN_RANK` wide the Gram–eigen route where its accuracy
    check passes; others take Householder QR. ``choose`` is called once, on the spectrum of the
    route that is kept. ``grams`` = (upᵀ·up, down·downᵀ) in ``dtype``, where the caller has a
    cheaper way to them (a LoHa's Khatri–Rao factors: :func:`face_split_gram`). Raises
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
    g_up, g_down = grams if grams is not None and dtype == torch.float64 else (None, None)
    gu = _gram_root(up, 0, g_up) if r <= min(m, n) else None
    if gu is not None and not _orthonormal(up, gu[1], 0):
        gu = None
    if gu is not None and r >= EIGH_MIN_RANK:
        out = _eigh_core(up, down, scale, gu, g_down, rank, choose)
        if out is not None:
            return out
    gd = _gram_root(down, 1, g_down) if gu is not None else None
    if gu is not None and gd is not None and _orthonormal(down, gd[1], 1):
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
