"""What the benches share: the load average beside every figure, a background process that keeps
one core busy (a desktop running ComfyUI or a browser), peak memory, best-of timing."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

SPIN = "while True:\n    pass\n"


def load() -> str:
    try:
        return "load " + "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load n/a"


@contextlib.contextmanager
def one_core_busy(enabled: bool = True) -> Iterator[None]:
    """A child process spinning one core for the duration (started and stopped here)."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    time.sleep(0.3)  # let it get scheduled
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def best_of(fn: Callable[[], object], n: int) -> float:
    """The fastest of ``n`` runs, in seconds (the least disturbed by a shared machine)."""
    best = float("inf")
    for _ in range(max(1, n)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# (label, whether a background process spins one core)
CASES = (("idle", False), ("one core busy", True))
