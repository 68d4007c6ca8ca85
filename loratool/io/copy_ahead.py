"""Copying a merge's base files into its output ahead of the maths, on a background thread.

A merge writes every base file again with some tensors changed. Copying the bytes needs neither
torch nor the adapters, so it starts as soon as the output is opened, while torch is still being
imported (seconds) and the adapters load; the kernel does the copy (``copy_file_range``), so it
runs on the other core meanwhile. Each file is copied in file order, in runs of at most
``RUN_BYTES`` that either lie inside one tensor or hold whole small tensors.

Runs inside tensors the caller expects to rewrite (``defer``: a guess from names, made before
the adapters are loaded) are left for last and copied only once the guess is settled. When the
merge knows which tensors it rewrites, :meth:`CopyAhead.settle` drops the pending runs that lie
inside them (runs already copied are simply overwritten) and lets the deferred rest be copied.
Before writing new bytes the merge calls :meth:`CopyAhead.wait_clear`, which returns once no run
overlapping them is pending or being copied: a late copy can never land on merged bytes. Output
offsets equal base offsets, so only outputs with the base's layout (same header, dtypes,
shapes) are copied ahead.

This module does not import torch.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from loratool.errors import OutputError
from loratool.io.atomic import open_output

# Copy granularity: large enough that per-call overhead is nil, small enough that a skip or a
# cancel (Ctrl-C) takes effect within a few tens of milliseconds.
RUN_BYTES = 64 * 1024 * 1024
_CHUNK = 16 * 1024 * 1024

_PENDING, _RUNNING, _DONE, _SKIPPED = range(4)

Span = tuple[int, int]


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd``."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset + length)`` of ``fd`` to disk without waiting (only advice).

    For outputs that are fsynced before the rename: otherwise the kernel starts writeback only past
    its dirty threshold and most of the file waits for that final fsync instead of streaming out
    meanwhile. POSIX_FADV_DONTNEED on dirty pages starts their writeback; they stay cached.
    """
    if hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # a filesystem that refuses advice loses nothing


def copy_at(src_fd: int, dst_fd: int, offset: int, length: int, where: Path) -> None:
    """Copy bytes ``[offset, offset + length)`` of ``src_fd`` to the same offsets of ``dst_fd``."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # across filesystems (EXDEV before Linux 5.19), or unsupported: read and write the rest
    while done < length:
        chunk = os.pread(src_fd, min(_CHUNK, length - done), offset + done)
        if not chunk:
            raise OutputError(f"{where}: source file ended early while copying (changed while reading?)")
        pwrite_all(dst_fd, memoryview(chunk), offset + done)
        done += len(chunk)


def runs_of(spans: Sequence[Span]) -> list[Span]:
    """Copy runs for a file whose header and tensors occupy ``spans`` (in order, contiguous).

    A span of ``RUN_BYTES`` or more is cut into runs inside it (so they can be skipped when that
    tensor is rewritten); smaller spans are grouped, whole, into runs of at most ``RUN_BYTES``.
    """
    runs: list[Span] = []
    group: list[int] | None = None
    for a, b in spans:
        if b - a >= RUN_BYTES:
            if group is not None:
                runs.append((group[0], group[1]))
                group = None
            runs.extend((s, min(s + RUN_BYTES, b)) for s in range(a, b, RUN_BYTES))
        elif b > a:
            if group is not None and b - group[0] > RUN_BYTES:
                runs.append((group[0], group[1]))
                group = None
            group = [a, b] if group is None else [group[0], b]
    if group is not None:
        runs.append((group[0], group[1]))
    return runs


def _inside(runs: Sequence[Span], spans: Sequence[Span]) -> list[bool]:
    """For each run, whether it lies inside one of ``spans``."""
    ordered = sorted(spans)
    starts = [a for a, _ in ordered]
    out = []
    for a, b in runs:
        j = bisect.bisect_right(starts, a) - 1
        out.append(j >= 0 and ordered[j][0] <= a and b <= ordered[j][1])
    return out


class _File:
    def __init__(self, src: Path, dst: Path, spans: Sequence[Span], deferred: Sequence[Span]):
        self.src = src
        self.dst = dst
        self.runs = runs_of(spans)
        self.starts = [a for a, _ in self.runs]
        self.state = [_PENDING] * len(self.runs)
        self.deferred = _inside(self.runs, deferred)
        self.settled = 0  # runs[:settled] are all done or skipped
        self.dropped = False  # the merge writes this file itself, from scratch (drop())


class CopyAhead:
    """Copies ``(source, destination, spans)`` files in order on one thread; see the module doc.

    Use as a context manager: leaving it with an exception cancels the copy and waits for the
    thread; every wait raises the copy's error, if it had one.
    """

    def __init__(self, files: Sequence[tuple[Path, Path, Sequence[Span]]], *,
                 defer: dict[Path, Sequence[Span]] | None = None, sync: bool = False):
        self.sync = sync  # the output is fsynced at the end: start writeback as runs complete
        defer = defer or {}
        self._files = {Path(dst): _File(Path(src), Path(dst), spans, defer.get(Path(dst), ()))
                       for src, dst, spans in files}
        self._cond = threading.Condition()
        self._settled_plan = False  # settle() was called: deferred runs may be copied
        self._cancelled = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="copy-ahead", daemon=True)

    def __enter__(self) -> CopyAhead:
        for dst in self._files:  # they exist before anyone (the merge's writer) opens them
            os.close(open_output(dst))
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._cond:
            if exc_type is not None:
                self._cancelled = True
            else:
                self._settled_plan = True  # never settled: the deferred runs are copied as they are
            self._cond.notify_all()
        self._thread.join()
        if exc_type is None:
            self._raise()

    def __contains__(self, dst: os.PathLike) -> bool:
        f = self._files.get(Path(dst))
        return f is not None and not f.dropped

    # --- the copying thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            for f in self._files.values():
                self._copy_file(f, deferred=False)
            with self._cond:
                while not (self._settled_plan or self._cancelled):
                    self._cond.wait()
            for f in self._files.values():
                self._copy_file(f, deferred=True)
        except BaseException as exc:  # handed to the waiting threads
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _copy_file(self, f: _File, deferred: bool) -> None:
        if not deferred and all(f.deferred) or deferred and not any(f.deferred):
            return
        dst = os.open(f.dst, os.O_WRONLY)
        try:
            src = os.open(f.src, os.O_RDONLY)
            try:
                for i, (a, b) in enumerate(f.runs):
                    with self._cond:
                        if self._cancelled:
                            return
                        if f.state[i] != _PENDING or f.deferred[i] != deferred:
                            continue
                        f.state[i] = _RUNNING
                    copy_at(src, dst, a, b - a, f.dst)
                    if self.sync:
                        start_writeback(dst, a, b - a)
                    with self._cond:
                        f.state[i] = _DONE
                        self._cond.notify_all()
            finally:
                os.close(src)
        finally:
            os.close(dst)

    # --- the merge's side ---------------------------------------------------------------------------
    def settle(self, rewrites: dict[Path, Sequence[Span]]) -> None:
        """The caller writes ``rewrites`` (destination -> byte spans) itself: never copy pending runs
        inside them; copy every other run, the deferred ones included."""
        with self._cond:
            for dst, spans in rewrites.items():
                f = self._files[Path(dst)]
                for i, inside in enumerate(_inside(f.runs, spans)):
                    if inside and f.state[i] == _PENDING:
                        f.state[i] = _SKIPPED
            self._settled_plan = True
            self._cond.notify_all()

    def drop(self, dst: os.PathLike) -> None:
        """Stop copying ``dst`` (its layout changes: a tensor's shape does); returns once no run of it is
        being copied, so the caller may rewrite the file from its first byte."""
        f = self._files[Path(dst)]
        with self._cond:
            f.dropped = True
            f.state = [_SKIPPED if s == _PENDING else s for s in f.state]
            self._cond.notify_all()
            while _RUNNING in f.state:
                self._raise()
                self._cond.wait()

    def wait_clear(self, dst: os.PathLike, start: int, end: int) -> None:
        """Return once no run overlapping ``[start, end)`` is pending or being copied."""
        f = self._files[Path(dst)]
        lo = max(0, bisect.bisect_right(f.starts, start) - 1)
        hi = bisect.bisect_left(f.starts, end)
        with self._cond:
            while True:
                self._raise()
                if not any(s in (_PENDING, _RUNNING) for s in f.state[lo:hi]):
                    return
                self._cond.wait()

    def wait_file(self, dst: os.PathLike, progress: Callable[[int], None] | None = None) -> None:
        """Wait until all of ``dst`` is copied or skipped, calling ``progress(bytes settled)`` meanwhile.

        With runs deferred, call :meth:`settle` first (they wait for it)."""
        f = self._files[Path(dst)]
        with self._cond:
            while True:
                self._raise()
                settled = self._settled(f)
                if progress is not None:
                    progress(settled)
                if f.settled == len(f.runs):
                    return
                self._cond.wait()  # every finished run, settle() and error notifies

    def settled(self, dst: os.PathLike) -> int:
        """Bytes from the start of ``dst`` that are copied or skipped."""
        with self._cond:
            return self._settled(self._files[Path(dst)])

    def _settled(self, f: _File) -> int:
        while f.settled < len(f.runs) and f.state[f.settled] in (_DONE, _SKIPPED):
            f.settled += 1
        return f.runs[f.settled - 1][1] if f.settled else 0

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise OutputError("copy cancelled")
