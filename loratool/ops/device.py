"""Where heavy matrix work runs (``auto`` picks CUDA, then MPS, then the CPU) and how many CPU
threads it gets: the one thread policy every op uses.

Thread policy (:class:`ThreadPolicy`, ``--threads N`` caps it; default: every CPU this process
may run on):

* **Small maths** (per-module work on LoRA factors: r×r Gram matrices, eigen-decompositions and
  SVDs, thin products) runs with one torch thread. torch's default is one OpenMP thread per
  core, and every op then ends on a barrier the threads spin on; for thousands of
  microsecond-sized ops that costs 10× on an idle 2-core machine and up to 100× when another
  process holds a core (measured: 300 SDXL modules resized in 1.2 s with one thread, 13-32 s
  with two). Across modules, :meth:`ThreadPolicy.map` may run a pool of worker threads (each
  single-threaded) or give the torch threads to one module at a time — only where that is
  measured to be faster.
* **Large maths** (dense SVDs, products with a whole weight, merges of big weights) may use
  several threads: :meth:`ThreadPolicy.large` picks the thread count by timing the work itself
  (measured: two threads made a 4096×5120 block merge 4× slower on a busy 2-core machine, and
  faster on an idle one).
* Both choices are races (:class:`Race`) between settings that are all correct: the
  single-threaded setting is always one of them and runs first; the others are tried, and
  re-tried, only while the time they may lose stays under :data:`EXPLORE_SHARE` of the time spent
  so far. So an op is never much slower than its single-threaded run, idle or busy, and uses the
  cores when they are free (an op too short to earn a try just runs single-threaded).

On CUDA / MPS the CPU thread count does not matter for the maths: no thread setting changes
and :meth:`ThreadPolicy.map` runs serially.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from loratool.cpus import usable_cpus
from loratool.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")

# Work below this many flops (a 1280×1280 rank-64 module is ~2e7) counts as small maths.
LARGE_FLOPS = 2e8
# Share of the time spent so far that may go into re-trying settings that were slower.
EXPLORE_SHARE = 0.05
# Weight of the newest measurement in a setting's running rate.
_EWMA = 0.3
# An untried setting is assumed to take up to this many times the best one's time (measured on a
# busy 2-core machine: two threads made a 1024² SVD 3× and a thin GEMM 2× slower, and a randomized
# SVD of a 1280×17280 conv weight several times slower): its first try waits for enough credit,
# and then falls on work small enough to afford even when the cost model misjudges it.
UNTRIED_SLOWDOWN = 8.0

T = TypeVar("T")
R = TypeVar("R")


def pick_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available")
        return torch.device(name)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError("--device mps: MPS is not available")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"--device {name}: choose one of {', '.join(DEVICE_CHOICES)}")


def check_threads(threads: int | None) -> int | None:
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise UsageError(f"--threads {threads}: must be a positive integer")
    return None if threads is None else int(threads)


class Race:
    """Pick the fastest of a few settings for repeated work by timing the work itself.

    The first setting (the safe one: single-threaded) runs first. Another setting is tried only
    when the time it may lose fits in the credit: :data:`EXPLORE_SHARE` of all time measured so
    far, minus what earlier tries lost. An untried setting is assumed to take up to
    :data:`UNTRIED_SLOWDOWN` times as long as the best so far; a measured one its running mean
    rate (seconds per unit of cost) — so the
    fastest setting is used once known, and slower ones are re-tried now and then, following a
    machine whose load changes, at a cost of about that share of the time.
    """

    def __init__(self, settings: Sequence, explore_share: float = EXPLORE_SHARE):
        self.settings = list(dict.fromkeys(settings))
        self.rate: dict = {s: None for s in self.settings}
        self.explore_share = explore_share
        self.credit = 0.0
        self._lock = threading.Lock()

    def _best(self):
        known = [s for s in self.settings if self.rate[s] is not None]
        return min(known, key=lambda s: self.rate[s]) if known else self.settings[0]

    def pick(self, cost: float = 1.0):
        with self._lock:
            best = self._best()
            if self.rate[best] is None:
                return best
            for s in self.settings:
                if s is best:
                    continue
                known = self.rate[s] if self.rate[s] is not None else UNTRIED_SLOWDOWN * self.rate[best]
                loss = known - self.rate[best]
                if loss * cost <= self.credit:
                    return s
            return best

    def record(self, setting, seconds: float, cost: float = 1.0) -> None:
        cost = max(float(cost), 1e-12)
        with self._lock:
            best = self._best()
            lost = 0.0
            if setting is not best and self.rate[best] is not None:
                lost = max(0.0, seconds - self.rate[best] * cost)
            self.credit += self.explore_share * seconds - lost
            old = self.rate[setting]
            rate = seconds / cost
            self.rate[setting] = rate if old is None else (1 - _EWMA) * old + _EWMA * rate

    @contextlib.contextmanager
    def timed(self, cost: float = 1.0) -> Iterator:
        """``with race.timed(cost) as setting:`` run the work with ``setting``; it is timed."""
        setting = self.pick(cost)
        t0 = time.perf_counter()
        yield setting
        self.record(setting, time.perf_counter() - t0, cost)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside, the previous count restored after."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def single_threaded() -> contextlib.AbstractContextManager:
    """One torch thread inside: the setting for everything an op does outside its measured maths
    (reading, splitting fused rows, writing, hashing, the small bookkeeping between modules);
    :class:`ThreadPolicy` raises it where that is measured to pay."""
    return torch_threads(1)


def single_threaded_op(fn: Callable[..., R]) -> Callable[..., R]:
    """Decorator: the whole op runs under :func:`single_threaded` (its policy raises it where it pays)."""

    @functools.wraps(fn)
    def op(*args, **kwargs):
        with single_threaded():
            return fn(*args, **kwargs)

    return op


class ThreadPolicy:
    """How many CPU threads an op's maths uses (see the module docstring)."""

    def __init__(self, threads: int | None = None, device: torch.device | str = "cpu"):
        self.threads = check_threads(threads) or usable_cpus()
        self.device = torch.device(device)
        self.cpu = self.device.type == "cpu"
        counts = [1]
        if self.threads >= 4:
            counts.append(self.threads // 2)
        counts.append(self.threads)
        self._large = Race(counts)
        self._map = Race(["serial", "pool", "threads"] if self.threads > 1 else ["serial"])

    @contextlib.contextmanager
    def small(self) -> Iterator[None]:
        """Per-module maths: one torch thread (no setting changes off the CPU)."""
        if not self.cpu:
            yield
            return
        with torch_threads(1):
            yield

    @contextlib.contextmanager
    def large(self, cost: float = LARGE_FLOPS) -> Iterator[int]:
        """Big maths: the thread count that is measured fastest (``cost``: its flops, any consistent unit)."""
        if not self.cpu or self.threads == 1:
            with self.small():
                yield 1
            return
        with self._large.timed(cost) as n, torch_threads(n):
            yield n

    def work(self, cost: float) -> contextlib.AbstractContextManager:
        """:meth:`large` for work of at least :data:`LARGE_FLOPS` flops, else :meth:`small`."""
        return self.large(cost) if cost >= LARGE_FLOPS else self.small()

    def map(self, fn: Callable[[T], R], items: Iterable[T], cost: Callable[[T], float] | None = None) -> Iterator[R]:
        """``fn`` over ``items``, results in order, in chunks of consecutive items; each chunk runs
        one of: one after another single-threaded (``serial``), spread over a pool of worker
        threads that are each single-threaded (``pool``), or one after another with several torch
        threads (``threads``) — whichever :class:`Race` measures fastest per unit of ``cost``
        (flops; default 1 per item)."""
        items = list(items)
        if not self.cpu or not items:
            yield from (fn(x) for x in items)
            return
        costs = [float(cost(x)) if cost is not None else 1.0 for x in items]
        chunk = 4 * self.threads
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="loratool-maths") if self.threads > 1 else None
        try:
            for i in range(0, len(items), chunk):
                batch = items[i:i + chunk]
                with self._map.timed(sum(costs[i:i + chunk])) as how:
                    if how == "pool" and len(batch) > 1:
                        with torch_threads(1):
                            results = list(pool.map(fn, batch))
                    else:
                        with torch_threads(self.threads if how == "threads" else 1):
                            results = [fn(x) for x in batch]
                yield from results
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
