"""Ask the kernel to read what a merge is about to need, a window ahead of it.

The merge reads the tensors it rewrites in file order, a segment at a time, on the thread that
does the float work; on a cold page cache every read would stall that thread. Here each
rewritten span is announced with ``posix_fadvise(POSIX_FADV_WILLNEED)`` once the merge is
within :data:`WINDOW` bytes of it: the kernel reads it in the background while the float work
on the previous tensors goes on, and the merge's own reads then come from memory. The window
bounds how much the page cache is asked to hold ahead. No thread and no copy; where the call
does not exist (macOS, Windows) nothing happens. This module does not import torch.
"""

from __future__ import annotations

import os

WINDOW = 256 * 1024 * 1024


class ReadAhead:
    """Announce ``spans`` (absolute [start, end) of file ``fd``, in the order they will be read)."""

    def __init__(self, fd: int, spans: list[tuple[int, int]], window: int = WINDOW):
        self.fd = fd
        self.spans = sorted(spans)
        self.window = window
        self._next = 0  # first span not announced yet
        self.announced = 0  # bytes, for tests
        self._advise = getattr(os, "posix_fadvise", None)

    def reached(self, offset: int) -> None:
        """The merge is about to read at ``offset``: announce every span starting before offset + window."""
        limit = offset + self.window
        while self._next < len(self.spans) and self.spans[self._next][0] < limit:
            start, end = self.spans[self._next]
            self._next += 1
            if end <= start:
                continue
            self.announced += end - start
            if self._advise is not None:
                try:
                    self._advise(self.fd, start, end - start, os.POSIX_FADV_WILLNEED)
                except OSError:  # a filesystem without readahead: the reads still work, just unannounced
                    self._advise = None
