"""Writing new bytes for some tensors of an output whose other bytes are copied (:mod:`loratool.io.copy_ahead`).

The output has the source's layout, so each rewritten tensor goes to the offsets the source gives
it, in any order. Writes run on a background thread (the caller computes the next segment
meanwhile), each after :meth:`CopyAhead.wait_clear` says no copy still overlaps it. The segment
API is the one :class:`~loratool.io.safetensors_writer.StreamingWriter` offers, so the merge's
per-tensor code writes through either.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from loratool.io.copy_ahead import CopyAhead, pwrite_all, start_writeback
from loratool.io.safetensors_writer import (
    STAGE_MIN_BYTES,
    SegmentPool,
    Worker,
    flat_bytes,
    send_segment,
    staged_pieces,
    tensor_bytes,
)
from loratool.io.staging import kernel_send_available


class PatchWriter:
    """Write tensors ``spans`` (name -> absolute [start, end)) of the existing file ``path``."""

    def __init__(self, path: str | os.PathLike, spans: dict[str, tuple[int, int]], copier: CopyAhead):
        self.path = Path(path)
        self._spans = spans
        self._copier = copier
        self._fd: int | None = None
        self._worker: Worker | None = None
        self._pool = SegmentPool(self._check)
        self._whole = threading.Semaphore(1)  # whole tensors in flight
        self._open: tuple[str, int, int] | None = None  # (tensor, next offset, its end)

    def __enter__(self) -> PatchWriter:
        self._fd = os.open(self.path, os.O_WRONLY)
        self._worker = Worker()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._close_open()
        finally:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.cancelled = exc_type is not None
                worker.stop()
            self._pool.close()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if exc_type is None and worker is not None:
            worker.check()

    def _check(self) -> None:
        if self._worker is not None:
            self._worker.check()

    def _close_open(self) -> None:
        if self._open is not None:
            name, at, end = self._open
            if at != end:
                raise ValueError(f"{self.path}: tensor {name!r} is missing its last {end - at} bytes")
            self._open = None

    def _submit(self, put, at: int, nbytes: int, after) -> None:
        """Queue ``put(fd)``, which writes ``nbytes`` at ``at``, behind any copy run overlapping them."""
        fd, copier, path = self._fd, self._copier, self.path

        def write() -> None:
            copier.wait_clear(path, at, at + nbytes)
            put(fd)
            if copier.sync:
                start_writeback(fd, at, nbytes)

        self._worker.submit(write, after)

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self._close_open()
        start, end = self._spans[name]
        raw = flat_bytes(tensor)
        if raw.numel() != end - start:
            raise ValueError(f"{self.path}: tensor {name!r} needs {end - start} bytes, got {raw.numel()}")
        self._check()
        if raw.numel() >= STAGE_MIN_BYTES and kernel_send_available():
            self._open = (name, start, end)
            staged_pieces(raw, self.segment, self.write_segment)
            self._close_open()
            return
        data = tensor_bytes(tensor)
        self._whole.acquire()  # one whole tensor in flight: memory holds at most two
        self._submit(lambda fd: pwrite_all(fd, data, start), start, len(data), self._whole.release)

    def begin_tensor(self, name: str) -> int:
        """Start tensor ``name``; its bytes follow through :meth:`write_segment`. Returns its size."""
        self._close_open()
        start, end = self._spans[name]
        self._open = (name, start, end)
        return end - start

    def segment(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` to fill; hand it back with :meth:`write_segment`."""
        return self._pool.take(nbytes)

    def write_segment(self, buf: torch.Tensor, nbytes: int) -> None:
        """Queue the first ``nbytes`` of ``buf`` as the next bytes of the open tensor."""
        if self._open is None:
            raise ValueError(f"{self.path}: write_segment without begin_tensor")
        name, at, end = self._open
        if at + nbytes > end:
            raise ValueError(f"{self.path}: tensor {name!r} gets {at + nbytes - end} bytes too many")
        self._open = (name, at + nbytes, end)
        self._check()
        pool = self._pool
        self._submit(lambda fd: send_segment(pool, fd, buf, nbytes, at), at, nbytes, lambda: pool.give_back(buf))

    def give_back(self, buf: torch.Tensor) -> None:
        """Return an unused buffer from :meth:`segment`."""
        self._pool.give_back(buf)
