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
* lokr:            kron(U₁V₁, U₂V₂) = kron(U₁, U₂) · kron(V₁, V₂), a whole factor W taken as
                   I·W or W·I, whichever is thinner                                (rank r₁·r₂)
* full:            dense diff.

A product form whose rank reaches min(out, in·k·k) is returned dense instead: it is no smaller
than the matrix. ``delta.delta_weight`` stays the definition; tests check these forms against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loratool.adapter import LoraModule
from loratool.delta import delta_weight
from loratool.ops.linalg import dense_svd, numerical_rank

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

    @property
    def is_dense(self) -> bool:
        return self.dense is not None

    @property
    def rank(self) -> int:
        return min(self.shape) if self.dense is not None else int(self.up.shape[1])

    def matrix(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
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


def _whole_pair(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [a, b] as U @ V with the smaller inner dimension (I·W or W·I)."""
    a, b = w.shape
    if a <= b:
        return torch.eye(a, dtype=w.dtype, device=w.device), w
    return w, torch.eye(b, dtype=w.dtype, device=w.device)


def _lokr_pair(t: dict, name: str, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    if name in t:
        return _whole_pair(_mat(t[name].to(device=device, dtype=dtype)))
    a = _mat(t[f"{name}a"].to(device=device, dtype=dtype))
    b = t[f"{name}b"].to(device=device, dtype=dtype)
    core = t.get("t2") if name == "w2" else None
    if core is not None:
        return a, _tucker_down(core.to(device=device, dtype=dtype), b)
    return a, _mat(b)


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

    if module.kind in ("loha", "lokr"):
        wshape = tuple(module.weight_shape)
        shape = _matrix_shape(wshape, swap)
        if module.kind == "loha":
            a1, b1 = _loha_pair(t, "w1a", "w1b", "t1", dtype, device)
            a2, b2 = _loha_pair(t, "w2a", "w2b", "t2", dtype, device)
            inner = a1.shape[1] * a2.shape[1]
        else:
            u1, v1 = _lokr_pair(t, "w1", dtype, device)
            u2, v2 = _lokr_pair(t, "w2", dtype, device)
            inner = u1.shape[1] * u2.shape[1]
        if not swap and inner < min(shape):
            if module.kind == "loha":
                up = torch.einsum("op,oq->opq", a1, a2).reshape(a1.shape[0], -1)
                down = torch.einsum("pj,qj->pqj", b1, b2).reshape(-1, b1.shape[1])
            else:
                up, down = torch.kron(u1, u2), torch.kron(v1, v2)
            if tuple(up.shape[:1]) + tuple(down.shape[1:]) == shape:
                return FactorForm(shape, wshape, up=up, down=down, scale=module.scale)
        # No smaller exact form (or an unusual stored layout): fall back to the definition.
    else:  # full, norm (and base-dependent kinds, for which delta_weight says why there is no ΔW)
        wshape = tuple(module.weight_shape)
        shape = _matrix_shape(wshape, swap)
    delta = delta_weight(module, dtype=dtype, device=device)
    dense = delta.T if swap else delta.reshape(delta.shape[0], -1)
    return FactorForm(shape, wshape, dense=dense.contiguous())


def exact_factors(form: FactorForm) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, scale) with scale · up @ down = ΔM; a dense ΔM is factored exactly by its SVD
    (every singular value above the usual rounding tolerance kept)."""
    if not form.is_dense:
        return form.up, form.down, form.scale
    svd = dense_svd(form.dense, dtype=form.dense.dtype)
    svd = svd.truncate(numerical_rank(svd, form.shape))
    return svd.U * svd.S, svd.Vh, 1.0


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
