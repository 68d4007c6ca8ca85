"""Buffers that computed tensor bytes are written into, and how those bytes reach the output file.

A writer lends the caller a buffer, the caller fills it (the merge casts its float32 rows into
it), and the writer thread hands it to the kernel. With ``pwrite`` the kernel copies the bytes
from user memory into the output's page cache; on Linux the buffer here is instead a shared
mapping of a memfd (an anonymous tmpfs file), and the writer thread sends it with
``sendfile(output, memfd, ...)``: the kernel copies page cache to page cache, as
``copy_file_range`` does for the tensors copied untouched.

Why: copying from user pages into freshly allocated page-cache pages was measured erratic on
a 2-core VM (this project's bench machine): 1 GiB written from an 8 MiB torch buffer with
``pwrite`` took 0.3 s in some runs and 10-14 s in most (the time all in the kernel's
``copy_folio_from_iter_atomic``), while the same bytes sent from a memfd took 0.44-0.67 s in
every run, like ``copy_file_range`` (0.3 s). Elsewhere the two cost the same copy.

Where ``memfd_create`` or ``sendfile`` does not exist (macOS, Windows), or the output's
filesystem refuses ``sendfile`` into it, the buffer is ordinary memory and the bytes are written
with ``pwrite`` / ``write``. Once sent, the bytes are in the output's page cache: the buffer
may be refilled at once.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys

import torch

from loratool.io.copy_ahead import pwrite_all

# Errors that mean "this kind of transfer is not offered here", not "the write failed".
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ESPIPE}

_kernel_send = sys.platform.startswith("linux") and hasattr(os, "memfd_create") and hasattr(os, "sendfile")


def kernel_send_available() -> bool:
    """Whether buffers are memfd-backed and sent with ``sendfile`` (False after a refusal)."""
    return _kernel_send


def _refused() -> None:
    global _kernel_send
    _kernel_send = False  # this process writes from memory from now on


class Staged:
    """A buffer of ``size`` bytes: fill :attr:`tensor` (uint8), then :meth:`write_to` an output."""

    def __init__(self, size: int):
        self.size = max(1, int(size))
        self.fd: int | None = None
        mem = None
        if _kernel_send:
            fd = None
            try:
                fd = os.memfd_create("loratool-segment", getattr(os, "MFD_CLOEXEC", 0))
                os.ftruncate(fd, self.size)
                mem = mmap.mmap(fd, self.size)  # MAP_SHARED: the tensor's bytes are the memfd's pages
                self.fd = fd
            except OSError:
                if fd is not None:
                    os.close(fd)
                mem = None
        if mem is None:
            mem = bytearray(self.size)
        self._mem = mem  # kept referenced beside the tensor (torch.frombuffer shares its memory)
        self.tensor = torch.frombuffer(mem, dtype=torch.uint8)

    def close(self) -> None:
        """Release the memfd (the mapping, and so :attr:`tensor`, stays valid)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def view(self, nbytes: int) -> memoryview:
        return memoryview(self._mem)[:nbytes]

    def write_to(self, fd: int, nbytes: int, offset: int | None = None) -> None:
        """Write the first ``nbytes`` to ``fd`` at ``offset`` (None: at its file position, which advances).

        ``sendfile`` uses the output's position, so with an ``offset`` the caller must be the only
        thread using ``fd`` (each writer's fd belongs to its writer thread)."""
        done = 0
        if self.fd is not None and _kernel_send:
            try:
                if offset is not None:
                    os.lseek(fd, offset, os.SEEK_SET)
                done = sendfile_all(fd, self.fd, nbytes)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                _refused()
                done = exc.done if isinstance(exc, _Partial) else 0
        if done < nbytes:
            view = self.view(nbytes)[done:]
            if offset is None:
                write_all(fd, view)
            else:
                pwrite_all(fd, view, offset + done)


class _Partial(OSError):
    """A refused ``sendfile`` after ``done`` bytes went through."""

    def __init__(self, err: int, msg: str, done: int):
        super().__init__(err, msg)
        self.done = done


def sendfile_all(out_fd: int, in_fd: int, nbytes: int) -> int:
    """Send bytes ``[0, nbytes)`` of ``in_fd`` to ``out_fd`` at its position; returns ``nbytes``."""
    done = 0
    while done < nbytes:
        try:
            n = os.sendfile(out_fd, in_fd, done, nbytes - done)
        except OSError as exc:
            if done and exc.errno in _UNSUPPORTED:
                raise _Partial(exc.errno, exc.strerror or str(exc), done) from exc
            raise
        if n == 0:
            if done:
                raise _Partial(errno.EINVAL, "sendfile stopped early", done)
            raise OSError(errno.EINVAL, "sendfile sent nothing")
        done += n
    return done


def write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` at the position of ``fd``."""
    while len(data):
        n = os.write(fd, data)
        data = data[n:]
