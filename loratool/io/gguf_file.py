"""Validated, lazy reading of GGUF files (llama.cpp, city96's ComfyUI-GGUF), header first.

The file layout (ggml's ``docs/gguf.md``; ``gguf-py``'s ``GGUFReader`` is the reference reader):
``b"GGUF"``, u32 version (2 or 3), u64 tensor count, u64 key/value count, the key/value pairs
(string key, u32 value type, value; arrays carry an element type and a u64 count), then one
entry per tensor (string name, u32 dimension count, u64 dims in ggml order — ``ne[0]`` is the
length of a row —, u32 ggml type, u64 offset into the data area), padding to
``general.alignment`` (default 32), and the data area. Strings are a u64 length plus UTF-8 bytes;
everything is little-endian.

Everything the header claims is checked before a byte of tensor data is trusted: counts and
lengths fit the file, at most 8 dimensions, every type is known to the installed
``gguf`` package and every row is a whole number of its blocks, spans lie inside the data area
and do not overlap. Tensor data is read only on demand.

:class:`GGUFFile` offers the interface of :class:`~loratool.io.safetensors_file.SafetensorsFile`
that a base checkpoint needs (``header.tensors``, ``header.data_offset``, ``keys()``, ``info()``),
so merging copies the file and writes the changed tensors over the copy as for safetensors.
Tensor names may be presented under other names (``names``: stored -> presented, e.g. llama.cpp's
``blk.0.attn_q.weight`` as ``model.layers.0.self_attn.q_proj.weight``); ``shape`` is the tensor as
the model uses it (numpy order, after ComfyUI-GGUF's ``comfy.gguf.orig_shape.<name>`` when the
converter reshaped it), ``stored_shape`` the numpy order of the stored dims.

Only the ``gguf`` package's constants are imported (it needs numpy, never torch).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from loratool.errors import InputError
from loratool.io.read_errors import os_errors_as_input
from loratool.io.safetensors_file import Header, SafetensorsFile, torch_dtypes

if TYPE_CHECKING:
    import torch

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 8
# Arrays longer than this are summarised ({"array": type, "count": n}) instead of kept (tokenizer vocabularies).
_KEEP_ARRAY = 64
# ggml types whose bytes are plain little-endian numbers with the safetensors code of the same name.
PLAIN_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."

# value type -> (struct format, size) for the scalar types
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9


class GGUFTensorInfo(NamedTuple):
    """A GGUF tensor, read as a safetensors :class:`TensorInfo` is (the same first fields, a tuple
    for the same reason): ``dtype_name`` is the ggml type name (``Q4_K``, ``F16``...), ``shape`` the
    logical numpy-order shape, ``[start, end)`` its bytes inside the data area."""

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    start: int
    end: int
    stored_name: str = ""
    ggml_type: int = 0
    stored_shape: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        if self.dtype_name not in PLAIN_TYPES:
            raise TypeError(f"{self.stored_name}: {self.dtype_name} is a block-quantized type, not a torch dtype")
        return torch_dtypes()[self.dtype_name]

    @property
    def plain(self) -> bool:
        return self.dtype_name in PLAIN_TYPES


@dataclass(frozen=True)
class GGUFHeader(Header):
    fields: dict[str, Any] = field(default_factory=dict)
    version: int = 3
    alignment: int = DEFAULT_ALIGNMENT


class _Cursor:
    """Bounded little-endian reads from a file object; every length is checked against the file size."""

    def __init__(self, fh, size: int, path: Path):
        self.fh, self.size, self.path, self.pos = fh, size, path, 0

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: not a valid GGUF file: {what}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"header runs past the end of the file (at byte {self.pos}, needs {n} more)")
        data = self.fh.read(n)
        if len(data) != n:
            raise self.fail("file shrank while its header was read")
        self.pos += n
        return data

    def unpack(self, fmt: str, n: int):
        return struct.unpack(fmt, self.take(n))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", 8)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(f"value of {key!r}")
        if vtype == _ARRAY and depth == 0:
            etype = self.unpack("<I", 4)
            count = self.unpack("<Q", 8)
            if etype in _SCALARS:
                fmt, size = _SCALARS[etype]
                if count * size > self.size - self.pos:
                    raise self.fail(f"array {key!r} of {count} items runs past the end of the file")
                if count > _KEEP_ARRAY:
                    self.take(count * size)
                    return {"array": etype, "count": count}
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(count * size)))
            if etype == _STRING:
                if count > self.size - self.pos:  # each item needs at least its 8-byte length
                    raise self.fail(f"array {key!r} of {count} strings runs past the end of the file")
                items = [self.string(f"item of {key!r}") for _ in range(count)]
                return items if count <= _KEEP_ARRAY else {"array": etype, "count": count}
            raise self.fail(f"array {key!r} has unsupported element type {etype}")
        raise self.fail(f"key {key!r} has unknown value type {vtype}")


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block), from the installed ``gguf`` package."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


def read_gguf_header(path: str | os.PathLike, names: dict[str, str] | None = None) -> GGUFHeader:
    """Read and validate the header of a GGUF file; never reads tensor data.

    ``names`` renames tensors (stored name -> presented name); unnamed tensors keep their names.
    """
    path = Path(path)
    with os_errors_as_input(path, "a .gguf file"):
        size = path.stat().st_size
        with open(path, "rb") as fh:
            cur = _Cursor(fh, size, path)
            if size < 4 or cur.take(4) != MAGIC:
                raise cur.fail("no GGUF magic (a big-endian or truncated file?)")
            version = cur.unpack("<I", 4)
            if version not in (2, 3):
                raise cur.fail(f"version {version} (loratool reads GGUF versions 2 and 3)")
            n_tensors = cur.unpack("<Q", 8)
            n_kv = cur.unpack("<Q", 8)
            # every key/value needs ≥ 13 bytes and every tensor entry ≥ 24: hostile counts fail here
            if n_kv * 13 + n_tensors * 24 > size:
                raise cur.fail(f"claims {n_tensors} tensors and {n_kv} keys, more than {size} bytes can hold")
            fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string("a key")
                if key in fields:
                    raise cur.fail(f"repeats the key {key[:200]!r}")
                fields[key] = cur.value(cur.unpack("<I", 4), key)
            raw_tensors = []
            for _ in range(n_tensors):
                name = cur.string("a tensor name")
                n_dims = cur.unpack("<I", 4)
                if n_dims > _MAX_DIMS:
                    raise cur.fail(f"tensor {name[:200]!r} has {n_dims} dimensions")
                ne = [cur.unpack("<Q", 8) for _ in range(n_dims)]
                raw_tensors.append((name, ne, cur.unpack("<I", 4), cur.unpack("<Q", 8)))
            header_end = cur.pos
    where = f"{path}: not a valid GGUF file:"
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise InputError(f"{where} general.alignment {alignment!r} is not a power of two")
    data_offset = -(-header_end // alignment) * alignment
    data_size = size - data_offset
    types = _ggml_types()
    names = names or {}
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, ne, gtype, offset in raw_tensors:
        label = name if len(name) <= 200 else name[:200] + "..."
        if gtype not in types:
            raise InputError(f"{where} tensor {label!r} has ggml type {gtype}, unknown to the installed gguf package")
        tname, block, type_size = types[gtype]
        if not ne or ne[0] % block:
            raise InputError(f"{where} tensor {label!r} rows of {ne[:1]} are not whole {tname} blocks of {block}")
        nbytes = ne[0] // block * type_size
        for d in ne[1:]:
            nbytes *= d
        if offset % alignment or offset + nbytes > data_size:
            raise InputError(f"{where} tensor {label!r} at offset {offset} ({nbytes} bytes) lies outside the "
                             f"data area of {data_size} bytes or off its {alignment}-byte alignment (truncated file?)")
        stored_shape = tuple(int(d) for d in reversed(ne))
        shape = stored_shape
        orig = fields.get(ORIG_SHAPE_PREFIX + name)
        if isinstance(orig, list) and orig and all(isinstance(d, int) and d >= 0 for d in orig):
            numel = 1
            for d in orig:
                numel *= d
            stored_numel = 1
            for d in stored_shape:
                stored_numel *= d
            if numel != stored_numel:
                raise InputError(f"{where} {ORIG_SHAPE_PREFIX}{label} {orig} does not hold the {stored_numel} "
                                 f"elements of the tensor")
            shape = tuple(orig)
        shown = names.get(name, name)
        if shown in tensors:
            raise InputError(f"{where} two tensors are named {shown[:200]!r}")
        tensors[shown] = GGUFTensorInfo(shown, tname, shape, offset, offset + nbytes, stored_name=name,
                                        ggml_type=gtype, stored_shape=stored_shape)
    last_end, last = 0, None
    for info in sorted(tensors.values(), key=lambda i: i.start):
        if info.start < last_end:
            raise InputError(f"{where} tensors {last!r} and {info.stored_name!r} overlap")
        last_end, last = info.end, info.stored_name
    return GGUFHeader(path, {}, tensors, data_offset, size, fields=fields, version=version, alignment=alignment)


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the GGUF magic (the suffix alone does not decide)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


class GGUFFile(SafetensorsFile):
    """A GGUF file opened lazily: header now, tensor bytes on demand (``keys``, ``info``, ``raw_bytes``
    as for a safetensors file; ``get`` only for plain float types).

    ``permutations`` (presented name -> head count) marks weights llama.cpp's converter stored with
    their rows permuted (:mod:`loratool.arch.gguf_names`); the GGUF codec undoes it on reading.
    """

    def __init__(self, path: str | os.PathLike, names: dict[str, str] | None = None,
                 permutations: dict[str, int] | None = None):
        self.header = read_gguf_header(path, names)
        self.path = self.header.path
        self.permutations = dict(permutations or {})

    @property
    def fields(self) -> dict[str, Any]:
        return self.header.fields

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def spans(self) -> list[tuple[int, int]]:
        """Absolute byte spans that tile the whole file: the header, each tensor, and the padding between."""
        out: list[tuple[int, int]] = []
        at = 0
        for info in sorted(self.header.tensors.values(), key=lambda i: i.start):
            a, b = self.header.data_offset + info.start, self.header.data_offset + info.end
            if a > at:
                out.append((at, a))
            out.append((a, b))
            at = b
        if at < self.header.file_size:
            out.append((at, self.header.file_size))
        return out
