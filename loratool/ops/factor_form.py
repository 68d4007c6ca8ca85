"""Any module as an exact factor form ΔM = scale · up @ down, or (where none is useful) dense ΔM.

ΔM is ΔW viewed as an output-major matrix [out, in·kh·kw]: the conv kernel is flattened into
the input side (index order in, kh, kw, as ``reshape`` does), and embeddings / fan_in_fan_out
weights (stored [in, out]) are transposed back, so ΔM is always the ``up @ down`` orientation.
:func:`to_module` turns a factor pair back into a LoRA module of the same layer.

Exact forms (s = module.scale):

* lora:            up [out, r], down [r, in·k·k]
* lora + Tucker:   down'[p, (i, h, w)] = Σ_q mid[p, q, h, w] · down[q, i]         (rank r)
* loha:            (A₁B₁) ⊙ (A₂B₂) = (A₁ • A₂)(B₁ ⊙ᶜ B₂): up[o, (p, p')] = A₁[o, p]·A₂[o, p'],
                   down[(p, p'), j] = B₁[p, j]·B₂[p', j]                         (rank r₁·r₂)
* lokr:            kron(W₁, W₂) with W₁ [a₁, b₁] and W₂ [a₂, b₂·k·k] (each whole, or U·V, W₂ Tucker-rebuilt)
                   kept as the pair of factors: ΔM = s · kron(W₁, W₂)            (``kron``)
* full:            dense diff.

A LoHa product whose rank reaches min(out, in·k·k) is returned dense instead: it is no smaller
than the matrix. ``delta.delta_weight`` stays the definition; tests check these forms against it.

:func:`form_svd` is the one SVD of any form: :func:`~loratool.ops.linalg.factor_svd` for factors
(QR / Gram of the thin factors plus a small core SVD, or for wide LoHa factors the Gram–eigen route
with the Grams of the Khatri–Rao factors from :func:`~loratool.ops.linalg.face_split_gram`),
:func:`~loratool.ops.linalg.kron_svd` for Kronecker products (the SVD of kron(W₁, W₂) is the
Kronecker product of the factors' SVDs: no dense ΔM), a dense SVD only for ``dense``.
:func:`singular_values` gives the spectrum alone and :func:`explicit_factors` an exact (up, down)
pair of minimal rank for any form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loratool.adapter import LoraModule
from loratool.delta import delta_weight
from loratool.ops.linalg import (
    EIGH_MIN_RANK,
    LowRankSVD,
    compute_dtype,
    dense_svd,
    face_split_gram,
    factor_svd,
    kron_svd,
    numerical_rank,
)
from loratool.shapes import lokr_factor_shapes

# Hints that carry maths (the DoRA axis and strength semantics) survive re-factoring.
_KEEP_HINTS = ("weight_shape", "dora_axis", "dora_strength")


@dataclass
class FactorForm:
    """ΔM = scale · up @ down, or ``dense`` when no useful factor form exists."""

    shape: tuple[int, int]  # (out, in·kh·kw)
    weight_shape: tuple[int, ...]  # the base weight's shape (conv kernel included)
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    scale: float = 1.0
    dense: torch.Tensor | None = None
    # ΔM = scale · kron(A, B), each factor a FactorForm of its own (factors or dense)
    kron: tuple[FactorForm, FactorForm] | None = None
    # LoHa: (A₁, A₂, B₁, B₂) with up = A₁ • A₂ and down rows B₁[p] ⊙ B₂[p'] (their Grams come cheaper)
    khatri_rao: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def is_dense(self) -> bool:
        return self.dense is not None

    @property
    def is_kron(self) -> bool:
        return self.kron is not None

    @property
    def dtype(self) -> torch.dtype:
        if self.kron is not None:
            return self.kron[0].dtype
        return (self.dense if self.dense is not None else self.up).dtype

    @property
    def rank(self) -> int:
        """An upper bound of rank(ΔM): the inner dimension of the form."""
        if self.dense is not None:
            return min(self.shape)
        if self.kron is not None:
            return self.kron[0].rank * self.kron[1].rank
        return int(self.up.shape[1])

    def matrix(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        if self.kron is not None:
            return torch.kron(self.kron[0].matrix(), self.kron[1].matrix()) * self.scale
        return (self.up @ self.down) * self.scale


def transposed(module: LoraModule) -> bool:
    """True when the stored weight is [in, out] (embedding tables, GPT-2 Conv1D)."""
    return module.layer == "embedding" or (module.layer == "linear" and module.fan_in_fan_out)


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _tucker_down(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down'[p, (i, h, w)] = Σ_q core[p, q, h, w] · down[q, i] (see delta._rebuild_tucker)."""
    return torch.einsum("pq...,qi->pi...", core, _mat(down)).reshape(core.shape[0], -1)


def _lora_weight_shape(module: LoraModule) -> tuple[int, ...]:
    hint = module.hints.get("weight_shape")
    return tuple(int(x) for x in hint) if hint is not None else tuple(module.weight_shape)


def _matrix_shape(weight_shape: tuple[int, ...], swap: bool) -> tuple[int, int]:
    if swap:
        return (int(weight_shape[1]), int(weight_shape[0]))
    return (int(weight_shape[0]), math.prod(int(x) for x in weight_shape[1:]))


def _lokr_factor(t: dict, name: str, dtype, device) -> FactorForm:
    """One Kronecker factor of a LoKr module as a matrix [a, b·k·k]: whole (dense) or a @ b."""
    if name in t:
        w = _mat(t[name].to(device=device, dtype=dtype))
        return FactorForm(tuple(w.shape), tuple(w.shape), dense=w)
    a = _mat(t[f"{name}a"].to(device=device, dtype=dtype))
    b = t[f"{name}b"].to(device=device, dtype=dtype)
    core = t.get("t2") if name == "w2" else None
    down = _tucker_down(core.to(device=device, dtype=dtype), b) if core is not None else _mat(b)
    return FactorForm((int(a.shape[0]), int(down.shape[1])), (int(a.shape[0]), int(down.shape[1])), up=a, down=down)


def _loha_pair(t: dict, a: str, b: str, core: str, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    wa = _mat(t[a].to(device=device, dtype=dtype))
    wb = t[b].to(device=device, dtype=dtype)
    if core in t:
        return wa, _tucker_down(t[core].to(device=device, dtype=dtype), wb)
    return wa, _mat(wb)


def to_factor_form(
    module: LoraModule,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> FactorForm:
    """The exact factor form of ``module`` (or its dense ΔM) in ``dtype`` on ``device``."""
    t = module.tensors
    swap = transposed(module)
    if module.kind == "lora":
        wshape = _lora_weight_shape(module)
        shape = _matrix_shape(wshape, swap)
        r = int(t["down"].shape[0])
        up = t["up"].to(device=device, dtype=dtype).reshape(-1, r)
        down = t["down"].to(device=device, dtype=dtype)
        down = _tucker_down(t["mid"].to(device=device, dtype=dtype), down) if "mid" in t else _mat(down)
        return FactorForm(shape, wshape, up=up, down=down, scale=module.scale)

    if module.kind == "lokr":
        wshape = tuple(module.weight_shape)
        shape = _matrix_shape(wshape, swap)
        w1_shape, _ = lokr_factor_shapes(module)
        if not swap and math.prod(w1_shape[2:]) == 1:  # the kernel, if any, is in w2
            a = _lokr_factor(t, "w1", dtype, device)
            b = _lokr_factor(t, "w2", dtype, device)
            if (a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]) == shape:
                return FactorForm(shape, wshape, scale=module.scale, kron=(a, b))
    elif module.kind == "loha":
        wshape = tuple(module.weight_shape)
        shape = _matrix_shape(wshape, swap)
        a1, b1 = _loha_pair(t, "w1a", "w1b", "t1", dtype, device)
        a2, b2 = _loha_pair(t, "w2a", "w2b", "t2", dtype, device)
        if not swap and a1.shape[1] * a2.shape[1] < min(shape):
            up = torch.einsum("op,oq->opq", a1, a2).reshape(a1.shape[0], -1)
            down = torch.einsum("pj,qj->pqj", b1, b2).reshape(-1, b1.shape[1])
            if tuple(up.shape[:1]) + tuple(down.shape[1:]) == shape:
                return FactorForm(shape, wshape, up=up, down=down, scale=module.scale, khatri_rao=(a1, a2, b1, b2))
        # No smaller exact form (or an unusual stored layout): fall back to the definition.
    else:  # full, norm (and base-dependent kinds, for which delta_weight says why there is no ΔW)
        wshape = tuple(module.weight_shape)
        shape = _matrix_shape(wshape, swap)
    delta = delta_weight(module, dtype=dtype, device=device)
    dense = delta.T if swap else delta.reshape(delta.shape[0], -1)
    return FactorForm(shape, wshape, dense=dense.contiguous())


def _finite(t: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError("ΔW holds NaN or Inf")
    return t


def form_svd(
    form: FactorForm,
    *,
    rank: int | None = None,
    choose: Callable[[torch.Tensor], int] | None = None,
    dtype: torch.dtype | None = None,
) -> LowRankSVD:
    """The exact SVD of ΔM, truncated to ``rank`` or to ``choose(S)`` (S: every singular value).

    Raises ``FloatingPointError`` when the form holds NaN or Inf.
    """
    if form.dense is not None:
        work = dtype or compute_dtype(form.dense.device, form.dense.numel())
        svd = dense_svd(_finite(form.dense), dtype=work)
        k = choose(svd.S) if choose is not None else rank
        return svd.truncate(k) if k is not None else svd
    if form.kron is not None:
        a, b = (form_svd(f, dtype=dtype) for f in form.kron)
        return kron_svd(a, b, form.scale, rank=rank, choose=choose)
    work = dtype or compute_dtype(form.up.device, sum(form.shape) * form.rank)
    grams = None
    if form.khatri_rao is not None and work == torch.float64 and form.rank >= EIGH_MIN_RANK:
        a1, a2, b1, b2 = (t.to(work) for t in form.khatri_rao)
        grams = (face_split_gram(a1, a2), face_split_gram(b1.T, b2.T))
    return factor_svd(form.up, form.down, form.scale, rank=rank, choose=choose, dtype=work, grams=grams)


def singular_values(form: FactorForm, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every singular value of ΔM that can be nonzero, descending (no singular vectors formed
    for Kronecker forms: σ(kron(A, B)) = {σᵢ(A)·σⱼ(B)})."""
    if form.kron is not None:
        sa, sb = (singular_values(f, dtype=dtype) for f in form.kron)
        return torch.sort((sa[:, None] * sb[None, :]).reshape(-1) * abs(form.scale), descending=True).values
    if form.dense is not None:
        work = dtype or compute_dtype(form.dense.device, form.dense.numel())
        return torch.linalg.svdvals(_finite(form.dense).to(work))
    found: list[torch.Tensor] = []

    def spectrum_only(S: torch.Tensor) -> int:  # keep no triplet: no singular vectors are formed
        found.append(S)
        return 0

    form_svd(form, choose=spectrum_only, dtype=dtype)
    return found[-1]  # the route that was kept (a Gram route that fails its check is redone by QR)


def explicit_factors(form: FactorForm) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, scale) with scale · up @ down = ΔM: the form's own factors, else (dense and
    Kronecker forms) U·Σ and Vh of its SVD at the numerical rank (every σ above rounding)."""
    if form.up is not None:
        return form.up, form.down, form.scale
    svd = form_svd(form, dtype=form.dtype)
    svd = svd.truncate(numerical_rank(svd, form.shape))
    return svd.U * svd.S, svd.Vh, 1.0


def _svd_flops(m: int, n: int, r: int | None = None) -> float:
    if r is None or r >= min(m, n):
        return 4.0 * m * n * min(m, n)
    return 4.0 * (m + n) * r * r + 20.0 * r ** 3


def svd_flops(module: LoraModule) -> float:
    """Rough flops of :func:`form_svd` on ``module``'s form, from shapes alone (sizes work for
    :class:`~loratool.ops.device.ThreadPolicy`)."""
    t = module.tensors
    m, n = _matrix_shape(tuple(module.weight_shape), transposed(module))
    if module.kind == "lora":
        return _svd_flops(m, n, module.rank)
    if module.kind == "loha":
        return _svd_flops(m, n, int(t["w1b"].shape[0]) * int(t["w2b"].shape[0]))
    if module.kind == "lokr":
        w1, w2 = lokr_factor_shapes(module)
        ranks = [int(t[f"{w}b"].shape[0]) if f"{w}b" in t else None for w in ("w1", "w2")]
        return sum(_svd_flops(s[0], math.prod(s[1:]), r) for s, r in zip((w1, w2), ranks)) + 4.0 * (m + n) * min(m, n)
    return _svd_flops(m, n)


def to_module(
    template: LoraModule,
    form_shape: tuple[int, ...],
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    scale: float,
    rslora: bool,
    dtype: torch.dtype,
) -> LoraModule:
    """A ``lora`` module with scale' · up @ down as its ΔM, laid out like ``template``.

    ``scale`` is the module's scale after the change; alpha is chosen to give it: alpha =
    scale · k (scale · √k with rsLoRA). Conv modules get up [out, k, 1, 1] and down
    [k, in, kh, kw]; the DoRA magnitude, layer and fan_in_fan_out are kept.
    """
    k = int(up.shape[1])
    alpha = scale * (math.sqrt(k) if rslora else k)
    wshape = tuple(form_shape)
    if template.layer == "conv":
        up_t = up.reshape(up.shape[0], k, 1, 1)
        down_t = down.reshape(k, *wshape[1:])
    else:
        up_t, down_t = up, down
    tensors = {"up": up_t.to("cpu", dtype).contiguous(), "down": down_t.to("cpu", dtype).contiguous()}
    hints = {h: v for h, v in template.hints.items() if h in _KEEP_HINTS}
    return LoraModule(
        component=template.component,
        path=template.path,
        kind="lora",
        layer=template.layer,
        tensors=tensors,
        alpha=float(alpha),
        rslora=rslora,
        magnitude=template.magnitude,
        fan_in_fan_out=template.fan_in_fan_out,
        hints=hints,
    )
