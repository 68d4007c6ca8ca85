"""Validated, lazy reading of safetensors files.

The header is parsed and checked against everything the format promises before any byte of
tensor data is trusted: the header length fits the file and a 100 MB cap, the header is a
UTF-8 JSON object, every dtype is known, each tensor's byte span equals shape × itemsize, spans
lie inside the data area and do not overlap. Tensor bytes are read only on demand, one tensor
at a time.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.errors import InputError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offset inside the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


@dataclass(frozen=True)
class Header:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_offset: int  # absolute file offset of the data area
    file_size: int


def parse_header(raw: bytes, file_size: int, path: Path) -> Header:
    """Validate a header (the bytes after the 8-byte length) for a file of ``file_size``."""
    where = f"{path}: not a valid safetensors file:"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where} header is not UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where} header is not a JSON object")
    data_offset = 8 + len(raw)
    data_size = file_size - data_offset
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise InputError(f"{where} __metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        if not isinstance(entry, dict):
            raise InputError(f"{where} entry {name!r} is not an object")
        dtype_name = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype_name not in DTYPES:
            raise InputError(f"{where} tensor {name!r} has unknown dtype {dtype_name!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise InputError(f"{where} tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InputError(f"{where} tensor {name!r} has invalid data_offsets {offsets!r}")
        start, end = offsets
        dtype = DTYPES[dtype_name]
        numel = 1
        for s in shape:
            numel *= s
        if start < 0 or end < start or end > data_size:
            raise InputError(
                f"{where} tensor {name!r} spans bytes {start}..{end}, outside the data area "
                f"of {data_size} bytes (truncated file?)"
            )
        if end - start != numel * itemsize(dtype):
            raise InputError(
                f"{where} tensor {name!r} claims shape {shape} {dtype_name} "
                f"({numel * itemsize(dtype)} bytes) but spans {end - start} bytes"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), start, end)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise InputError(f"{where} tensors {n0!r} and {n1!r} overlap (bytes {s1}..{e0})")
    return Header(path, metadata, tensors, data_offset, file_size)


def read_header(path: str | os.PathLike) -> Header:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a valid safetensors file: only {size} bytes")
            (n,) = struct.unpack("<Q", head)
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
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a .safetensors file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
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
        with open(self.path, "rb") as fh:
            fh.seek(self.header.data_offset + info.start)
            data = fh.read(info.nbytes)
        if len(data) != info.nbytes:
            raise InputError(f"{self.path}: tensor {name!r} is cut short (file changed while reading?)")
        return data

    def get(self, name: str) -> torch.Tensor:
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
