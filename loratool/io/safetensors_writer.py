"""Writing safetensors files one tensor at a time.

The ``safetensors`` Python API serialises a whole dict held in memory; a merged 20 GB base
would need 20 GB of RAM. Here the header is written first (every tensor's dtype and shape are
known up front), then each tensor's bytes in data order: either new bytes from a tensor, or a
byte range copied from a source file without decoding (``os.copy_file_range`` when the kernel
offers it, so untouched tensors never pass through user memory).

Writing runs on one background thread, in submission order, so the caller computes the next
tensor while the previous bytes go to the kernel (file I/O releases the GIL). New bytes come
either as a whole tensor (:meth:`StreamingWriter.write_tensor`, at most one in flight) or as
segments of a tensor filled in buffers lent by the writer (:meth:`StreamingWriter.segment`,
a small fixed pool, so memory stays bounded whatever the tensor sizes).

File layout (the format's own definition): 8-byte little-endian header length N, N bytes of
UTF-8 JSON padded with spaces to a multiple of 8, then the data area where each tensor occupies
``data_offsets = [start, end)`` relative to the data area, little-endian, C order.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.errors import OutputError
from loratool.io.atomic import open_output
from loratool.io.safetensors_file import dtype_codes, itemsize, parse_header
from loratool.io.staging import Staged, kernel_send_available, write_all

_CHUNK = 16 * 1024 * 1024
# copy_file_range per call: big calls keep the per-call overhead negligible.
_COPY_CALL = 1 << 30
# Segment buffers lent to callers (bytes each, how many): enough to keep the writer busy while
# the caller fills the next one, small next to any model.
SEGMENT_BYTES = 8 * 1024 * 1024
_POOL = 3
# Whole tensors of at least this many bytes go out through segment buffers too (one memcpy into
# them, then the kernel's page-cache copy: :mod:`loratool.io.staging`); smaller ones are written
# from their own memory.
STAGE_MIN_BYTES = 64 * 1024


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
        obj[spec.name] = {"dtype": dtype_codes()[spec.dtype], "shape": list(spec.shape), "data_offsets": [start, end]}
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
    write_all(fd, data)


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The little-endian C-order bytes of a CPU tensor as a 1-D uint8 tensor (no copy when contiguous)."""
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian C-order bytes of a CPU tensor, without a copy when it is contiguous."""
    t = flat_bytes(tensor)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.numpy()).cast("B")


def staged_pieces(raw: torch.Tensor, take, put) -> None:
    """Copy ``raw`` (1-D uint8) into buffers from ``take(nbytes)``, handing each to ``put(buf, nbytes)``."""
    n = raw.numel()
    for a in range(0, n, SEGMENT_BYTES):
        k = min(SEGMENT_BYTES, n - a)
        buf = take(k)
        buf[:k].copy_(raw[a:a + k])
        put(buf, k)


class Worker:
    """One thread running write / copy jobs in order; the first error is kept and re-raised by the owner."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._run, name="safetensors-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            work, after = job
            try:
                if self.error is None and not self.cancelled:
                    work()
            except BaseException as exc:  # handed to the owner thread
                self.error = exc
            finally:
                if after is not None:
                    after()

    def submit(self, work, after=None) -> None:
        self.jobs.put((work, after))

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def check(self) -> None:
        """Raise the first error of a job, once; the jobs still queued are then skipped."""
        if self.error is not None:
            error, self.error = self.error, None
            self.cancelled = True
            raise error


class SegmentPool:
    """Buffers lent to a caller to fill with tensor bytes, a few at a time (memory stays bounded).

    Each is a :class:`~loratool.io.staging.Staged` buffer (memfd-backed where the kernel can send
    it to the output itself); callers see its uint8 tensor. ``take`` waits for a buffer to come
    back once ``_POOL`` are out; ``check`` is called while waiting so a writer error surfaces
    instead of a hang.
    """

    def __init__(self, check) -> None:
        self._free: queue.Queue = queue.Queue()
        self._lent = 0
        self._check = check
        self._staged: dict[int, Staged] = {}  # data_ptr of a lent tensor -> its buffer
        self._lock = threading.Lock()

    def _new(self, nbytes: int) -> torch.Tensor:
        staged = Staged(nbytes)
        with self._lock:
            self._staged[staged.tensor.data_ptr()] = staged
        return staged.tensor

    def take(self, nbytes: int) -> torch.Tensor:
        self._check()
        if self._free.empty() and self._lent < _POOL:
            self._lent += 1
            return self._new(max(nbytes, SEGMENT_BYTES))
        buf = self._free.get()
        self._check()
        if buf.numel() < nbytes:
            self._drop(buf)
            buf = self._new(nbytes)
        return buf

    def staged(self, buf: torch.Tensor) -> Staged:
        """The buffer behind a tensor this pool lent."""
        with self._lock:
            return self._staged[buf.data_ptr()]

    def give_back(self, buf: torch.Tensor) -> None:
        self._free.put(buf)

    def _drop(self, buf: torch.Tensor) -> None:
        with self._lock:
            staged = self._staged.pop(buf.data_ptr(), None)
        if staged is not None:
            staged.close()

    def close(self) -> None:
        """Release every buffer's memfd (called once the writer thread has stopped)."""
        with self._lock:
            staged, self._staged = list(self._staged.values()), {}
        for s in staged:
            s.close()


def send_segment(pool: SegmentPool, fd: int, buf: torch.Tensor, nbytes: int, offset: int | None) -> None:
    """Write the first ``nbytes`` of ``buf`` (lent by ``pool``) to ``fd`` at ``offset`` (None: its position)."""
    pool.staged(buf).write_to(fd, nbytes, offset)


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order given by ``specs``.

    ``header`` may be the stored prefix (8-byte length + JSON) of a source file with the same
    layout: it is then written verbatim, so metadata, key order and padding survive exactly.
    Use as a context manager; leaving it without having written every tensor is an error.
    Bytes are written by a background thread; any write error is raised by the next call or
    on leaving the context.
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
        self._open: tuple[str, int] | None = None  # (tensor being written in segments, bytes still due)
        self._worker: Worker | None = None
        self._pool = SegmentPool(self._check)
        self._whole = threading.Semaphore(1)  # whole tensors in flight

    def __enter__(self) -> StreamingWriter:
        self._fd = open_output(self.path)
        try:
            _write_all(self._fd, memoryview(self._prefix))
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self._worker = Worker()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._flush_copy()
                self._close_open()
                if self._next != len(self.specs):
                    missing = self.specs[self._next].name
                    raise OutputError(f"{self.path}: tensor {missing!r} was never written")
        finally:
            worker, self._worker = self._worker, None
            if worker is not None:
                if exc_type is not None:
                    worker.cancelled = True  # the file is being thrown away: skip what is queued
                worker.stop()
            for fd in self._sources.values():
                os.close(fd)
            self._sources.clear()
            self._pool.close()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if worker is not None and worker.error is not None and exc_type is None:
            raise worker.error

    def _check(self) -> None:
        if self._worker is not None:
            self._worker.check()

    def _expect(self, name: str, nbytes: int) -> None:
        self._close_open()
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: tensor {name!r} is not in the header")
        spec = self.specs[self._next]
        if spec.name != name:
            raise ValueError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        if nbytes != spec.nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} needs {spec.nbytes} bytes, got {nbytes}")
        self._next += 1

    def _close_open(self) -> None:
        if self._open is not None:
            name, due = self._open
            if due:
                raise ValueError(f"{self.path}: tensor {name!r} is missing its last {due} bytes")
            self._open = None

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is not None and spec.name == name and (tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape):
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the header says {spec.dtype} {spec.shape}"
            )
        raw = flat_bytes(tensor)
        if raw.numel() >= STAGE_MIN_BYTES and kernel_send_available():
            self._expect(name, raw.numel())
            self._flush_copy()
            self._open = (name, raw.numel())
            staged_pieces(raw, self.segment, self.write_segment)
            self._close_open()
            return
        self.write_bytes(name, tensor_bytes(tensor))

    def write_bytes(self, name: str, data) -> None:
        """Queue ``data`` (kept referenced until written) as the bytes of tensor ``name``."""
        view = memoryview(data).cast("B")
        self._expect(name, len(view))
        self._flush_copy()
        self._check()
        # One whole tensor in flight: the caller computes the next while this one is written,
        # and memory holds at most two.
        self._whole.acquire()
        fd = self._fd
        self._worker.submit(lambda: _write_all(fd, view), self._whole.release)

    # --- a tensor in segments -------------------------------------------------------------
    def begin_tensor(self, name: str) -> int:
        """Start tensor ``name``; its bytes follow through :meth:`write_segment`. Returns its size."""
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        nbytes = spec.nbytes if spec is not None else 0
        self._expect(name, nbytes)
        self._flush_copy()
        self._open = (name, nbytes)
        return nbytes

    def segment(self, nbytes: int = SEGMENT_BYTES) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` to fill; hand it back with :meth:`write_segment`.

        At most a few are out at once: this waits for the writer to finish one when needed.
        """
        return self._pool.take(nbytes)

    def write_segment(self, buf: torch.Tensor, nbytes: int) -> None:
        """Queue the first ``nbytes`` of ``buf`` (from :meth:`segment`) as the next bytes of the open tensor."""
        if self._open is None:
            raise ValueError(f"{self.path}: write_segment without begin_tensor")
        name, due = self._open
        if nbytes > due:
            raise ValueError(f"{self.path}: tensor {name!r} gets {nbytes - due} bytes too many")
        self._open = (name, due - nbytes)
        self._check()
        fd, pool = self._fd, self._pool
        self._worker.submit(lambda: send_segment(pool, fd, buf, nbytes, None), lambda: pool.give_back(buf))

    def give_back(self, buf: torch.Tensor) -> None:
        """Return an unused buffer from :meth:`segment`."""
        self._pool.give_back(buf)

    # --- byte ranges of source files ------------------------------------------------------
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
        self._check()
        dst, where = self._fd, self.path
        self._worker.submit(lambda: copy_range(fd, offset, length, dst, where))


def copy_range(src_fd: int, offset: int, length: int, dst_fd: int, where: Path) -> None:
    """Append ``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` (kernel copy when possible)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src_fd, dst_fd, min(length - done, _COPY_CALL), offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # across filesystems (EXDEV on Linux >= 5.19), or unsupported: go on from ``done``
    if done < length and hasattr(os, "sendfile"):
        try:  # still kernel-side, and file to file works across filesystems
            while done < length:
                n = os.sendfile(dst_fd, src_fd, offset + done, min(length - done, _COPY_CALL))
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # e.g. a platform where only sockets may be the destination: read and write
    while done < length:
        chunk = os.pread(src_fd, min(_CHUNK, length - done), offset + done)
        if not chunk:
            raise OutputError(f"{where}: source file ended early while copying (changed while reading?)")
        _write_all(dst_fd, memoryview(chunk))
        done += len(chunk)
