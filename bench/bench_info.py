"""``loratool info``: a fresh process against a bare-Python header read, and a folder scan of a
LoRA library.

    python bench/bench_info.py [--quick] [--files 1000] [--repeat 5]

Templates, written once by loratool's own writers from random factors with real shapes:
an SD 1.5 kohya LoRA (every linear / 1×1 module of the U-Net's attention blocks and the CLIP text
encoder, rank 16), an SDXL kohya LoRA (U-Net attention blocks + both text encoders, rank 32) and a
Flux PEFT-style diffusers LoRA (``transformer.*`` names, rank 16), with kohya-style ``ss_*``
metadata. Measured, best of ``--repeat``:

1. One file (the SDXL template): a fresh ``python -c`` that opens the file, unpacks
   the 8-byte length and ``json.loads`` the header (the floor for any tool), against a fresh
   ``python -m loratool info FILE --json``; target ≤ 5×. Also: whether torch was imported
   (it must not be), and ``inspect()`` in-process. Where PYTHONDONTWRITEBYTECODE is set (every fresh
   process then compiles loratool's sources, which no installed copy does), both again with the bytecode
   kept in a temporary PYTHONPYCACHEPREFIX.
2. A folder of ``--files`` LoRAs (60 % SD 1.5, 25 % SDXL, 15 % Flux, each a template's header
   with its own ``ss_output_name``, tensor data left as a sparse hole so the folder costs no
   disk; alpha scalars written for real): a fresh ``loratool info DIR --json``; target
   ≥ 200 files/s.

The load average is printed beside every figure; it never asserts on time. Everything is
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import best_of, load

BARE = ("import json, struct, sys\n"
        "f = open(sys.argv[1], 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n))\n"
        "print(len(h))\n")
TORCH_CHECK = ("import io, sys, contextlib\nfrom loratool.cli import main\n"
               "with contextlib.redirect_stdout(io.StringIO()):\n    rc = main(['info', sys.argv[1], '--json'])\n"
               "print('torch' in sys.modules, rc)\n")


def templates(folder: Path) -> dict[str, Path]:
    """SD 1.5 / SDXL kohya and Flux diffusers LoRAs with real module shapes (see the docstring)."""
    import torch
    from bench_resize import build_lora, clip_shapes, flux_shapes, sdxl_unet_shapes

    from loratool.api import save

    kinds = {
        "sd15": ({"unet": _sd15_unet_shapes(), "text_encoder": clip_shapes(12, 768, 3072)}, 16, "sd1", "kohya"),
        "sdxl": ({"unet": sdxl_unet_shapes(), "text_encoder": clip_shapes(12, 768, 3072),
                  "text_encoder_2": clip_shapes(32, 1280, 5120)}, 32, "sdxl", "kohya"),
        "flux": ({"transformer": flux_shapes()}, 16, "flux", "diffusers"),
    }
    out = {}
    for name, (shapes, rank, family, layout) in kinds.items():
        adapter = build_lora(shapes, rank, rank / 2, torch.float16, seed=len(out))
        adapter.metadata.update({"ss_network_module": "networks.lora", "ss_base_model_version": {
            "sd1": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}[family], "ss_output_name": name,
            "ss_tag_frequency": json.dumps({"10_subject": {"tag": 3, "other": 1}})})
        path = folder / f"{name}.safetensors"
        save(adapter, path, layout, family=family)
        out[name] = path
    return out


def _sd15_unet_shapes() -> list[tuple[str, tuple[int, ...]]]:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    out = []
    for name, mod in unet.named_modules():
        if ".attentions." in name and isinstance(mod, torch.nn.Linear):
            out.append((name, (mod.out_features, mod.in_features)))
        elif ".attentions." in name and isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1):
            out.append((name, (mod.out_channels, mod.in_channels, 1, 1)))
    return out


def sparse_copy(template: Path, dest: Path, output_name: str) -> None:
    """``template``'s header (with another ``ss_output_name``), its one-element tensors, and a hole
    for the rest of the data area."""
    with open(template, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        data_at = 8 + n
        scalars = {}
        for key, info in header.items():
            if key != "__metadata__" and math.prod(info["shape"]) <= 1:
                a, b = info["data_offsets"]
                fh.seek(data_at + a)
                scalars[a] = fh.read(b - a)
        size = os.fstat(fh.fileno()).st_size - data_at
    header["__metadata__"] = dict(header.get("__metadata__", {}), ss_output_name=output_name)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dest, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + size)
        for at, data in scalars.items():
            fh.seek(8 + len(raw) + at)
            fh.write(data)


def fresh(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def cached_bytecode_env(folder: Path) -> dict[str, str]:
    """The environment with bytecode written to (and read from) ``folder``: what an installed copy has,
    where PYTHONDONTWRITEBYTECODE makes every fresh process compile loratool's sources again."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(folder)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 files, 3 repeats")
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeat = min(args.files, 200), 3
    with tempfile.TemporaryDirectory(prefix="loratool-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "t").mkdir()
        t0 = time.perf_counter()
        tpl = templates(tmp / "t")
        print(f"templates written in {time.perf_counter() - t0:.1f} s: " + ", ".join(
            f"{k} {p.stat().st_size / 2**20:.0f} MB" for k, p in tpl.items()) + f"; {load()}")

        big = tpl["sdxl"]
        py = sys.executable
        bare = best_of(lambda: fresh([py, "-c", BARE, str(big)]), args.repeat)
        info = best_of(lambda: fresh([py, "-m", "loratool", "info", str(big), "--json"]), args.repeat)
        torch_used, rc = subprocess.run([py, "-c", TORCH_CHECK, str(big)], capture_output=True, text=True,
                                        check=True).stdout.split()
        from loratool.io.safetensors_file import read_header
        from loratool.ops.inspect import inspect

        header_t = best_of(lambda: read_header(big), args.repeat)
        inspect_t = best_of(lambda: inspect(big), args.repeat)
        print(f"\n== one SDXL kohya LoRA ({big.stat().st_size / 2**20:.0f} MB, "
              f"{len(read_header(big).tensors)} tensors)")
        print(f"  bare-Python header read, fresh process   {bare * 1000:8.1f} ms   ({load()})")
        print(f"  loratool info --json, fresh process      {info * 1000:8.1f} ms   ratio {info / bare:.2f} "
              f"(target ≤ 5); torch imported: {torch_used} (rc {rc})")
        print(f"  in-process: read_header {header_t * 1000:.1f} ms, inspect() {inspect_t * 1000:.1f} ms")
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            env = cached_bytecode_env(tmp / "pycache")
            fresh([py, "-m", "loratool", "info", str(big), "--json"], env)  # writes the bytecode
            bare_c = best_of(lambda: fresh([py, "-c", BARE, str(big)], env), args.repeat)
            info_c = best_of(lambda: fresh([py, "-m", "loratool", "info", str(big), "--json"], env), args.repeat)
            print(f"  PYTHONDONTWRITEBYTECODE is set: each fresh process above compiled loratool's sources; with "
                  f"bytecode cached (an installed copy): bare {bare_c * 1000:.1f} ms, info {info_c * 1000:.1f} ms, "
                  f"ratio {info_c / bare_c:.2f}   ({load()})")

        lib = tmp / "library"
        lib.mkdir()
        mix = ["sd15"] * 12 + ["sdxl"] * 5 + ["flux"] * 3
        t0 = time.perf_counter()
        for i in range(args.files):
            kind = mix[i % len(mix)]
            sub = lib / kind
            sub.mkdir(exist_ok=True)
            sparse_copy(tpl[kind], sub / f"{kind}_{i:04d}.safetensors", f"{kind}_{i:04d}")
        apparent = sum(f.stat().st_size for f in lib.rglob("*.safetensors")) / 2**30
        print(f"\n== folder of {args.files} LoRAs ({apparent:.1f} GiB apparent, sparse; written in "
              f"{time.perf_counter() - t0:.1f} s)")
        scan_t = best_of(lambda: fresh([py, "-m", "loratool", "info", str(lib), "--json"]), max(1, args.repeat // 2))
        print(f"  loratool info DIR --json, fresh process  {scan_t:6.2f} s   {args.files / scan_t:6.0f} files/s "
              f"(target ≥ 200)   ({load()})")
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
