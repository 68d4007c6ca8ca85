"""Validated, lazy reading of safetensors files.

The header is parsed and checked against everything the format promises before any byte of
tensor data is trusted: the header length fits the file and a 100 MB cap, the header is a
UTF-8 JSON object, every dtype is known, each tensor's byte span equals shape × itemsize, spans
lie inside the data area and do not overlap. Tensor bytes are read only on demand, one tensor
at a time.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from loratool.errors import InputError
from loratool.io.read_errors import os_errors_as_input

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024

# The format's dtype codes and their item sizes. Headers are parsed without torch (``merge``
# starts copying a base while torch is still being imported); torch dtypes are looked up on demand.
ITEMSIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """Dtype code -> torch dtype, for the codes this torch build has."""
    import torch

    return {code: getattr(torch, name) for code, name in _TORCH_NAMES.items() if hasattr(torch, name)}


@functools.cache
def dtype_codes() -> dict[torch.dtype, str]:
    return {v: k for k, v in torch_dtypes().items()}


def itemsize(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype code (``"F16"``) or a torch dtype."""
    return ITEMSIZES[dtype if isinstance(dtype, str) else dtype_codes()[dtype]]


class TensorInfo(NamedTuple):  # a tuple: built for every tensor of every header read, 4× cheaper than a dataclass
    name: str
    dtype_name: str  # the format's code: F16, BF16, F32...
    shape: tuple[int, ...]
    start: int  # offset inside the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtypes()[self.dtype_name]


@dataclass(frozen=True)
class Header:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_offset: int  # absolute file offset of the data area
    file_size: int


# TensorInfo(...) without the Python-level __new__ a NamedTuple has (the loop below makes one per tensor).
_new_info = functools.partial(tuple.__new__, TensorInfo)
# A dimension product above this cannot be a tensor torch can describe (strides are int64).
_MAX_ELEMENTS = 2**62
# More dimensions than any weight has; bounds the work a hostile shape list can cause.
_MAX_DIMS = 32


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """JSON object hook: a repeated key is ambiguous (readers disagree on which wins)."""
    out = dict(pairs)  # C speed; the hook runs for every tensor entry of the header
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _label(name: str) -> str:
    return name if len(name) <= 200 else name[:200] + "..."


def _checked_entry(where: str, name: str, entry: object, data_size: int) -> TensorInfo:
    """One header entry with every check (and the precise message when one fails)."""
    if type(entry) is not dict:
        raise InputError(f"{where} entry {_label(name)!r} is not an object")
    dtype_name = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if type(dtype_name) is not str or dtype_name not in ITEMSIZES:
        raise InputError(f"{where} tensor {_label(name)!r} has unknown dtype {str(dtype_name)[:40]!r}")
    # type() is int, not isinstance: JSON true / false must not pass as 1 / 0
    if type(shape) is not list or len(shape) > _MAX_DIMS or not all(type(x) is int and x >= 0 for x in shape):
        raise InputError(f"{where} tensor {_label(name)!r} has an invalid shape {str(shape)[:100]}")
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int \
            or type(offsets[1]) is not int:
        raise InputError(f"{where} tensor {_label(name)!r} has invalid data_offsets {str(offsets)[:100]}")
    start, end = offsets
    numel = 1
    strides = 1  # what torch needs to describe the shape, zero-sized dims counted as 1
    for x in shape:
        numel *= x
        strides *= x or 1
    if strides > _MAX_ELEMENTS:
        raise InputError(f"{where} tensor {_label(name)!r} has an impossible shape {str(shape)[:100]}")
    if start < 0 or end < start or end > data_size:
        raise InputError(
            f"{where} tensor {_label(name)!r} spans bytes {start}..{end}, outside the data area "
            f"of {data_size} bytes (truncated file?)"
        )
    if end - start != numel * ITEMSIZES[dtype_name]:
        raise InputError(
            f"{where} tensor {_label(name)!r} claims shape {shape} {dtype_name} "
            f"({numel * ITEMSIZES[dtype_name]} bytes) but spans {end - start} bytes"
        )
    return TensorInfo(name, dtype_name, tuple(shape), start, end)


def parse_header(raw: bytes, file_size: int, path: Path) -> Header:
    """Validate a header (the bytes after the 8-byte length) for a file of ``file_size``.

    Checks, in the order a reader would trust them: UTF-8 JSON object without repeated keys;
    ``__metadata__`` maps strings to strings; every tensor has a known dtype, a shape of at most
    32 non-negative ints whose product fits int64, and ``data_offsets`` [start, end] with
    end - start = prod(shape) · itemsize; the spans lie inside the data area, do not overlap,
    and cover it exactly with no gap and no trailing bytes (as the reference implementation
    demands, so nothing can hide between or after tensors).
    """
    # A header is thousands of small dicts and lists and not one reference cycle: the collector's passes
    # over them (and over everything else alive, when they reach the oldest generation) are a fifth of a
    # large header's parse and more of a folder scan's, for nothing to free.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse_header(raw, file_size, path)
    finally:
        if enabled:
            gc.enable()


def _parse_header(raw: bytes, file_size: int, path: Path) -> Header:
    where = f"{path}: not a valid safetensors file:"
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise InputError(f"{where} header repeats the key {exc.key[:200]!r}") from None
    except UnicodeDecodeError:
        raise InputError(f"{where} header is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} header is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # int literals past the digit limit, deep nesting
        raise InputError(f"{where} header is not usable JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where} header is not a JSON object")
    data_offset = 8 + len(raw)
    data_size = file_size - data_offset
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise InputError(f"{where} __metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        try:  # the common case in a few operations; anything unusual gets every check below
            dtype_name = entry["dtype"]
            shape = entry["shape"]
            start, end = entry["data_offsets"]
            size = ITEMSIZES[dtype_name]
            # type() is int, not isinstance: JSON true / false must not pass as 1 / 0
            if type(shape) is list and len(shape) <= _MAX_DIMS and type(start) is int and type(end) is int \
                    and all(type(x) is int and x > 0 for x in shape):
                numel = math.prod(shape)
                if numel <= _MAX_ELEMENTS and 0 <= start and start + numel * size == end <= data_size:
                    tensors[name] = _new_info((name, dtype_name, tuple(shape), start, end))
                    continue
        except (TypeError, KeyError, ValueError):
            pass
        tensors[name] = _checked_entry(where, name, entry, data_size)
    covered = 0
    last = None
    for start, end, tname in sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start):
        if start < covered:
            raise InputError(f"{where} tensors {last!r} and {tname!r} overlap (bytes {start}..{covered})")
        if start > covered:
            raise InputError(f"{where} {start - covered} unclaimed bytes before tensor {tname!r} (at {covered})")
        covered, last = end, tname
    if covered != data_size:
        raise InputError(
            f"{where} {data_size - covered} bytes after the last tensor belong to no tensor "
            "(trailing data, or a corrupt header)"
        )
    return Header(path, metadata, tensors, data_offset, file_size)


# What a file is when it is not safetensors, by its first bytes (what people rename by mistake).
_SIGNATURES = (
    (b"PK\x03\x04", "a zip archive: a PyTorch .pt / .ckpt / .bin saved by torch.save"),
    (b"\x80", "a Python pickle: a PyTorch .pt / .ckpt / .bin"),
    (b"GGUF", "a GGUF file"),
    (b"\x89HDF", "an HDF5 file"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"<", "an HTML / XML page (a download that failed?)"),
    (b"version https://git-lfs", "a Git LFS pointer (run `git lfs pull`)"),
)


def not_safetensors(head: bytes) -> str | None:
    """Why a file whose first bytes are ``head`` cannot be safetensors, or None when it could be.

    A safetensors file is an 8-byte little-endian header length, then a JSON object: byte 8 is
    ``{`` (the format's specification requires it).
    """
    if len(head) > 8 and head[8:9] == b"{":
        return None
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    text = head.decode("utf-8", "ignore")
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it holds text: {' '.join(text.split())[:24]!r}"
    return "its first bytes are no safetensors header"


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of ``path``; never reads tensor data."""
    path = Path(path)
    with os_errors_as_input(path, "a .safetensors file"):
        if path.is_dir():
            raise InputError(f"{path}: is a folder, expected a .safetensors file")
        if path.exists() and not path.is_file():
            raise InputError(f"{path}: not a regular file")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a valid safetensors file: only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                why = not_safetensors(head + fh.read(24))
                if why is not None:
                    raise InputError(f"{path}: not a safetensors file ({why})")
            if n > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path}: not a valid safetensors file: header length {n} exceeds the "
                    f"{MAX_HEADER_BYTES // (1024 * 1024)} MB cap"
                )
            if 8 + n > size:
                raise InputError(
                    f"{path}: not a valid safetensors file: header length {n} is beyond the "
                    f"end of the file ({size} bytes; truncated?)"
                )
            raw = fh.read(n)
            if len(raw) != n:
                raise InputError(f"{path}: file shrank while its header was read")
    return parse_header(raw, size, path)


class SafetensorsFile:
    """A safetensors file opened lazily: header now, tensor bytes on ``get``."""

    def __init__(self, path: str | os.PathLike):
        self.header = read_header(path)
        self.path = self.header.path

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.header.tensors

    def info(self, name: str) -> TensorInfo:
        return self.header.tensors[name]

    def raw_bytes(self, name: str) -> bytes:
        info = self.header.tensors[name]
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.header.data_offset + info.start)
                data = fh.read(info.nbytes)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read tensor {name!r} ({exc.strerror or exc})") from None
        if len(data) != info.nbytes:
            raise InputError(f"{self.path}: tensor {name!r} is cut short (file changed while reading?)")
        return data

    def raw_bytes_many(self, names: list[str]) -> dict[str, bytes]:
        """The bytes of several (small) tensors, through one open file."""
        out: dict[str, bytes] = {}
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        try:
            for name in names:
                info = self.header.tensors[name]
                data = os.pread(fd, info.nbytes, self.header.data_offset + info.start)
                if len(data) != info.nbytes:
                    raise InputError(f"{self.path}: tensor {name!r} is cut short (file changed while reading?)")
                out[name] = data
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        finally:
            os.close(fd)
        return out

    def get(self, name: str) -> torch.Tensor:
        import torch

        info = self.header.tensors[name]
        data = self.raw_bytes(name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        tensor = torch.frombuffer(bytearray(data), dtype=info.dtype)
        return tensor.reshape(info.shape)

    def load_all(self) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.header.tensors}


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a (small) validated safetensors file."""
    f = SafetensorsFile(path)
    return f.load_all(), dict(f.metadata)
