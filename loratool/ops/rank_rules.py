"""Choosing how many singular values to keep (shared by ``resize`` and ``extract``).

For singular values σ₀ ≥ σ₁ ≥ … (k counts values kept, so "i ≤ k" means the first k):

* fixed (no rule):  k = min(N, number of singular values)
* ``sv_fro``:        the smallest k with √(Σ_{i≤k} σᵢ² / Σ σᵢ²) ≥ P          (0 < P ≤ 1)
* ``sv_cumulative``: the smallest k with Σ_{i≤k} σᵢ / Σ σᵢ ≥ P                (0 < P ≤ 1)
* ``sv_ratio``:      k = #{i : σᵢ ≥ σ₀ / P}                                  (P ≥ 1)

Every result is then capped at the maximum rank N and at the number of values, and is at
least 1. "Smallest k" is the count itself: no extra value is kept past the one that reaches P
(the off-by-one of tools that add 1 to a zero-based search index twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratool.errors import UsageError

RULES = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass(frozen=True)
class RankRule:
    """``method`` None means a fixed rank; ``param`` is P."""

    method: str | None = None
    param: float | None = None

    def __post_init__(self) -> None:
        if self.method is None:
            if self.param is not None:
                raise UsageError("--param needs --dynamic sv_ratio|sv_fro|sv_cumulative")
            return
        if self.method not in RULES:
            raise UsageError(f"--dynamic {self.method}: choose one of {', '.join(RULES)}")
        if self.param is None:
            raise UsageError(f"--dynamic {self.method} needs --param")
        p = float(self.param)
        if self.method == "sv_ratio":
            if not p >= 1.0:
                raise UsageError(f"--dynamic sv_ratio --param {self.param}: P must be ≥ 1 (keep σ ≥ σ₀ / P)")
        elif not 0.0 < p <= 1.0:
            raise UsageError(f"--dynamic {self.method} --param {self.param}: P must be in (0, 1]")

    def describe(self) -> str:
        return "fixed" if self.method is None else f"{self.method}={self.param:g}"


def select_rank(S: torch.Tensor, max_rank: int, rule: RankRule | None = None) -> int:
    """k for singular values ``S`` (descending) under ``rule``, capped at ``max_rank``."""
    s = S.detach().to("cpu", torch.float64).clamp(min=0)
    n = int(s.numel())
    if n == 0:
        return 1
    cap = max(1, min(int(max_rank), n))
    if rule is None or rule.method is None:
        return cap
    p = float(rule.param)
    if rule.method == "sv_ratio":
        k = int((s >= s[0] / p).sum()) if s[0] > 0 else 1
    else:
        vals = s * s if rule.method == "sv_fro" else s
        cum = torch.cumsum(vals, 0)
        total = cum[-1]
        if total <= 0:
            return 1
        frac = cum / total  # the last entry is exactly 1.0
        if rule.method == "sv_fro":
            frac = frac.sqrt()
        k = int(torch.nonzero(frac >= p)[0, 0]) + 1
    return max(1, min(k, cap))
