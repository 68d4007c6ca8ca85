"""Truncated SVD of a dense matrix: randomized (Halko, Martinsson & Tropp 2011) or exact.

Randomized subspace iteration with oversampling ``p`` (width ``l = k + p``), written as a chain
of *half steps*, each one product with A or Aᵀ and an orthonormalisation of the [·, l] result::

    W₀ = orth(Ω)                     Ω ~ N(0, 1), n × l
    A Wⱼ   = Qⱼ₊₁ Rⱼ₊₁               (left step:  A ≈ Q R Wᵀ)
    Aᵀ Qⱼ  = Wⱼ₊₁ Rⱼ₊₁               (right step: A ≈ Q Rᵀ Wᵀ)

After every half step A ≈ Q M Wᵀ (M = R or Rᵀ, l × l) is the projection of A onto the current
bases, and the rank-k truncation of it, (Q P_k) Σ_k (W T_k)ᵀ with M = P Σ Tᵀ, has the exactly
known error ``‖A‖²_F − Σ_{i≤k} σᵢ(M)²`` (Pythagoras: the projection residual is orthogonal to
the kept part). The optimum (Eckart–Young) is ``‖A‖²_F − Σ_{i≤k} σᵢ(A)²``, and the captured
energy ``E = Σ_{i≤k} σᵢ(M)²`` never decreases from one half step to the next (σ(A W) ≤ σ(Qᵀ A)
by interlacing) while it converges geometrically to the optimum. So the solver stops once the
last half step raised E by less than ``tol`` times the remaining error energy ``‖A‖² − E`` (or
the remaining energy is rounding noise), after at least ``min_steps`` half steps; the tests show
on slowly decaying, knee, plateau, low-rank-plus-noise and real fine-tune spectra that every
module lands within 1 % of the optimal error. A module that has not settled after
``max_steps`` half steps falls back to the full SVD.

Only the l × l matrices M and the Gram matrices of the [·, l] sketches are handled in float64
(CholeskyQR2, falling back to Householder QR when a sketch is rank-deficient); the products with
A run in A's dtype on A's device, so the cost is (number of half steps) × 2·m·n·l flops and no
copy of A is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_OVERSAMPLE = 16
DEFAULT_MIN_STEPS = 4
DEFAULT_MAX_STEPS = 24
# Stop when the last half step gained less than TOL × (remaining error energy).
DEFAULT_TOL = 2e-3


@dataclass
class TruncatedSVD:
    """A ≈ U diag(S) Vh with U [m, k], S [k], Vh [k, n] (descending S)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    # ‖A‖²_F: lets callers report the captured share and the error without the full spectrum.
    total_energy: float
    solver: str  # "exact" | "randomized"
    power_iters: int = 0  # half steps (products with A or Aᵀ) of the randomized solver


def frobenius_sq(a: torch.Tensor) -> float:
    """‖A‖²_F of a 2-D ``a`` without a float64 copy of it: norms of the contiguous lines, summed in float64.

    (One float32 ``vector_norm`` over millions of entries drifts by ~1e-4 relative, too much for
    the stopping test, which compares ‖A‖² − E against small differences of E.)
    """
    if a.numel() == 0:
        return 0.0
    dim = 0 if a.dim() == 2 and a.stride(0) == 1 and a.stride(-1) != 1 else -1
    return float(_small64(torch.linalg.vector_norm(a, dim=dim)).square().sum())


def _small64(x: torch.Tensor) -> torch.Tensor:
    # MPS has no float64: the bookkeeping on [·, l] sketches runs on the CPU there.
    return x.to(device="cpu" if x.device.type == "mps" else x.device, dtype=torch.float64)


def _orth(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = Q R with orthonormal Q (y's dtype and device) and R [l, l] in float64.

    CholeskyQR2 (Gram matrix, Cholesky, triangular solve; twice, so that Q is orthonormal to
    rounding whenever cond(y) < ~1e7); Householder QR when the Gram is not positive definite.
    """
    y64 = _small64(y)
    q, r = y64, None
    for _ in range(2):
        c, info = torch.linalg.cholesky_ex(q.T @ q, upper=True)
        if int(info) != 0 or not bool(torch.isfinite(c).all()):
            q, r = torch.linalg.qr(y64, mode="reduced")
            break
        q = torch.linalg.solve_triangular(c, q, upper=True, left=False)
        r = c if r is None else c @ r
    return q.to(device=y.device, dtype=y.dtype), r


def exact_svd(a: torch.Tensor, rank: int, total_energy: float | None = None) -> TruncatedSVD:
    """Full (thin) SVD, truncated to ``rank``."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    total = frobenius_sq(a) if total_energy is None else total_energy
    k = min(rank, s.numel())
    return TruncatedSVD(u[:, :k], s[:k], vh[:k], total, "exact")


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    min_steps: int = DEFAULT_MIN_STEPS,
    max_steps: int = DEFAULT_MAX_STEPS,
    tol: float = DEFAULT_TOL,
    generator: torch.Generator | None = None,
    keep: int | None = None,
    total_energy: float | None = None,
) -> TruncatedSVD:
    """Top-``rank`` SVD of ``a`` [m, n] (the accuracy target is judged at ``rank``).

    ``keep`` (≥ rank) returns more triplets than the target rank when the caller wants to choose
    a rank afterwards from the spectrum. ``total_energy`` is ‖a‖²_F when the caller has it.
    Works in ``a``'s dtype and on its device. ``tol=0`` runs exactly ``min_steps`` half steps.
    """
    m, n = a.shape
    keep = rank if keep is None else max(keep, rank)
    small = min(m, n)
    width = min(keep + oversample, small)
    total = frobenius_sq(a) if total_energy is None else total_energy
    # A sketch as wide as the matrix's short side is no cheaper than the exact SVD.
    if width >= small or 2 * width > small and small <= 256:
        return exact_svd(a, keep, total)
    # Below this the remaining energy is rounding noise of the products in this dtype.
    floor = total * (1e-13 if a.dtype == torch.float64 else 1e-6)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32).to(device=a.device, dtype=a.dtype)
    w, _ = _orth(omega)
    q = r = None
    left = True  # the next half step multiplies by A (a left step) or by Aᵀ
    prev = -1.0
    steps = 0
    while True:
        if left:
            q, r = _orth(a @ w)
        else:
            w, r = _orth(a.T @ q)
        left = not left
        steps += 1
        captured = float(torch.linalg.svdvals(r)[:rank].square().sum())
        remaining = total - captured
        if steps >= min_steps and (tol <= 0 or remaining <= floor or captured - prev <= tol * remaining):
            break
        if steps >= max_steps:
            out = exact_svd(a, keep, total)
            out.power_iters = steps
            return out
        prev = captured
    # `left` flipped after the last step: it is False when that step was A W = Q R.
    core = r if not left else r.T  # A ≈ Q core Wᵀ
    p_, s, th = torch.linalg.svd(core, full_matrices=False)
    u = q @ p_[:, :keep].to(device=q.device, dtype=q.dtype)
    vh = th[:keep].to(device=w.device, dtype=w.dtype) @ w.T
    return TruncatedSVD(u.contiguous(), s[:keep].to(device=a.device, dtype=a.dtype), vh.contiguous(), total,
                        "randomized", steps)


def truncated_svd(a: torch.Tensor, rank: int, *, exact: bool = False, keep: int | None = None,
                  generator: torch.Generator | None = None, total_energy: float | None = None) -> TruncatedSVD:
    """Dispatch: the full SVD with ``exact``, the adaptive randomized solver otherwise."""
    if exact:
        return exact_svd(a, rank if keep is None else max(rank, keep), total_energy)
    return randomized_svd(a, rank, keep=keep, generator=generator, total_energy=total_energy)
