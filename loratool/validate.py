"""Structural checks of an :class:`Adapter` a reader produced, before any op trusts it.

A file can be valid safetensors and still describe nonsense: a ``lora_down`` without its
``lora_up``, rank 0, factors whose ranks disagree, integer or empty tensors. Readers map keys;
this module says, once and for every layout, whether the result can be turned into ΔW, so
every op gets a clear :class:`InputError` naming the module instead of a shape error deep in
the maths. Non-finite values are not rejected here (``info`` must be able to show them);
:func:`nonfinite` lists them for the ops that must refuse them.
"""

from __future__ import annotations

import math
import numbers

from loratool.adapter import KINDS, LAYERS, Adapter, LoraModule
from loratool.errors import InputError
from loratool.header_only import is_tensor, torch

# The tensors each kind cannot do without; alternatives are listed as tuples (any one set).
_REQUIRED: dict[str, tuple[tuple[str, ...], ...]] = {
    "lora": (("down", "up"),),
    "loha": (("w1a", "w1b", "w2a", "w2b"),),
    "full": (("diff",),),
    "boft": (("blocks",),),
    "glora": (("a1", "a2", "b1", "b2"),),
    "norm": (("w_norm",),),
    "set": (("value",),),
}


def _lokr_missing(tensors: dict[str, torch.Tensor]) -> list[str]:
    missing = []
    if "w1" not in tensors and not ("w1a" in tensors and "w1b" in tensors):
        missing.append("w1 (or w1a and w1b)")
    if "w2" not in tensors and not ("w2a" in tensors and "w2b" in tensors):
        missing.append("w2 (or w2a and w2b)")
    return missing


def check_module(module: LoraModule, where: str) -> None:
    """Raise :class:`InputError` when ``module`` cannot describe a ΔW."""
    name = f"{where}: module {module.component}:{module.path}"
    if module.kind not in KINDS:
        raise InputError(f"{name}: unknown kind {module.kind!r}")
    if module.layer not in LAYERS:
        raise InputError(f"{name}: unknown layer type {module.layer!r}")
    t = module.tensors
    if module.kind == "lokr":
        missing = _lokr_missing(t)
    elif module.kind == "oft":
        missing = [] if "blocks" in t or "rotation" in t else ["blocks (or rotation)"]
    else:
        missing = [k for k in _REQUIRED[module.kind][0] if k not in t]
    if missing:
        raise InputError(f"{name}: {module.kind} module lacks {', '.join(missing)} (incomplete or corrupt file)")
    for key, tensor in module.all_tensors().items():
        if not is_tensor(tensor):
            raise InputError(f"{name}: {key} is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise InputError(f"{name}: {key} has dtype {tensor.dtype}; adapter tensors must be floating point")
        if tensor.numel() == 0:
            rank0 = module.kind == "lora" and "down" in t and t["down"].shape[0] == 0
            what = "rank 0 (empty factors)" if rank0 else f"{key} is empty {tuple(tensor.shape)}"
            raise InputError(f"{name}: {what}; nothing to apply")
    if module.kind == "lora":
        _check_lora_shapes(module, name)
    if module.alpha is not None and (
        isinstance(module.alpha, bool) or not isinstance(module.alpha, numbers.Real)
    ):
        raise InputError(f"{name}: alpha {module.alpha!r} is not a number")


def _check_lora_shapes(module: LoraModule, name: str) -> None:
    """down [r, in, ...], up [out, r(, 1, 1)], mid [r, r, kh, kw]: the ranks must agree."""
    t = module.tensors
    down, up = t["down"], t["up"]
    if down.dim() < 2 or up.dim() < 2:
        raise InputError(
            f"{name}: factors must have at least 2 dimensions (down {tuple(down.shape)}, up {tuple(up.shape)})"
        )
    r = int(down.shape[0])
    if up.numel() != up.shape[0] * r:
        raise InputError(
            f"{name}: ranks disagree: down {tuple(down.shape)} has rank {r}, up is {tuple(up.shape)}"
        )
    mid = t.get("mid")
    if mid is not None and (mid.dim() < 2 or tuple(mid.shape[:2]) != (r, r)):
        raise InputError(f"{name}: Tucker core {tuple(mid.shape)} does not fit rank {r}")


def check_adapter(adapter: Adapter, where: str) -> None:
    """Check every module of ``adapter`` (read from ``where``)."""
    for module in adapter:
        check_module(module, where)
    for (component, tname), tensor in adapter.extras.items():
        if not is_tensor(tensor):
            raise InputError(f"{where}: extra {component}:{tname} is a {type(tensor).__name__}, not a tensor")


def _nonfinite_parts(module: LoraModule) -> list[str]:
    bad = [k for k, v in module.all_tensors().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if module.alpha is not None and not math.isfinite(float(module.alpha)):
        bad.append("alpha")
    return bad


def nonfinite_modules(adapter: Adapter) -> list[str]:
    """``component:path`` of every module whose tensors or alpha hold NaN or Inf."""
    return [f"{m.component}:{m.path}" for m in adapter if _nonfinite_parts(m)]


def nonfinite(adapter: Adapter) -> list[str]:
    """``component:path (tensor)`` for every module tensor or alpha holding NaN or Inf."""
    found = []
    for module in adapter:
        bad = _nonfinite_parts(module)
        if bad:
            found.append(f"{module.component}:{module.path} ({', '.join(bad)})")
    return found
