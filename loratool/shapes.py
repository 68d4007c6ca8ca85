"""The shape of the weight a module adapts, from its tensors' shapes alone (no maths, no torch).

This is :func:`loratool.delta.delta_weight`'s output shape, computed without forming ΔW, so it
works on header-only stand-ins (:mod:`loratool.header_tensors`) as well as on real tensors:

* lora:    linear [out, in] (fan_in_fan_out: [in, out]); conv [out, in, *kernel] (kernel from
           ``mid`` when there is a Tucker core, else from ``down``); embedding [num, dim].
* loha:    each half is [o, i·k·k] = a @ b, or [o, i, *kernel] with a Tucker core; ΔW is the
           elementwise product of the halves, so their broadcast shape.
* lokr:    kron(w1, w2) (each whole or a @ b, w2 Tucker-rebuilt to [o, i, *kernel]); a 2-D w1 is
           padded to w2's dimensions with trailing 1s, then ``torch.kron``'s rule: the shorter
           shape is padded with leading 1s and the sizes multiply.
* full:    ``diff``'s shape.
* norm / set / glora: the shape of ``w_norm`` / ``value`` / (``b1`` rows, ``b2`` columns); oft /
           boft: the output rows their rotation blocks cover (:data:`KNOWN_SHAPE`).

A ``weight_shape`` hint set by a reader wins (LoHa / LoKr conv products are stored flattened).
"""

from __future__ import annotations

import math
from typing import Any


def _dims(t: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in t.shape)


def _half(t: dict, a: str, b: str, core: str | None) -> tuple[int, ...]:
    wa, wb = _dims(t[a]), _dims(t[b])
    if core is not None and core in t:
        return (wa[0], math.prod(wb[1:]), *_dims(t[core])[2:])
    return (wa[0], math.prod(wb[1:]))


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise ValueError(f"LoHa halves of shapes {a} and {b} do not broadcast")
        out.append(max(x, y))
    return tuple(out)


def kron_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """``torch.kron(x, y).shape`` for shapes ``a`` and ``b``."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(x * y for x, y in zip(a, b))


def lokr_factor_shapes(module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the two Kronecker factors of a LoKr module as :mod:`loratool.delta` builds them."""
    t = module.tensors
    w1 = _dims(t["w1"]) if "w1" in t else _half(t, "w1a", "w1b", None)
    w2 = _dims(t["w2"]) if "w2" in t else _half(t, "w2a", "w2b", "t2")
    if len(w2) > 2 and len(w1) == 2:
        w1 = w1 + (1,) * (len(w2) - 2)
    return w1, w2


def product_shape(module) -> tuple[int, ...]:
    """Shape of the LoHa / LoKr product before any reshape to the base weight."""
    t = module.tensors
    if module.kind == "loha":
        return _broadcast(_half(t, "w1a", "w1b", "t1"), _half(t, "w2a", "w2b", "t2"))
    if module.kind == "lokr":
        return kron_shape(*lokr_factor_shapes(module))
    raise ValueError(f"not a LyCORIS product kind: {module.kind}")


def _oft_blocks(t: dict) -> Any:
    return t["blocks"] if "blocks" in t else t["rotation"]


# Kinds whose base-weight shape their tensors tell (oft / boft: the output rows only).
KNOWN_SHAPE = {
    "norm": lambda t: _dims(t["w_norm"]),
    "set": lambda t: _dims(t["value"]),
    "glora": lambda t: (_dims(t["b1"])[0], *_dims(t["b2"])[1:]),
    "oft": lambda t: (_dims(_oft_blocks(t))[0] * _dims(_oft_blocks(t))[1],),
    "boft": lambda t: (_dims(t["blocks"])[1] * _dims(t["blocks"])[2],),
}


def weight_shape(module) -> tuple[int, ...]:
    """The shape of the base weight the module adapts, as far as the factors tell."""
    t = module.tensors
    hint = module.hints.get("weight_shape")
    if hint is not None:
        return tuple(int(x) for x in hint)
    if module.kind == "full":
        return _dims(t["diff"])
    if module.kind in KNOWN_SHAPE:
        return KNOWN_SHAPE[module.kind](t)
    if module.kind == "lora":
        down, up = _dims(t["down"]), _dims(t["up"])
        if module.layer == "embedding":
            return (down[1], up[0])
        if module.layer == "conv":
            kernel = _dims(t["mid"])[2:] if "mid" in t else down[2:]
            return (up[0], down[1], *kernel)
        shape = (up[0], down[1])
        return shape[::-1] if module.fan_in_fan_out else shape
    return product_shape(module)


# (up key suffix, down key suffix) of plain LoRA pairs: kohya / LyCORIS, PEFT / diffusers
LORA_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"))


def module_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """{key head: (rows, in-features)} of the plain LoRA pairs among stored ``shapes`` (up [out, r],
    down [r, in, …]): what :func:`loratool.arch.detect` needs to tell look-alike families apart by name."""
    out: dict[str, tuple[int, int]] = {}
    for key, up in shapes.items():
        for up_suffix, down_suffix in LORA_PAIRS:
            if key.endswith(up_suffix):
                head = key[: -len(up_suffix)]
                down = shapes.get(head + down_suffix)
                if down is not None and len(up) >= 2 and len(down) >= 2:
                    out[head] = (int(up[0]), int(down[1]))
    return out
