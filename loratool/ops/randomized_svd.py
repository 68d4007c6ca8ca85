"""Truncated SVD of a dense matrix: randomized (Halko, Martinsson & Tropp 2011) or exact.

Randomized range finder with oversampling ``p`` and power iterations, re-orthonormalised by a
QR after every product (Halko et al., algorithm 4.4)::

    Q  = qr(A Ω)                       Ω ~ N(0, 1), n × l,  l = k + p
    repeat:  B = Qᵀ A ;  Q = qr(A · qr(Bᵀ))
    B = Qᵀ A = Ũ Σ Vᵀ   ->   A ≈ (Q Ũ) Σ Vᵀ, keep the top k triplets

The rank-k truncation of ``Q Qᵀ A`` is the projection of A onto span(Q Ũ_k), so its error is
exactly ``‖A‖²_F − Σ_{i≤k} σ̃ᵢ²`` where σ̃ are the singular values of B; the optimum (Eckart–
Young) is ``‖A‖²_F − Σ_{i≤k} σᵢ²``. Each extra power iteration can only raise Σ σ̃ᵢ² towards
Σ σᵢ², and for the slowly decaying spectra of fine-tune deltas the gain per iteration shrinks
geometrically. So the solver iterates *adaptively*: it stops once one more iteration improves
the captured energy by less than ``tol`` times the remaining error energy (then the achieved
error is within about ``1 + tol`` of the optimum, well inside the 1 % target), and falls back to
a full SVD when ``max_iters`` iterations did not settle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_OVERSAMPLE = 16
DEFAULT_MIN_ITERS = 2
DEFAULT_MAX_ITERS = 12
# Stop when one more power iteration gains less than TOL × (remaining error energy).
DEFAULT_TOL = 2e-3


@dataclass
class TruncatedSVD:
    """A ≈ U diag(S) Vh with U [m, k], S [k], Vh [k, n] (descending S)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    # ‖A‖²_F, exact: lets callers report the captured share and the error without the full spectrum.
    total_energy: float
    solver: str  # "exact" | "randomized"
    power_iters: int = 0


def _as64(x: torch.Tensor) -> torch.Tensor:
    # MPS has no float64: take the (small) tensor to the CPU for the bookkeeping sums.
    return x.to(device="cpu" if x.device.type == "mps" else x.device, dtype=torch.float64)


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced")[0]


def exact_svd(a: torch.Tensor, rank: int) -> TruncatedSVD:
    """Full (thin) SVD, truncated to ``rank``."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    total = float(a.float().square().sum()) if a.device.type == "mps" else float(_as64(a).square().sum())
    k = min(rank, s.numel())
    return TruncatedSVD(u[:, :k], s[:k], vh[:k], total, "exact")


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    min_iters: int = DEFAULT_MIN_ITERS,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: float = DEFAULT_TOL,
    generator: torch.Generator | None = None,
    keep: int | None = None,
) -> TruncatedSVD:
    """Top-``rank`` SVD of ``a`` [m, n] (the accuracy target is judged at ``rank``).

    ``keep`` (≥ rank) returns more triplets than the target rank when the caller wants to choose
    a rank afterwards from the spectrum. Works in ``a``'s dtype and on its device.
    """
    m, n = a.shape
    keep = rank if keep is None else max(keep, rank)
    small = min(m, n)
    width = min(keep + oversample, small)
    # A sketch as wide as the matrix's short side is no cheaper than the exact SVD.
    if width >= small or 2 * width > small and small <= 256:
        return exact_svd(a, keep)
    transposed = m < n  # run on the tall orientation: QR of the short sketch, fewer flops in B
    if transposed:
        a = a.T
        m, n = n, m
    total = float(a.float().square().sum()) if a.device.type == "mps" else float(_as64(a).square().sum())
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32).to(device=a.device, dtype=a.dtype)
    q = _orth(a @ omega)
    # Below this the remaining energy is rounding noise of the dtype: nothing left to gain.
    floor = total * (1e-14 if a.dtype == torch.float64 else 1e-7)
    prev = -1.0
    iters = 0
    while True:
        bt = a.T @ q  # Bᵀ = Aᵀ Q, [n, width]
        s = torch.linalg.svdvals(_as64(bt))  # float64: the energy difference is a small one
        captured = float(s[:rank].square().sum())
        remaining = max(total - captured, 0.0)
        if iters >= min_iters and (remaining <= floor or captured - prev <= tol * remaining):
            break
        if iters >= max_iters:
            out = exact_svd(a.T if transposed else a, keep)
            out.power_iters = iters
            return out
        prev = captured
        q = _orth(a @ _orth(bt))
        iters += 1
    # Bᵀ = P Σ Rᵀ  ->  B = R Σ Pᵀ  ->  A ≈ (Q R) Σ Pᵀ
    p_, s, rh = torch.linalg.svd(bt, full_matrices=False)
    u = q @ rh.T[:, :keep]
    vh = p_[:, :keep].T
    s = s[:keep]
    if transposed:  # Aᵀ ≈ U Σ Vh  ->  A ≈ Vhᵀ Σ Uᵀ
        u, vh = vh.T, u.T
    return TruncatedSVD(u.contiguous(), s, vh.contiguous(), total, "randomized", iters)


def truncated_svd(a: torch.Tensor, rank: int, *, exact: bool = False, keep: int | None = None,
                  generator: torch.Generator | None = None) -> TruncatedSVD:
    """Dispatch: the full SVD with ``exact``, the adaptive randomized solver otherwise."""
    if exact:
        return exact_svd(a, rank if keep is None else max(rank, keep))
    return randomized_svd(a, rank, keep=keep, generator=generator)
