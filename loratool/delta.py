"""The one place that turns a module into ΔW, and ΔW into a merged weight.

Formulas (s = module.scale, shapes as the base stores the weight):

* lora linear:       ΔW = s · up @ down                              [out, in]
  fan_in_fan_out:    ΔW = (s · up @ down)ᵀ                           [in, out]
* lora conv k×k:     ΔW = s · (up.view(out, r) @ down.view(r, in·k·k)).view(out, in, k, k)
  with Tucker mid:   ΔW[o, i, :, :] = s · Σ_pq up[o, p] · mid[p, q, :, :] · down[q, i]
* lora embedding:    ΔW = (s · up @ down)ᵀ                           [num, dim]
* loha:              ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b)   (Tucker: each half rebuilt from t·a·b)
* lokr:              ΔW = s · kron(w1, w2), w1 = w1a @ w1b and w2 = w2a @ w2b when factorised
* full:              ΔW = diff
* norm:              ΔW = w_norm, Δb = b_norm                         (LyCORIS norm modules)

Kinds whose update depends on the base weight W (merged by :func:`merge_weight`; ΔW = W' − W
exists only against a base, :func:`delta_weight` with ``base=``), strength λ:

* oft (LyCORIS DiagOFT, ``lycoris.functional.diag_oft``): blocks B [n, b, b], Q = B − Bᵀ,
  scaled by c / ‖Q‖_F when c = alpha · out > 0 and ‖Q‖_F + 1e-8 > c; R = (I + Q)(I − Q)⁻¹;
  A = λR + (1 − λ)I; W' = rescale ⊙ W'' with W''[k·b + m] = Σ_n A[k, n, m] · W[k·b + n]
  (per block k, rows of W mixed by Aᵀ). Old files (``oft_diag``) store R itself, no constraint.
* boft (LyCORIS butterfly OFT): blocks [m, n, b, b], R per stage as above (one constraint over all
  stages); stage i permutes the rows in groups of 2 · 2^i · b/2, applies the n blocks
  A_i = λR_i + (1 − λ)I and permutes back; W' = rescale ⊙ (stages applied in order to W).
* glora (LyCORIS GLoRA): W' = W + λ · s · (W @ a1 @ a2 + b1 @ b2), s = alpha / r, r = a2 rows
  (conv: a1, a2 act on the input channels of every kernel tap).
* set: W' = value, for every λ (ComfyUI's ``set`` patch; diffusers loads BFL control norms
  the same way, outright).

Widening (diffusers ``_maybe_expand_transformer_param_shape_or_error_``, ComfyUI
``pad_tensor_to_shape``): a module marked ``hints["widen"]`` whose ΔW is larger than W in some
dimension merges into W zero-padded to ΔW's shape (the old weight in the leading block).

Merging with strength λ: W' = W + λ·ΔW. DoRA (magnitude m, norms ‖·‖ per output feature:
rows of a Linear weight, output channels of a conv, embedding dimensions of an embedding table;
per input column instead with ``hints["dora_axis"] == "in"``, LyCORIS ``wd_on_out=False``).
λ enters as the module's layout library does (``hints["dora_strength"]``, set by the reader):

* ``"peft"`` (default; PEFT / diffusers, whose strength is the LoRA scaling, ``set_scale``):
  W' = m / ‖W + λ·ΔW‖ ⊙ (W + λ·ΔW);
* ``"lycoris"`` (kohya-layout ``dora_scale``; lycoris ``functional.general._weight_decompose``,
  which its ``forward`` and ``get_merged_weight`` both use, with the multiplier λ):
  W' = (W + ΔW) ⊙ (λ·(m / (‖W + ΔW‖ + ε) − 1) + 1), ε = the compute dtype's machine epsilon.

Both give m / ‖W + ΔW‖ ⊙ (W + ΔW) at λ = 1.
"""

from __future__ import annotations

import torch

from loratool.adapter import LoraModule
from loratool.errors import MatchError
from loratool.shapes import KNOWN_SHAPE as KNOWN_SHAPE
from loratool.shapes import product_shape as product_shape  # re-exported: the shape rules live there
from loratool.shapes import weight_shape as weight_shape

# Kinds whose update is a function of the base weight (see the module doc).
BASE_DEPENDENT = ("oft", "boft", "glora", "set")


def _rebuild_tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Σ_pq up[o, p] · core[p, q, ...] · down[q, i] -> [o, i, ...]."""
    return torch.einsum("pq...,op,qi->oi...", core, up, down)


def _lora_delta(module: LoraModule, dtype: torch.dtype, device) -> torch.Tensor:
    t = module.tensors
    down = t["down"].to(device=device, dtype=dtype)
    up = t["up"].to(device=device, dtype=dtype)
    r = down.shape[0]
    up2 = up.reshape(up.shape[0], r)
    if "mid" in t:
        mid = t["mid"].to(device=device, dtype=dtype)
        return _rebuild_tucker(mid, up2, down.reshape(r, -1)) * module.scale
    delta = (up2 @ down.reshape(r, -1)) * module.scale
    if module.layer == "conv":
        return delta.reshape(up.shape[0], *down.shape[1:])
    if module.layer == "embedding" or module.fan_in_fan_out:
        return delta.T
    return delta


def _half(t: dict, a: str, b: str, core: str | None, dtype, device) -> torch.Tensor:
    wa = t[a].to(device=device, dtype=dtype)
    wb = t[b].to(device=device, dtype=dtype)
    if core is not None and core in t:
        return _rebuild_tucker(t[core].to(device=device, dtype=dtype), wa.reshape(wa.shape[0], -1),
                               wb.reshape(wb.shape[0], -1))
    return wa.reshape(wa.shape[0], -1) @ wb.reshape(wb.shape[0], -1)


def _lycoris_delta(module: LoraModule, dtype: torch.dtype, device) -> torch.Tensor:
    t = module.tensors
    if module.kind == "loha":
        return _half(t, "w1a", "w1b", "t1", dtype, device) * _half(t, "w2a", "w2b", "t2", dtype, device) \
            * module.scale
    if module.kind == "lokr":
        w1 = t["w1"].to(device=device, dtype=dtype) if "w1" in t else _half(t, "w1a", "w1b", None, dtype, device)
        w2 = t["w2"].to(device=device, dtype=dtype) if "w2" in t else _half(t, "w2a", "w2b", "t2", dtype, device)
        if w2.dim() > 2 and w1.dim() == 2:
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1.contiguous(), w2.contiguous()) * module.scale  # kron fails on Tucker views
    raise ValueError(f"not a LyCORIS product kind: {module.kind}")


def delta_weight(
    module: LoraModule,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    shape: tuple[int, ...] | None = None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW of one module in ``dtype`` on ``device``, shaped like the base weight.

    ``shape`` (the base weight's shape) resolves layouts the factors alone cannot tell apart
    (LoHa/LoKr conv products are stored flattened); a mismatch is a :class:`MatchError`.
    Base-dependent kinds (oft, boft, glora, set) need ``base``, the weight they change:
    ΔW = merge_weight(base, module) − base.
    """
    if module.kind in BASE_DEPENDENT:
        if base is None:
            raise MatchError(f"{module.component}:{module.path}: a {module.kind} module changes W by a function "
                             f"of W; its ΔW exists only against a base weight (merge it into one)")
        w = base.to(device=device, dtype=dtype)
        return merge_weight(w, module, 1.0, dtype=dtype) - widen(w, module, tuple(w.shape))
    if module.kind == "norm":
        return module.tensors["w_norm"].to(device=device, dtype=dtype)
    if module.kind == "lora":
        delta = _lora_delta(module, dtype, device)
    elif module.kind == "full":
        delta = module.tensors["diff"].to(device=device, dtype=dtype)
    else:
        delta = _lycoris_delta(module, dtype, device)
        hint = module.hints.get("weight_shape")
        target = shape or hint
        if target is not None and tuple(delta.shape) != tuple(target) and delta.numel() == _numel(target):
            delta = delta.reshape(*target)
    if shape is not None and tuple(delta.shape) != tuple(shape):
        if delta.numel() == _numel(shape) and _same_matrix(delta.shape, shape):
            delta = delta.reshape(*shape)
        else:
            raise MatchError(
                f"{module.component}:{module.path}: adapter gives shape {tuple(delta.shape)}, "
                f"base weight is {tuple(shape)}"
            )
    return delta


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _same_matrix(a, b) -> bool:
    """Conv 1×1 weights and Linear weights hold the same matrix: [o, i, 1, 1] == [o, i]; and a ΔW
    flattened as [o, i·kh·kw] is a k×k conv's [o, i, kh, kw] read row-major (how LyCORIS and conv
    LoRA factors flatten a kernel: ``weight.reshape(out, -1)``)."""
    squeeze = [tuple(s for i, s in enumerate(x) if i < 2 or s != 1) for x in (a, b)]
    if squeeze[0] == squeeze[1]:
        return True
    flat, conv = (tuple(a), tuple(b)) if len(a) == 2 else (tuple(b), tuple(a))
    return len(flat) == 2 and len(conv) > 2 and flat == (conv[0], _numel(conv[1:]))


def _output_major(weight: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """View ``weight`` with output features on dim 0 (how DoRA norms are taken)."""
    if module.layer == "embedding" or (module.layer == "linear" and module.fan_in_fan_out):
        return weight.T
    return weight


def _plain_linear(module: LoraModule, shape: tuple[int, ...]) -> bool:
    """A rank-r Linear module whose ΔW = s·up @ down already has the weight's [out, in] shape."""
    t = module.tensors
    return (
        module.kind == "lora" and module.layer == "linear" and not module.fan_in_fan_out and "mid" not in t
        and t["down"].dim() == 2 and len(shape) == 2 and shape == (int(t["up"].shape[0]), int(t["down"].shape[1]))
    )


def lycoris_strength(module: LoraModule) -> bool:
    """Whether λ applies as LyCORIS' DoRA multiplier (outside the norm) rather than to ΔW (PEFT)."""
    return module.magnitude is not None and module.hints.get("dora_strength") == "lycoris"


def _magnitude(module: LoraModule, features: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The DoRA magnitude as a vector in ``dtype``, checked against the weight's feature count."""
    mag = module.magnitude.to(device=device, dtype=dtype).reshape(-1)
    if mag.numel() != features:
        axis = "input" if module.hints.get("dora_axis") == "in" else "output"
        raise MatchError(
            f"{module.component}:{module.path}: DoRA magnitude has {mag.numel()} entries, "
            f"the weight has {features} {axis} features"
        )
    return mag


def dora_factor(norm: torch.Tensor, mag: torch.Tensor, lycoris: bool, strength: float) -> torch.Tensor:
    """The per-feature f with W' = f ⊙ (W + λ'·ΔW), from the norms of W + λ'·ΔW (module docstring)."""
    if not lycoris:
        return mag / norm
    factor = mag / (norm + torch.finfo(norm.dtype).eps)
    return factor if strength == 1 else strength * (factor - 1) + 1


def merge_weight(
    weight: torch.Tensor,
    module: LoraModule,
    strength: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """W + λ·ΔW (or the DoRA re-normalised form) in ``dtype`` on ``weight``'s device.

    The result is not cast back: callers cast to the stored dtype once, at the end.
    """
    w = weight.to(dtype=dtype)
    if module.kind in BASE_DEPENDENT:
        return MERGES[module.kind](w, module, strength)
    inner = 1.0 if lycoris_strength(module) else strength  # the λ that scales ΔW itself
    if delta is None and _plain_linear(module, tuple(w.shape)):
        # Same formula, one fused pass: W + (λ·s)·up @ down without materialising ΔW.
        t = module.tensors
        up = t["up"].to(device=w.device, dtype=dtype).reshape(t["up"].shape[0], -1)
        down = t["down"].to(device=w.device, dtype=dtype)
        merged = torch.addmm(w, up, down, alpha=inner * module.scale)
    else:
        if delta is None:
            delta = delta_weight(module, dtype=dtype, device=w.device,
                                 shape=None if module.hints.get("widen") else tuple(w.shape))
        w = widen(w, module, tuple(delta.shape))
        merged = w + inner * delta.to(device=w.device, dtype=dtype)
    if module.magnitude is None:
        return merged
    if module.hints.get("dora_axis") == "in":
        view = merged.transpose(0, 1)  # input features on dim 0
    else:
        view = _output_major(merged, module)
    mag = _magnitude(module, view.shape[0], dtype, w.device)
    factor = dora_factor(view.reshape(view.shape[0], -1).norm(p=2, dim=1), mag, lycoris_strength(module), strength)
    out = view * factor.reshape(-1, *([1] * (view.dim() - 1)))
    return out.transpose(0, 1) if module.hints.get("dora_axis") == "in" else _output_major(out, module)


def delta_bias(
    module: LoraModule, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """Δb of a module that also adapts its layer's bias, else None.

    lora with ``bias`` (PEFT ``lora_bias``, stored on lora_B): Δb = s · bias (PEFT merges
    ``bias + lora_B.bias * scaling``); full: Δb = diff_b.
    """
    t = module.tensors
    if module.kind == "lora" and "bias" in t:
        return t["bias"].to(device=device, dtype=dtype) * module.scale
    if module.kind == "full" and "diff_b" in t:
        return t["diff_b"].to(device=device, dtype=dtype)
    if module.kind == "norm" and "b_norm" in t:
        return t["b_norm"].to(device=device, dtype=dtype)
    return None


def has_bias_delta(module: LoraModule) -> bool:
    """Whether :func:`delta_bias` gives a Δb for this module."""
    return BIAS_TENSOR.get(module.kind) in module.tensors


# The tensor holding a kind's bias delta (Δb).
BIAS_TENSOR = {"lora": "bias", "full": "diff_b", "norm": "b_norm"}


class RowMerge:
    """``merge_weight`` restricted to a block of rows, for modules whose merge is row-separable.

    For a plain Linear LoRA (``_plain_linear``: ΔW = s·up @ down, weight [out, in]) row i of the
    merged weight depends on row i of W only:

        W'[a:b] = W[a:b] + (λ·s) · up[a:b] @ down
        DoRA:    W'[a:b] = m[a:b] / ‖W'[a:b]‖_row ⊙ W'[a:b]      (norm per output row)

    (the LyCORIS strength form, W'[a:b] = W''[a:b] ⊙ (λ·(m[a:b] / ‖W''[a:b]‖ − 1) + 1) with
    W'' = W + s·up @ down, is row-separable too), so a big weight can be merged block by block with
    the same float ops as :func:`merge_weight` (one addmm with the same alpha, the same per-row
    norm), keeping the work in cache. Build with :func:`row_merge`; factors are converted to
    ``dtype`` once.
    """

    def __init__(self, module: LoraModule, strength: float, dtype: torch.dtype, device) -> None:
        t = module.tensors
        self.module = module
        self.strength = strength
        self.up = t["up"].to(device=device, dtype=dtype).reshape(t["up"].shape[0], -1)
        self.down = t["down"].to(device=device, dtype=dtype)
        self.lycoris = lycoris_strength(module)
        self.alpha = (1.0 if self.lycoris else strength) * module.scale
        self.magnitude = None
        if module.magnitude is not None:
            self.magnitude = _magnitude(module, self.up.shape[0], dtype, device)

    def apply_(self, block: torch.Tensor, start: int) -> torch.Tensor:
        """Merge rows ``start .. start + len(block)`` of the weight, in place on ``block`` (already ``dtype``)."""
        stop = start + block.shape[0]
        block.addmm_(self.up[start:stop], self.down, alpha=self.alpha)
        if self.magnitude is not None:
            factor = dora_factor(block.norm(p=2, dim=1), self.magnitude[start:stop], self.lycoris, self.strength)
            block.mul_(factor.reshape(-1, 1))
        return block


def row_merge(
    module: LoraModule,
    strength: float,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> RowMerge | None:
    """A :class:`RowMerge` when merging ``module`` into a weight of ``shape`` is row-separable, else None.

    Row-separable: a plain Linear LoRA, without DoRA or with output-axis DoRA (either strength form).
    Everything else (conv, embedding, fan_in_fan_out, LyCORIS products, input-axis DoRA) needs
    the whole weight: use :func:`merge_weight`.
    """
    if not _plain_linear(module, tuple(int(s) for s in shape)):
        return None
    if module.magnitude is not None and module.hints.get("dora_axis") == "in":
        return None
    return RowMerge(module, strength, dtype, device)


# ----------------------------------------------------------------------------- base-dependent kinds


def widen(weight: torch.Tensor, module: LoraModule, shape: tuple[int, ...]) -> torch.Tensor:
    """``weight`` zero-padded to ``shape`` when the module is marked ``widen`` and reaches past it.

    As diffusers expands a Linear for a Flux control LoRA (``x_embedder`` [D, 64] -> [D, 128]):
    new weight = zeros(shape), its leading block = the old weight; the bias is unchanged.
    """
    if not module.hints.get("widen") or tuple(weight.shape) == tuple(shape):
        return weight
    if len(shape) != weight.dim() or any(a > b for a, b in zip(weight.shape, shape)):
        raise MatchError(f"{module.component}:{module.path}: cannot widen a weight {tuple(weight.shape)} "
                         f"to {tuple(shape)}")
    out = weight.new_zeros(shape)
    out[tuple(slice(0, n) for n in weight.shape)] = weight
    return out


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block, Q = B − Bᵀ scaled to norm ``constraint`` when it exceeds it.

    ``lycoris.functional.diag_oft.get_r``: ‖Q‖_F is taken over all blocks at once, plus 1e-8.
    """
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _constraint(module: LoraModule, out: int) -> float:
    """LyCORIS stores the OFT constraint as ``alpha``; the module uses alpha · out_features."""
    return float(module.alpha or 0.0) * out


def _rescale(merged: torch.Tensor, module: LoraModule) -> torch.Tensor:
    rescale = module.tensors.get("rescale")
    if rescale is None:
        return merged
    r = rescale.to(device=merged.device, dtype=merged.dtype)
    return merged * r.reshape(r.shape[0], *([1] * (merged.dim() - 1)))


def oft_merge(weight: torch.Tensor, module: LoraModule, strength: float) -> torch.Tensor:
    """W' of a DiagOFT module (formula in the module doc), in ``weight``'s dtype and device."""
    t = module.tensors
    w = weight
    if "rotation" in t:
        r = t["rotation"].to(device=w.device, dtype=w.dtype)
    else:
        r = cayley(t["blocks"].to(device=w.device, dtype=w.dtype), _constraint(module, w.shape[0]))
    n, b, _ = r.shape
    if n * b != w.shape[0]:
        raise MatchError(f"{module.component}:{module.path}: OFT blocks {n}×{b} do not cover the weight's "
                         f"{w.shape[0]} output rows")
    eye = torch.eye(b, dtype=w.dtype, device=w.device)
    a = strength * r + (1.0 - strength) * eye
    mixed = torch.einsum("knm,kn...->km...", a, w.reshape(n, b, *w.shape[1:])).reshape(w.shape)
    return _rescale(mixed, module)


def boft_merge(weight: torch.Tensor, module: LoraModule, strength: float) -> torch.Tensor:
    """W' of a butterfly-OFT module (``lycoris.functional.boft``), in ``weight``'s dtype and device."""
    w = weight
    blocks = module.tensors["blocks"].to(device=w.device, dtype=w.dtype)
    m, n, b, _ = blocks.shape
    if n * b != w.shape[0]:
        raise MatchError(f"{module.component}:{module.path}: BOFT blocks {n}×{b} do not cover the weight's "
                         f"{w.shape[0]} output rows")
    r = cayley(blocks, _constraint(module, w.shape[0]))
    eye = torch.eye(b, dtype=w.dtype, device=w.device)
    x = w
    for i in range(m):
        a = strength * r[i] + (1.0 - strength) * eye
        k = 2 ** i * (b // 2)
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("bij,bj...->bi...", a, x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return _rescale(x, module)


def glora_merge(weight: torch.Tensor, module: LoraModule, strength: float) -> torch.Tensor:
    """W + λ·s·(W @ a1 @ a2 + b1 @ b2) (``lycoris.modules.glora._glora_weight``)."""
    t = module.tensors
    w = weight
    a1, a2, b1, b2 = (t[k].to(device=w.device, dtype=w.dtype) for k in ("a1", "a2", "b1", "b2"))
    a1, a2 = a1.reshape(a1.shape[0], -1), a2.reshape(a2.shape[0], -1)
    wb = (b1.reshape(b1.shape[0], -1) @ b2.reshape(b2.shape[0], -1)).reshape(w.shape)
    wa = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", w, a1), a2)
    return w + (strength * module.scale) * (wb + wa)


def set_merge(weight: torch.Tensor, module: LoraModule, strength: float) -> torch.Tensor:
    """The stored value, whatever λ (see the module doc)."""
    value = module.tensors["value"].to(device=weight.device, dtype=weight.dtype)
    if tuple(value.shape) != tuple(weight.shape):
        raise MatchError(f"{module.component}:{module.path}: value {tuple(value.shape)} does not fit the "
                         f"weight {tuple(weight.shape)}")
    return value.clone()


MERGES = {"oft": oft_merge, "boft": boft_merge, "glora": glora_merge, "set": set_merge}
