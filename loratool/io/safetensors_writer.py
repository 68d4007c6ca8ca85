"""Writing safetensors files one tensor at a time.

The ``safetensors`` Python API serialises a whole dict held in memory; a merged 20 GB base
would need 20 GB of RAM. Here the header is written first (every tensor's dtype and shape are
known up front), then each tensor's bytes in data order: either new bytes from a tensor, or a
byte range copied from a source file without decoding (``os.copy_file_range`` when the kernel
offers it, so untouched tensors never pass through user memory).

File layout (the format's own definition): 8-byte little-endian header length N, N bytes of
UTF-8 JSON padded with spaces to a multiple of 8, then the data area where each tensor occupies
``data_offsets = [start, end)`` relative to the data area, little-endian, C order.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.errors import OutputError
from loratool.io.safetensors_file import DTYPE_NAMES, itemsize, parse_header

_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for s in self.shape:
            n *= int(s)
        return n


def layout(specs: Sequence[TensorSpec]) -> dict[str, tuple[int, int]]:
    """Contiguous ``data_offsets`` for ``specs`` in the given order."""
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for spec in specs:
        if spec.name in offsets:
            raise ValueError(f"tensor {spec.name!r} listed twice")
        offsets[spec.name] = (pos, pos + spec.nbytes)
        pos += spec.nbytes
    return offsets


def encode_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus the space-padded JSON header for a contiguous layout of ``specs``."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for spec, (start, end) in zip(specs, layout(specs).values()):
        obj[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [start, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def header_matches(prefix: bytes, specs: Sequence[TensorSpec]) -> bool:
    """Whether a stored header prefix (length + JSON) describes exactly the contiguous layout of ``specs``."""
    if len(prefix) < 8:
        return False
    (n,) = struct.unpack("<Q", prefix[:8])
    if len(prefix) != 8 + n:
        return False
    total = sum(s.nbytes for s in specs)
    try:
        header = parse_header(prefix[8:], 8 + n + total, Path("<header>"))
    except Exception:
        return False
    want = layout(specs)
    if set(header.tensors) != set(want):
        return False
    for spec in specs:
        info = header.tensors[spec.name]
        if info.dtype != spec.dtype or info.shape != tuple(spec.shape) or (info.start, info.end) != want[spec.name]:
            return False
    return True


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian C-order bytes of a CPU tensor, without a copy when it is contiguous."""
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order given by ``specs``.

    ``header`` may be the stored prefix (8-byte length + JSON) of a source file with the same
    layout: it is then written verbatim, so metadata, key order and padding survive exactly.
    Use as a context manager; leaving it without having written every tensor is an error.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[TensorSpec],
        metadata: dict[str, str] | None = None,
        *,
        header: bytes | None = None,
    ):
        self.path = Path(path)
        self.specs = list(specs)
        self._offsets = layout(self.specs)
        self._next = 0
        prefix = header if header is not None and header_matches(header, self.specs) else None
        self.reused_header = prefix is not None
        self._prefix = prefix if prefix is not None else encode_header(self.specs, metadata)
        self._fd: int | None = None
        self._pending: tuple[int, int, int] | None = None  # (src fd, src offset, length) not yet copied
        self._sources: dict[Path, int] = {}

    def __enter__(self) -> StreamingWriter:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_all(self._fd, memoryview(self._prefix))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._flush_copy()
                if self._next != len(self.specs):
                    missing = self.specs[self._next].name
                    raise OutputError(f"{self.path}: tensor {missing!r} was never written")
        finally:
            for fd in self._sources.values():
                os.close(fd)
            self._sources.clear()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _expect(self, name: str, nbytes: int) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: tensor {name!r} is not in the header")
        spec = self.specs[self._next]
        if spec.name != name:
            raise ValueError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        if nbytes != spec.nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} needs {spec.nbytes} bytes, got {nbytes}")
        self._next += 1

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is not None and spec.name == name and (tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape):
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the header says {spec.dtype} {spec.shape}"
            )
        self.write_bytes(name, tensor_bytes(tensor))

    def write_bytes(self, name: str, data) -> None:
        view = memoryview(data).cast("B")
        self._expect(name, len(view))
        self._flush_copy()
        _write_all(self._fd, view)

    def copy_tensor(self, name: str, src: str | os.PathLike, offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` at absolute ``offset`` of file ``src`` as the bytes of tensor ``name``."""
        self._expect(name, nbytes)
        src = Path(src)
        fd = self._sources.get(src)
        if fd is None:
            fd = self._sources[src] = os.open(src, os.O_RDONLY)
        if self._pending is not None:
            pfd, poff, plen = self._pending
            if pfd == fd and poff + plen == offset:
                self._pending = (pfd, poff, plen + nbytes)  # adjacent in the source: one bigger copy
                return
            self._flush_copy()
        self._pending = (fd, offset, nbytes)

    def _flush_copy(self) -> None:
        if self._pending is None:
            return
        fd, offset, length = self._pending
        self._pending = None
        copy_range(fd, offset, length, self._fd, self.path)


def copy_range(src_fd: int, offset: int, length: int, dst_fd: int, where: Path) -> None:
    """Append ``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` (kernel copy when possible)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src_fd, dst_fd, min(length - done, 1 << 30), offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # e.g. across filesystems on old kernels: fall back to reading
    while done < length:
        chunk = os.pread(src_fd, min(_CHUNK, length - done), offset + done)
        if not chunk:
            raise OutputError(f"{where}: source file ended early while copying (changed while reading?)")
        _write_all(dst_fd, memoryview(chunk))
        done += len(chunk)
