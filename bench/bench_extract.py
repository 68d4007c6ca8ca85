"""Time ``loratool extract`` on SDXL- and Flux-shaped weight pairs: randomized solver vs full SVD.

Each pair is written to two safetensors files (base, fine-tune = base + a delta with a slowly
decaying spectrum plus noise, like real fine-tune deltas), then extracted twice in the same run:
with loratool's randomized solver and with ``exact=True`` (full SVD). Reports wall time, the
speed-up, every module's error against the optimal rank-N error (from the full SVD's singular
values) and the peak resident memory. It prints; it never asserts a time.

    python bench/bench_extract.py                 # a representative subset (minutes on 2 cores)
    python bench/bench_extract.py --family flux --count 2 --rank 16
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loratool.ops.extract import extract

# (name, shape, how many the whole model holds) — SDXL U-Net and Flux.1 transformer weights.
SHAPES = {
    "sdxl": [
        ("attn 640", (640, 640), 140),
        ("attn 1280", (1280, 1280), 560),
        ("cross k/v 640x2048", (640, 2048), 40),
        ("cross k/v 1280x2048", (1280, 2048), 140),
        ("ff GEGLU proj 10240x1280", (10240, 1280), 70),
        ("ff out 1280x5120", (1280, 5120), 70),
        ("conv 3x3 1280", (1280, 1280, 3, 3), 20),
        ("conv 3x3 640", (640, 640, 3, 3), 10),
    ],
    "flux": [
        ("attn 3072", (3072, 3072), 152),
        ("qkv 9216x3072", (9216, 3072), 57),
        ("mlp in 12288x3072", (12288, 3072), 38),
        ("mlp out 3072x12288", (3072, 12288), 38),
    ],
}


def planted_delta(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A fine-tune-like ΔW: σᵢ ∝ i^-0.7 over a 128-dim subspace, plus small dense noise."""
    out = shape[0]
    inner = math.prod(shape[1:])
    k = min(128, out, inner)
    u = torch.randn(out, k, generator=gen) / math.sqrt(out)
    v = torch.randn(k, inner, generator=gen) / math.sqrt(inner)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.7
    delta = (u * s) @ v * 1e-2 + torch.randn(out, inner, generator=gen) * 1e-5
    return delta.reshape(shape)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_pair(folder: Path, family: str, count: int, seed: int) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(seed)
    base, ft = {}, {}
    for name, shape, total in SHAPES[family]:
        for j in range(min(count, total)):
            key = f"{name.replace(' ', '_').replace('/', '_')}.{j}.weight"
            w = torch.randn(shape, generator=gen) * 0.02
            base[key] = w
            ft[key] = w + planted_delta(shape, gen)
    save_file(base, str(folder / "base.safetensors"))
    save_file(ft, str(folder / "ft.safetensors"))
    return folder / "ft.safetensors", folder / "base.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["sdxl", "flux", "both"], default="both")
    ap.add_argument("--count", type=int, default=1, help="weights of each shape (the real models hold more)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    families = ["sdxl", "flux"] if args.family == "both" else [args.family]
    for family in families:
        with tempfile.TemporaryDirectory() as tmp:
            ft, base = build_pair(Path(tmp), family, args.count, seed=0)
            rss0 = peak_rss_mb()
            t0 = time.perf_counter()
            fast = extract(ft, base, rank=args.rank, device=args.device)
            t_fast = time.perf_counter() - t0
            rss_fast = peak_rss_mb()
            t0 = time.perf_counter()
            slow = extract(ft, base, rank=args.rank, device=args.device, exact=True)
            t_slow = time.perf_counter() - t0
        print(f"\n== {family}: {len(fast.modules)} weight pairs, rank {args.rank}, device {fast.device}")
        print(f"{'module':34} {'shape':>22} {'err/optimal':>12} {'captured':>9}")
        worst = 0.0
        for m_fast, m_slow in zip(fast.modules, slow.modules):
            # the exact run's relative error is the optimal one (Eckart–Young, up to float32 rounding)
            ratio = m_fast.rel_error / m_slow.rel_error if m_slow.rel_error > 0 else 1.0
            worst = max(worst, ratio)
            print(f"{m_fast.path:34} {str(list(m_fast.shape)):>22} {ratio:12.5f} {m_fast.captured:9.4f}")
        print(f"randomized: {t_fast:8.2f} s   full SVD: {t_slow:8.2f} s   speed-up {t_slow / t_fast:6.1f}x")
        print(f"worst module error / optimal: {worst:.5f} (target ≤ 1.01)")
        per_module = {name: total for name, _, total in SHAPES[family]}
        scale = sum(per_module.values()) / max(1, len(fast.modules))
        print(f"whole-model estimate (×{scale:.0f}): randomized {t_fast * scale:7.0f} s, full {t_slow * scale:7.0f} s")
        print(f"peak RSS: {rss0:.0f} MB after building the pair in memory, {rss_fast:.0f} MB after the "
              f"randomized run (extraction reads one pair at a time, so it should not raise the peak)")


if __name__ == "__main__":
    main()
