"""Benchmark: ``loratool merge`` of a rank-16 LoRA into a synthetic fp16 base versus ``cp`` of the same file.

Usage: ``python bench/bench_merge.py [--quick] [--gb 4.2] [--touch 0.5] [--rank 16] [--dir /tmp]
[--threads N] [--device cpu|cuda|auto]``

The base (``--gb`` of 4096×5120 fp16 tensors) is written with the streaming writer, so this
script never holds it in memory. ``cp`` runs before and after the merge (the first run also
warms the page cache for both); the ratio uses the mean of the two. Each run starts after
``sync``, with no dirty pages left by the previous one. Like ``cp``, the merge
leaves writeback to the kernel; ``merge --sync`` flushes before renaming, so it is compared with
``cp`` followed by ``sync FILE`` (skip with ``--no-sync-run``). CPU seconds (user + system) of
each child are printed too: on a machine with few cores the merge's wall time is bounded by its
CPU time over the cores (torch's import alone is seconds of CPU). Peak RSS of the merge process
is read from ``getrusage(RUSAGE_CHILDREN)`` after it exits. The load average is printed before
and after: on a shared machine compare runs at similar load. Everything is removed at the end.
Targets: ratio to ``cp`` ≤ 1.5 (and for the synced pair), peak RSS < 1 GB. When a CUDA device is
there (``--device auto``), the merge is timed again with ``--device cuda`` (the float work on
the GPU). ``--quick``: a 1 GB base, no synced pair (~1 min).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import load
from safetensors.torch import save_file

from loratool.io.safetensors_writer import StreamingWriter, TensorSpec

ROWS, COLS = 4096, 5120


def write_base(path: Path, n: int) -> None:
    specs = [TensorSpec(f"layers.{i}.proj.weight", torch.float16, (ROWS, COLS)) for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    block = (torch.randn(ROWS, COLS, generator=gen) * 0.02).half()
    with StreamingWriter(path, specs, {"format": "pt"}) as w:
        for i, spec in enumerate(specs):
            block[0, 0] = i  # distinct tensors without paying for n random draws
            w.write_tensor(spec.name, block)


def write_lora(folder: Path, n: int, touch: float, rank: int) -> int:
    folder.mkdir()
    gen = torch.Generator().manual_seed(1)
    step = max(1, round(1 / touch)) if touch > 0 else n + 1
    layers = list(range(0, n, step))
    tensors = {}
    for i in layers:
        stem = f"base_model.model.layers.{i}.proj"
        tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, COLS, generator=gen) * 0.01
        tensors[f"{stem}.lora_B.weight"] = torch.randn(ROWS, rank, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["proj"],
        "task_type": None, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
    }))
    return len(layers)


def timed(cmd: list[str], **kwargs) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the child, the finished process), from a clean page cache state.

    ``sync`` first: every run starts with no dirty pages (the base was just written, and earlier
    outputs were deleted), so none of them pays for another's writeback.
    """
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, **kwargs)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.2, help="base size in GB (default 4.2)")
    ap.add_argument("--touch", type=float, default=0.5, help="fraction of tensors the LoRA touches")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to put the files (needs 3× --gb free)")
    ap.add_argument("--no-sync-run", dest="sync_run", action="store_false",
                    help="skip the durable comparison (merge --sync against cp + sync)")
    ap.add_argument("--quick", action="store_true", help="1 GB base, no synced pair")
    ap.add_argument("--threads", type=int, default=None, help="loratool merge --threads")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cpu, and cuda too when there is one)")
    args = ap.parse_args()
    if args.quick:
        args.gb, args.sync_run = min(args.gb, 1.0), False
    n = max(1, int(args.gb * 1e9 / (ROWS * COLS * 2)))
    free = shutil.disk_usage(args.dir).free
    need = 3 * n * ROWS * COLS * 2
    if free < need:
        print(f"not enough disk in {args.dir}: need {need / 1e9:.1f} GB, have {free / 1e9:.1f} GB", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench_merge.", dir=args.dir))
    try:
        base, copy, out, lora = work / "base.safetensors", work / "copy.safetensors", work / "out.safetensors", \
            work / "lora"
        t0 = time.perf_counter()
        write_base(base, n)
        touched = write_lora(lora, n, args.touch, args.rank)
        size = base.stat().st_size
        print(f"base: {n} tensors {ROWS}x{COLS} fp16, {size / 1e9:.2f} GB "
              f"(written in {time.perf_counter() - t0:.1f} s); LoRA rank {args.rank} on {touched} tensors")
        print(f"load average before: {load()}; {os.cpu_count()} cores")
        cp1, cp_cpu, _ = timed(["cp", str(base), str(copy)])
        copy.unlink()
        merge_cmd = [sys.executable, "-m", "loratool", "merge", str(base), str(lora), "-o", str(out),
                     "--device", "cpu", "--json"] + (["--threads", str(args.threads)] if args.threads else [])
        merge_s, merge_cpu, proc = timed(merge_cmd, capture_output=True, text=True)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        summary = json.loads(proc.stdout)
        out.unlink()
        cp2, _, _ = timed(["cp", str(base), str(copy)])
        copy.unlink()
        cp_mean = (cp1 + cp2) / 2
        ratio = merge_s / cp_mean
        print(f"cp: {cp1:.2f} s then {cp2:.2f} s (mean {cp_mean:.2f} s), {cp_cpu:.2f} CPU-s   ({load()})")
        print(f"loratool merge: {merge_s:.2f} s wall (inside merge(): {summary['seconds']:.2f} s), "
              f"{merge_cpu:.2f} CPU-s; {summary['merged_tensors']} tensors merged, {summary['copied_tensors']} copied")
        print(f"ratio merge/cp: {ratio:.2f} (target <= 1.5)  {'OK' if ratio <= 1.5 else 'OVER'}   ({load()})")
        print(f"peak RSS of the merge process: {peak_mb:.0f} MB (target < 1024)  {'OK' if peak_mb < 1024 else 'OVER'}")
        if args.sync_run:
            cp_sync, _, _ = timed(["sh", "-c", 'cp "$1" "$2" && sync "$2"', "cp+sync", str(base), str(copy)])
            copy.unlink()
            merge_sync, _, _ = timed(merge_cmd + ["--sync"], capture_output=True)
            out.unlink()
            print(f"durable: cp + sync FILE {cp_sync:.2f} s, merge --sync {merge_sync:.2f} s, "
                  f"ratio {merge_sync / cp_sync:.2f} (target <= 1.5)   ({load()})")
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
            gpu_cmd = [c if c != "cpu" else "cuda" for c in merge_cmd]
            gpu_s, gpu_cpu, proc = timed(gpu_cmd, capture_output=True, text=True)
            out.unlink()
            print(f"loratool merge --device cuda: {gpu_s:.2f} s wall, {gpu_cpu:.2f} CPU-s, "
                  f"ratio merge/cp {gpu_s / cp_mean:.2f}   ({load()})")
        elif args.device == "cuda":
            print("no CUDA device here: the GPU path was not measured")
        print(f"load average after: {load()}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
