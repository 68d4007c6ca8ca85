"""Storage kinds of base weights: a codec per kind turns a stored weight into float32 and back.

A plain float weight (F16 / BF16 / F32) is read and cast as it is. Any other weight is an
:class:`Entry` of its file's :class:`Layout`: the stored tensor, the tensors stored with it
(scales, block maxima, quantization maps: its ``aux``), the weight's logical shape, and the
:class:`Codec` that reads it::

    codec.decode(Stored(tensor, aux))          -> float32 weight W   (logical shape)
    codec.encode(W', like=Stored, rounding)    -> Stored(tensor', aux') (same dtypes, shapes, bytes)

Merging asks the codec (:mod:`loratool.ops.merge_tensors`): W = decode(stored), W' = W + Σλ·ΔW in
float32, then ``encode`` rounds W' once to the stored kind. Markers (ComfyUI's ``scaled_fp8``,
``.comfy_quant``, ``.scale_input``, bitsandbytes' ``weight_format``) are kept as they are.

Kinds (one module each): ``fp8`` (float8 e4m3fn / e5m2, plain or with a scale: ComfyUI
``scaled_fp8``, ComfyUI ``comfy_quant``, kohya / musubi-tuner ``scale_weight``), ``bnb``
(bitsandbytes NF4 / FP4 and LLM.int8 as transformers serialises them) and ``gguf_quants`` (every
ggml type of a GGUF file). Layouts are detected from headers (plus the few bytes of small
JSON marker tensors) without importing torch; decoding and encoding import it.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loratool.errors import FormatError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Rounding:
    """How ``encode`` rounds to a low-precision float: ``nearest`` (ties to even, torch's cast) or
    ``stochastic`` (up with probability equal to the distance from the lower neighbour, seeded per key)."""

    mode: str = "nearest"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("nearest", "stochastic"):
            raise ValueError(f"rounding {self.mode!r}: choose nearest or stochastic")


@dataclass(frozen=True)
class QuantPolicy:
    """How a merge writes quantized weights: in their own kind, rounded as ``rounding`` says, or
    (``dequantize``: a safetensors dtype code) dequantized to that dtype, their aux tensors dropped."""

    rounding: Rounding = Rounding()
    dequantize: str | None = None


@dataclass
class Stored:
    """A weight as stored: its tensor and the auxiliary tensors by role."""

    tensor: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


class Codec:
    """Reads and writes one storage kind. Subclasses set ``label`` and implement decode / encode."""

    label = "?"
    # False for kinds only read (decode), never written back in kind (``encode`` raises).
    writable = True

    def read(self, file, entry: Entry) -> Stored:
        from loratool.io.checkpoint import Checkpoint

        aux = {role: Checkpoint.read_tensor(entry.where.get(key, file), key) for role, key in entry.aux.items()}
        return Stored(Checkpoint.read_tensor(file, entry.key), aux)

    def decode(self, stored: Stored, entry: Entry) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, value: torch.Tensor, like: Stored, entry: Entry, rounding: Rounding) -> Stored:
        raise NotImplementedError

    def cannot_encode(self) -> str | None:
        """Why this kind cannot be written back (None when it can)."""
        return None if self.writable else f"{self.label} cannot be written"


@dataclass(frozen=True)
class Entry:
    """One quantized / low-precision weight of a file."""

    key: str
    codec: Codec
    shape: tuple[int, ...] | None  # the weight as the model uses it; None when the kind hides it
    aux: dict[str, str] = field(default_factory=dict)  # role -> stored key
    scheme: str = ""  # who writes this layout, for ``info`` ("ComfyUI scaled_fp8", "bitsandbytes"...)
    where: dict[str, Any] = field(default_factory=dict)  # aux key -> the shard holding it, when not this file

    @property
    def label(self) -> str:
        return f"{self.scheme}: {self.codec.label}" if self.scheme else self.codec.label

    def keys(self) -> list[str]:
        """Every stored key this weight owns (the weight first)."""
        return [self.key, *self.aux.values()]


@dataclass
class Layout:
    """The quantized weights of one file, and the stored keys that are not parameters."""

    entries: dict[str, Entry] = field(default_factory=dict)
    markers: set[str] = field(default_factory=set)  # kept as they are, never parameters
    owner: dict[str, str] = field(default_factory=dict)  # aux key -> its weight key

    def add(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        for key in entry.aux.values():
            self.owner[key] = entry.key

    def hidden(self, key: str) -> bool:
        """Whether ``key`` is an auxiliary or marker tensor (not a model parameter)."""
        return key in self.owner or key in self.markers

    def claimed(self) -> set[str]:
        return set(self.entries) | set(self.owner) | self.markers

    def groups(self) -> dict[str, int]:
        """Quantization label -> number of weights stored that way (``info``)."""
        return dict(Counter(e.label for e in self.entries.values()).most_common())

    def __bool__(self) -> bool:
        return bool(self.entries)


def _detectors():
    from loratool.io.codecs import bnb, fp8

    # order matters: each claims its keys; the last takes any fp8 tensor nothing else claimed
    return (bnb.detect_4bit, bnb.detect_int8, fp8.detect_comfy_quant, fp8.detect_scaled, fp8.detect_plain)


_LAYOUTS: weakref.WeakKeyDictionary[Any, Layout] = weakref.WeakKeyDictionary()
_SIBLINGS: weakref.WeakKeyDictionary[Any, tuple] = weakref.WeakKeyDictionary()


def link_shards(files) -> None:
    """Declare ``files`` the shards of one model: a weight's aux tensors may lie in another shard
    (sharding splits a state dict by size, not by weight), so each file's layout looks at all."""
    files = list(files)
    if len(files) > 1:
        for f in files:
            _SIBLINGS[f] = tuple(g for g in files if g is not f)
            _LAYOUTS.pop(f, None)


class _Header:
    def __init__(self, tensors: dict):
        self.tensors = tensors


class _Shards:
    """Several shards seen as one file by the detectors (headers, infos, small reads)."""

    def __init__(self, files):
        self.files = files
        self.owner: dict[str, Any] = {}
        for f in reversed(files):
            self.owner.update(dict.fromkeys(f.header.tensors, f))
        self.header = _Header({k: f.header.tensors[k] for k, f in self.owner.items()})
        self.metadata = {k: v for f in reversed(files) for k, v in f.metadata.items()}

    def info(self, key: str):
        return self.header.tensors[key]

    def raw_bytes(self, key: str) -> bytes:
        return self.owner[key].raw_bytes(key)


def _detect(scope) -> Layout:
    layout = Layout()
    for detect in _detectors():
        detect(scope, layout)
    return layout


def _local(file, union: Layout, owner: dict) -> Layout:
    """The part of a multi-shard layout that concerns ``file``: its weights (their aux keys in other
    shards located by ``Entry.where``) and, as markers, its tensors that belong to other shards' weights."""
    from dataclasses import replace

    local = set(file.header.tensors)
    layout = Layout()
    layout.markers = {k for k in union.markers if k in local}
    for key, entry in union.entries.items():
        if key in local:
            where = {k: owner[k] for k in entry.aux.values() if k not in local}
            layout.add(replace(entry, where=where) if where else entry)
        else:
            layout.markers.update(k for k in entry.aux.values() if k in local)
    return layout


def layout_of(file) -> Layout:
    """The :class:`Layout` of an opened safetensors or GGUF file (computed once per file object)."""
    cached = _LAYOUTS.get(file)
    if cached is not None:
        return cached
    from loratool.io.gguf_file import GGUFFile

    if isinstance(file, GGUFFile):
        from loratool.io.codecs.gguf_quants import detect

        layout = detect(file)
    elif file in _SIBLINGS:
        scope = _Shards([file, *_SIBLINGS[file]])
        layout = _local(file, _detect(scope), scope.owner)
    else:
        layout = _detect(file)
    _LAYOUTS[file] = layout
    return layout


def entry_of(file, key: str) -> Entry | None:
    return layout_of(file).entries.get(key)


def logical_shape(file, key: str) -> tuple[int, ...] | None:
    """The shape of weight ``key`` as the model uses it (None when its kind cannot say)."""
    entry = entry_of(file, key)
    return tuple(file.info(key).shape) if entry is None else entry.shape


def read_weight(file, key: str) -> torch.Tensor:
    """Weight ``key`` decoded to float32 when it is quantized, else the stored tensor as it is."""
    entry = entry_of(file, key)
    if entry is None:
        from loratool.io.checkpoint import Checkpoint

        return Checkpoint.read_tensor(file, key)
    return entry.codec.decode(entry.codec.read(file, entry), entry)


def unsupported(entries, path) -> None:
    """Raise a :class:`FormatError` naming the entries whose kind cannot be written back."""
    bad: dict[str, list[str]] = {}
    for entry in entries:
        why = entry.codec.cannot_encode()
        if why:
            bad.setdefault(why, []).append(entry.key)
    if bad:
        why, keys = next(iter(bad.items()))
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
        raise FormatError(f"{path}: {', '.join(keys[:3])}{more}: {why}")
