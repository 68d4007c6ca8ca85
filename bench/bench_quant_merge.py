"""Benchmark: ``loratool merge`` into an fp8 base versus the fp16 merge of the same base, in one run.

Usage: ``python bench/bench_quant_merge.py [--gb 4.2] [--quick] [--touch 0.5] [--rank 16] [--dir /tmp]``

The fp8 base (``--gb`` of 4096×5120 float8_e4m3fn tensors; ``--quick``: 0.25 GB) and the fp16 base
holding the same values are written with the streaming writer. The fp16 merge runs before and after
the fp8 merge (the first also warms the page cache); the ratio uses their mean. Each run starts
after ``sync``. The fp8 merge decodes each touched weight to float32, merges, rounds once to fp8 and
measures the kept-update figure (docs/quantized.md); the fp16 merge takes the row-blocked path.
Both outputs are otherwise copies of their bases, so the fp8 run also has half the bytes to copy.
The load average is printed before and after (the machine may be shared: compare runs at similar
load). Everything written is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_merge import load, write_lora  # the same rank-r PEFT adapter on every 1/touch-th tensor

from loratool.io.safetensors_writer import StreamingWriter, TensorSpec

ROWS, COLS = 4096, 5120


def write_bases(fp8: Path, fp16: Path, n: int) -> None:
    names = [f"layers.{i}.proj.weight" for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    block = (torch.randn(ROWS, COLS, generator=gen) * 0.02).half()
    specs8 = [TensorSpec(k, torch.float8_e4m3fn, (ROWS, COLS)) for k in names]
    specs16 = [TensorSpec(k, torch.float16, (ROWS, COLS)) for k in names]
    with StreamingWriter(fp8, specs8, {"format": "pt"}) as w8, StreamingWriter(fp16, specs16, {"format": "pt"}) as w16:
        for i, name in enumerate(names):
            block[0, 0] = i * 0.001  # distinct tensors without paying for n random draws
            q = block.to(torch.float8_e4m3fn)
            w8.write_tensor(name, q)
            w16.write_tensor(name, q.half())  # the same values: fp8 is exact in fp16


def timed(cmd: list[str]) -> tuple[float, dict]:
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, json.loads(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.2, help="fp8 base size in GB (default 4.2)")
    ap.add_argument("--quick", action="store_true", help="a 0.25 GB fp8 base (a shared machine)")
    ap.add_argument("--touch", type=float, default=0.5, help="fraction of tensors the LoRA touches")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to put the files (needs 6× --gb free)")
    args = ap.parse_args()
    gb = 0.25 if args.quick else args.gb
    n = max(1, int(gb * 1e9 / (ROWS * COLS)))
    need = 6 * n * ROWS * COLS  # fp8 base + fp16 base (2×) + their outputs
    free = shutil.disk_usage(args.dir).free
    if free < need:
        print(f"not enough disk in {args.dir}: need {need / 1e9:.1f} GB, have {free / 1e9:.1f} GB", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench_quant_merge.", dir=args.dir))
    try:
        fp8, fp16, lora = work / "fp8.safetensors", work / "fp16.safetensors", work / "lora"
        t0 = time.perf_counter()
        write_bases(fp8, fp16, n)
        touched = write_lora(lora, n, args.touch, args.rank)
        print(f"bases: {n} tensors {ROWS}x{COLS}: fp8 {fp8.stat().st_size / 1e9:.2f} GB, fp16 "
              f"{fp16.stat().st_size / 1e9:.2f} GB (written in {time.perf_counter() - t0:.1f} s); "
              f"LoRA rank {args.rank} on {touched} tensors")
        print(f"load average before: {load()}; {os.cpu_count()} cores")

        def run(base: Path) -> tuple[float, dict]:
            out = work / f"out.{base.name}"
            secs, summary = timed([sys.executable, "-m", "loratool", "merge", str(base), str(lora), "-o", str(out),
                                   "--device", "cpu", "--json"])
            out.unlink()
            return secs, summary

        f16a, s16 = run(fp16)
        f8, s8 = run(fp8)
        f16b, _ = run(fp16)
        mean16 = (f16a + f16b) / 2
        print(f"fp16 merge: {f16a:.2f} s then {f16b:.2f} s (mean {mean16:.2f} s; inside merge(): "
              f"{s16['seconds']:.2f} s), {s16['merged_tensors']} merged")
        kept = s8["kept_update"] or {}
        print(f"fp8 merge: {f8:.2f} s (inside merge(): {s8['seconds']:.2f} s), {s8['merged_tensors']} merged; "
              f"kept {kept.get('overall', float('nan')):.3f}, aligned {kept.get('overall_aligned', float('nan')):.3f}")
        print(f"ratio fp8 merge / fp16 merge: {f8 / mean16:.2f}")
        print(f"load average after: {load()}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
