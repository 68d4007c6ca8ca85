"""The rank a module's ΔW can have, from the stored shapes alone (no tensor data: header-only ``info``).

* ``lora``: r, the stored rank (rows of ``down``).
* ``lokr``: ΔW = w1 ⊗ w2 and rank(A ⊗ B) = rank(A)·rank(B); a factor's rank is its stored rank
  (``w1a``/``w1b``, ``w2a``/``w2b``, Tucker ``t2`` included) or, stored whole, the smaller side of
  its matrix. LyCORIS' ``lora_dim`` (what :attr:`LoraModule.rank` returns: the stored rank of
  ``w2a``/``w2b``, else of ``w1a``/``w1b``, 0 when both are whole) is one factor's rank only.
* ``loha`` / ``full``: the stored rank (LoHa's ΔW can reach r², but "dim" is what trainers set).

Capped at the smaller side of the adapted weight.
"""

from __future__ import annotations

import math

from loratool.adapter import LoraModule


def kron_rank(module: LoraModule) -> int:
    """rank(w1)·rank(w2) of a LoKr module, capped at the smaller side of ΔW."""
    t = module.tensors

    def factor(whole: str, b: str) -> int:
        if whole in t:
            shape = t[whole].shape
            return min(int(shape[0]), math.prod(int(x) for x in shape[1:]))
        return int(t[b].shape[0])

    shape = module.weight_shape
    return min(factor("w1", "w1b") * factor("w2", "w2b"), int(shape[0]), math.prod(int(x) for x in shape[1:]))


def delta_rank(module: LoraModule) -> int:
    """The rank shown for ``module``: :func:`kron_rank` for LoKr, the stored rank otherwise."""
    return kron_rank(module) if module.kind == "lokr" else module.rank
