"""How fast ``loratool info FOLDER`` scans a LoRA library: 1,000 synthetic kohya LoRA files, header only.

    python bench/bench_scan.py [--files 1000] [--modules-sample 50]

Writes ``--files`` kohya SD 1.x LoRA files (every linear module of the sd1 family table, rank 16, fp16,
``ss_*`` metadata with hashes and a trigger folder) into a temporary folder. Their data areas are holes
(``truncate``): the headers and sizes are real, the disk holds only the headers. Then times, best of 3:

* ``headers``: :func:`loratool.io.safetensors_file.read_header` on every file (the floor: parse the JSON);
* ``scan``: :func:`loratool.ops.scan.scan` (layout, family, metadata, hashes per file; header only);
* ``scan --modules`` on ``--modules-sample`` files, scaled to the folder (every file's reader on its header);
* ``cli``: ``loratool info FOLDER --json`` in a fresh process (adds Python and import start-up).

Prints files / second and each time against the bare header parse of the same run, with the load average
(figures on a shared machine are noisy). The folder is removed at the end, whatever happens.
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

from bench_common import best_of

RANK = 16
WIDTH = 320  # the data area is a hole: widths only set the header's shapes and the file size


def _modules() -> list[tuple[str, int, int]]:
    """(kohya head, 0, 0) for every linear module of the sd1 family's table (U-Net and CLIP text encoder)."""
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


def write_library(folder: Path, files: int) -> tuple[int, int]:
    """``files`` kohya files in ``folder`` (subfolders of 100); returns (tensors per file, total header bytes)."""
    heads = [head for head, _, _ in _modules()]
    header: dict[str, object] = {}
    pos = 0
    for head in heads:
        for name, shape in ((f"{head}.lora_down.weight", [RANK, WIDTH]), (f"{head}.lora_up.weight", [WIDTH, RANK]),
                            (f"{head}.alpha", [])):
            n = 2 * (shape[0] * shape[1] if shape else 1)
            header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
    total = 0
    for i in range(files):
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": "8",
                "ss_base_model_version": "sd_v1", "ss_sd_model_name": "v1-5-pruned.safetensors",
                "ss_output_name": f"style_{i:04d}", "ss_dataset_dirs": json.dumps({f"10_zwx{i} person": {}}),
                "ss_tag_frequency": json.dumps({f"10_zwx{i} person": {"person": 20, "smile": 3}}),
                "sshs_model_hash": f"{i:064x}", "sshs_legacy_hash": f"{i:08x}"}
        raw = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        sub = folder / f"set_{i // 100:02d}"
        sub.mkdir(exist_ok=True)
        with open(sub / f"style_{i:04d}.safetensors", "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + pos)
        total += 8 + len(raw)
    return len(header), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--modules-sample", type=int, default=50)
    args = ap.parse_args()
    from loratool.io.safetensors_file import read_header
    from loratool.ops.scan import adapter_paths, scan, scan_file

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="loratool-bench-scan-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        tensors, header_bytes = write_library(folder, args.files)
        print(f"wrote {args.files} files ({tensors} tensors each, {header_bytes / 2**20:.1f} MiB of headers) "
              f"in {time.perf_counter() - t0:.1f} s")
        paths = adapter_paths(folder)
        assert len(paths) == args.files
        t_header = best_of(lambda: [read_header(p) for p in paths], 3)
        report = scan(folder)
        assert report.errors == 0 and {e.family for e in report.entries} == {"sd1"}, report.warnings[:3]
        t_scan = best_of(lambda: scan(folder), 3)
        sample = paths[: args.modules_sample]
        t_modules = best_of(lambda: [scan_file(p, modules=True) for p in sample], n=1) * len(paths) / len(sample)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "loratool", "info", str(folder), "--json"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        t_cli = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"loratool info failed: {proc.stderr.strip()[:300]}")
        assert json.loads(proc.stdout)["file_count"] == args.files
        n = len(paths)
        print(f"headers only      {t_header:7.2f} s  {n / t_header:8.0f} files/s")
        print(f"scan()            {t_scan:7.2f} s  {n / t_scan:8.0f} files/s   ({t_scan / t_header:.1f}× the headers)")
        print(f"scan(modules)     {t_modules:7.2f} s  {n / t_modules:8.0f} files/s   ({t_modules / t_header:.1f}× the "
              f"headers; from {len(sample)} files)")
        print(f"loratool info DIR {t_cli:7.2f} s  {n / t_cli:8.0f} files/s   (fresh process, imports included)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
