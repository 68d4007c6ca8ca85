"""How long ``loratool info`` takes on a ~2 GB kohya file, against reading its header alone.

    python bench/bench_info.py [--gib 2.0] [--keep-dir DIR]

Writes a kohya-named SD-1 LoRA (every linear module path of the sd1 family table, fp16,
``lora_down`` / ``lora_up`` / ``alpha`` per module, ``ss_*`` metadata) of about ``--gib`` GiB
into a temporary folder, then times, best of 5:

* ``header``: :func:`loratool.io.safetensors_file.read_header` (the floor: parse the JSON header);
* ``info``: :func:`loratool.ops.inspect.inspect` (detect layout, restore names, build the
  module table from meta tensors; reads only the 0-dim alpha scalars);
* ``cli``: ``loratool info --json`` in a fresh process (adds Python + torch start-up).

The file is removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK = 64


def _modules() -> list[tuple[str, int, int]]:
    """(kohya head, in, out) for the sd1 family's paths, widths chosen so the file reaches the target."""
    from loratool import arch

    fam = arch.get("sd1")
    prefix_of = {c: p for p, c in fam.kohya_prefixes.items()}
    out = []
    for comp in fam.components:
        for path in sorted(fam.native_paths(comp)):
            if "norm" in path or "embedding" in path or path.endswith(("conv_in", "conv_out")):
                continue
            if comp == "text_encoder" and not path.startswith("text_model."):
                continue  # the table also lists CLIP paths without text_model.; kohya uses it
            out.append((prefix_of[comp] + "_" + path.replace(".", "_"), 0, 0))
    return out


def write_file(path: Path, gib: float) -> tuple[int, int]:
    """A kohya file of about ``gib`` GiB; returns (tensor count, bytes)."""
    heads = _modules()
    per_module = gib * 2**30 / len(heads)
    width = max(64, int(per_module / (2 * RANK * 2)))  # down [r, w] + up [w, r], 2 bytes each
    header: dict[str, object] = {"__metadata__": {
        "ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": "32",
        "ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps({"1_x": {"bench": 1}}),
    }}
    pos = 0
    for head, _, _ in heads:
        for name, shape in ((f"{head}.lora_down.weight", [RANK, width]), (f"{head}.lora_up.weight", [width, RANK]),
                            (f"{head}.alpha", [])):
            n = 2 * (RANK * width if shape else 1)
            header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        left = pos
        while left:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n
    return len(header) - 1, path.stat().st_size


def best_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0)
    args = ap.parse_args()
    from loratool.io.safetensors_file import read_header
    from loratool.ops.inspect import inspect

    with tempfile.TemporaryDirectory(prefix="loratool-bench-") as tmp:
        path = Path(tmp) / "big_kohya.safetensors"
        t0 = time.perf_counter()
        count, size = write_file(path, args.gib)
        print(f"wrote {path.name}: {size / 2**30:.2f} GiB, {count} tensors in {time.perf_counter() - t0:.1f} s")
        t_header = best_of(lambda: read_header(path))
        report = inspect(path)
        assert report.header_only and report.format == "kohya", report.format
        t_info = best_of(lambda: inspect(path))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "loratool", "info", str(path), "--json"],
                              capture_output=True, text=True)
        t_cli = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"loratool info failed: {proc.stderr.strip()}")
        modules = json.loads(proc.stdout)["module_count"]
        print(f"modules         {modules}")
        print(f"header only     {t_header * 1000:8.1f} ms")
        print(f"inspect()       {t_info * 1000:8.1f} ms   ({t_info / t_header:.1f}× the header read)")
        print(f"loratool info   {t_cli * 1000:8.1f} ms   (fresh process, incl. Python + torch start-up)")
        verdict = "OK" if t_info < 1.0 else "TOO SLOW"
        print(f"{verdict}: info reads {size / 2**30:.2f} GiB in {t_info:.3f} s without touching tensor data")


if __name__ == "__main__":
    main()
