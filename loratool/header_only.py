"""Reading adapters from their headers without importing torch (``info`` without ``--stats``,
early errors, ``--help``): torch costs a second or more and ~250 MB just to import.

Three pieces let the layout readers run unchanged on headers alone:

1. ``from loratool.header_only import torch`` gives a stand-in for the torch module that imports
   torch on first attribute access. Modules on the header path (the schema in
   :mod:`loratool.adapter`, :mod:`loratool.formats`, :mod:`loratool.arch`, :mod:`loratool.io`,
   :mod:`loratool.validate`, :mod:`loratool.api`, :mod:`loratool.ops.inspect`) import torch this
   way and never with a top-level ``import torch`` (nor ``safetensors.torch``); their code uses
   ``torch.cat(...)``, ``torch.float32`` as before, and the first such use imports torch. Keep
   torch out of what runs at import time (default arguments such as ``dtype=torch.float32``,
   class bodies, module constants).
2. :class:`ShapeTensor` is what a header-only source holds instead of tensors: shape, stored
   dtype, and the value of tensors with at most one element (kohya ``alpha`` scalars are data).
   It has the structural part of the tensor API readers use: ``shape``, ``dtype``, ``dim()``,
   ``ndim``, ``numel()``, ``size()``, ``T``, ``reshape`` / ``view``, basic slicing (reading and
   assigning), ``new_zeros()``, ``clone()``, ``contiguous()``, ``float()`` and ``item()`` on
   scalars, ``is_floating_point()`` (so build tensors in a reader with ``x.new_zeros(shape)``,
   not ``torch.zeros(shape, dtype=x.dtype)``). Anything that
   needs values or torch (arithmetic, comparisons, ``torch.cat``) raises :class:`NeedsTorch`.
3. :func:`read_header_only` runs a reader on such a source with torch *forbidden* on the calling
   thread (every attribute of the stand-in module raises :class:`NeedsTorch`); when the reader
   needs torch after all, it runs again on the real tensors: still correct, only slower, and the
   report says ``header_only: false``.

For whoever adds a layout or trainer dialect (``formats/``) or a family (``arch/``): decide from
names, shapes, dtypes and metadata, put the source's tensors into modules as they are, and keep
value-dependent work (splitting fused rows, checking that factors are block-diagonal, casts) where
it must be; such a file still works, through the fallback. ``tests/test_torch_free.py`` runs
``loratool info`` on every layout fixture in a fresh process and asserts torch was never
imported: add a fixture of your layout there. Use :func:`is_tensor` rather than
``isinstance(x, torch.Tensor)`` in checks that run on headers.
"""

from __future__ import annotations

import math
import struct
import sys
import threading
from typing import Any

_state = threading.local()


class NeedsTorch(Exception):  # noqa: N818 - a signal, not an error the user sees
    """Header-only reading met something that needs torch or tensor values."""


class _LazyTorch:
    """The torch module, imported on first attribute access (refused while torch is forbidden)."""

    def __getattr__(self, name: str) -> Any:
        if getattr(_state, "forbidden", 0):
            raise NeedsTorch(f"torch.{name}")
        import torch as real

        return getattr(real, name)

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


torch: Any = _LazyTorch()


class forbid_torch:
    """Inside, any attribute of the torch stand-in raises :class:`NeedsTorch` (this thread only)."""

    def __enter__(self) -> forbid_torch:
        _state.forbidden = getattr(_state, "forbidden", 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        _state.forbidden -= 1


def is_tensor(x: object) -> bool:
    """A tensor or a :class:`ShapeTensor`, without importing torch to find out."""
    if isinstance(x, ShapeTensor):
        return True
    real = sys.modules.get("torch")
    return real is not None and isinstance(x, real.Tensor)


# ------------------------------------------------------------------------------ stored dtypes

# safetensors dtype code -> (torch name, floating point)
DTYPES: dict[str, tuple[str, bool]] = {
    "F64": ("float64", True), "F32": ("float32", True), "F16": ("float16", True), "BF16": ("bfloat16", True),
    "F8_E4M3": ("float8_e4m3fn", True), "F8_E5M2": ("float8_e5m2", True), "I64": ("int64", False),
    "I32": ("int32", False), "I16": ("int16", False), "I8": ("int8", False), "U8": ("uint8", False),
    "U16": ("uint16", False), "U32": ("uint32", False), "U64": ("uint64", False), "BOOL": ("bool", False),
}
_BY_NAME = {name: code for code, (name, _) in DTYPES.items()}


class StoredDtype:
    """A dtype as a header names it; ``str()`` gives torch's name without ``torch.``."""

    __slots__ = ("code",)

    def __init__(self, code: str):
        if code not in DTYPES:
            raise NeedsTorch(f"dtype {code}")
        self.code = code

    @classmethod
    def named(cls, name: str) -> StoredDtype:
        return cls(_BY_NAME[name.removeprefix("torch.")])

    @property
    def name(self) -> str:
        return DTYPES[self.code][0]

    @property
    def is_floating_point(self) -> bool:
        return DTYPES[self.code][1]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"StoredDtype({self.name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoredDtype) and other.code == self.code

    def __hash__(self) -> int:
        return hash(self.code)


# struct formats of the dtypes whose one-element values readers may need
_SCALAR = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B",
           "BOOL": "<?"}


def decode_scalar(code: str, data: bytes) -> float | int | bool:
    """The value of a one-element tensor from its stored bytes (little-endian)."""
    if code == "BF16":
        return struct.unpack("<f", b"\x00\x00" + data[:2])[0]
    fmt = _SCALAR.get(code)
    if fmt is None:
        raise NeedsTorch(f"value of a {code} scalar")
    return struct.unpack(fmt, data[: struct.calcsize(fmt)])[0]


# ------------------------------------------------------------------------------ the tensor stand-in


def _needs(what: str):
    def method(self, *args, **kwargs):
        raise NeedsTorch(f"{what} of a header-only tensor")

    return method


def _reshaped(shape: tuple[int, ...], numel: int, args: tuple) -> tuple[int, ...]:
    new = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)
    new = tuple(int(x) for x in new)
    if new.count(-1) > 1:
        raise NeedsTorch("reshape with two -1")
    if -1 in new:
        known = math.prod(x for x in new if x != -1)
        if known == 0 or numel % known:
            raise NeedsTorch("reshape that does not fit")
        new = tuple(numel // known if x == -1 else x for x in new)
    if math.prod(new) != numel:
        raise RuntimeError(f"shape {list(new)} is invalid for input of size {numel}")
    return new


def _index_shape(shape: tuple[int, ...], key: Any) -> tuple[int, ...]:
    keys = key if isinstance(key, tuple) else (key,)
    out: list[int] = []
    dim = 0
    for k in keys:
        if dim >= len(shape):
            raise NeedsTorch("indexing past the dimensions")
        if isinstance(k, slice):
            out.append(len(range(*k.indices(shape[dim]))))
        elif isinstance(k, int) and not isinstance(k, bool):
            if not -shape[dim] <= k < shape[dim]:
                raise IndexError(f"index {k} is out of bounds for dimension {dim} with size {shape[dim]}")
        else:
            raise NeedsTorch("advanced indexing")
        dim += 1
    return (*out, *shape[dim:])


class ShapeTensor:
    """A tensor known from a header: shape and dtype, and the value when it has one element."""

    __slots__ = ("shape", "dtype", "_value")
    __array_priority__ = 1000  # numpy defers to us, and then we refuse

    def __init__(self, shape: tuple[int, ...], dtype: StoredDtype, value: float | int | bool | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._value = value

    def __repr__(self) -> str:
        return f"ShapeTensor({list(self.shape)}, {self.dtype})"

    # structure
    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def device(self) -> str:
        return "header"

    def _like(self, shape: tuple[int, ...]) -> ShapeTensor:
        return ShapeTensor(shape, self.dtype, self._value if math.prod(shape) == self.numel() else None)

    @property
    def T(self) -> ShapeTensor:  # noqa: N802 - torch's name
        return self._like(self.shape[::-1])

    def t(self) -> ShapeTensor:
        if self.ndim > 2:
            raise RuntimeError("t() expects a tensor with <= 2 dimensions")
        return self.T

    def reshape(self, *shape) -> ShapeTensor:
        return self._like(_reshaped(self.shape, self.numel(), shape))

    view = reshape

    def flatten(self) -> ShapeTensor:
        return self._like((self.numel(),))

    def squeeze(self, dim: int | None = None) -> ShapeTensor:
        if dim is None:
            return self._like(tuple(s for s in self.shape if s != 1))
        if self.shape and self.shape[dim] == 1:
            return self._like(self.shape[:dim] + self.shape[dim + 1:] if dim != -1 else self.shape[:-1])
        return self

    def unsqueeze(self, dim: int) -> ShapeTensor:
        dim = dim if dim >= 0 else self.ndim + 1 + dim
        return self._like(self.shape[:dim] + (1,) + self.shape[dim:])

    def __getitem__(self, key: Any) -> ShapeTensor:
        return ShapeTensor(_index_shape(self.shape, key), self.dtype)

    def new_zeros(self, *shape, **kwargs) -> ShapeTensor:
        if kwargs.keys() - {"device"}:
            raise NeedsTorch("new_zeros with a dtype")
        new = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return ShapeTensor(tuple(int(x) for x in new), self.dtype, 0 if math.prod(new) == 1 else None)

    new_empty = new_zeros

    def __setitem__(self, key: Any, value: Any) -> None:
        """Writing into a stand-in changes no shape; the values are unknown either way."""
        _index_shape(self.shape, key)
        self._value = None

    def clone(self, *args, **kwargs) -> ShapeTensor:
        return self

    contiguous = detach = clone

    # values (one-element tensors only)
    def item(self) -> float | int | bool:
        if self._value is None:
            raise NeedsTorch("the value of a header-only tensor")
        return self._value

    def float(self) -> ShapeTensor:
        if self._value is None and self.numel() == 1:
            raise NeedsTorch("the value of a header-only tensor")
        return ShapeTensor(self.shape, StoredDtype("F32"), None if self._value is None else float(self._value))

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    # everything else needs torch
    __bool__ = _needs("truth value")
    __iter__ = _needs("iteration")
    __array__ = _needs("a numpy view")
    __eq__ = _needs("comparison")  # type: ignore[assignment]
    __ne__ = _needs("comparison")  # type: ignore[assignment]
    __lt__ = __le__ = __gt__ = __ge__ = _needs("comparison")
    __hash__ = object.__hash__
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _needs("arithmetic")
    __truediv__ = __rtruediv__ = __matmul__ = __rmatmul__ = __pow__ = __neg__ = __abs__ = _needs("arithmetic")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocol probes (copy, pickle, numpy) see a plain object
            raise AttributeError(name)
        raise NeedsTorch(f"Tensor.{name} of a header-only tensor")


def dtype_name(dtype: Any) -> str:
    """``float16`` for a torch dtype or a :class:`StoredDtype`."""
    return str(dtype).removeprefix("torch.")


def read_header_only(src, name: str, opts, path, view=None) -> tuple[Any, bool]:
    """(adapter, header_only): layout ``name``'s reader on ``src``'s header alone when it can,
    else on the real tensors (see the module docstring). ``view``: ``header_view(src)`` if made."""
    from loratool.api import read_source
    from loratool.errors import InputError
    from loratool.formats.source import header_view

    view = view or header_view(src)
    if view is not None:
        try:
            with forbid_torch():
                return read_source(view, name, opts, path), True
        except NeedsTorch:
            pass
        except InputError as exc:
            if exc.__cause__ is None:  # decided from names and shapes: the real read says the same
                raise
            # a reader tripped over a stand-in (a slip read_source reworded): let the real tensors decide
    return read_source(src, name, opts, path), False
