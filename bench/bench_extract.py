"""Time ``loratool extract`` against a plain single-threaded script, idle and with one core busy.

    python bench/bench_extract.py [--quick] [--threads N] [--repeat 2] [--whole-model [--family flux]]

1. Files, end to end (the default): one weight of every distinct SDXL U-Net shape as fp16
   safetensors pairs (base, and base + a fine-tune-like ΔW), through :func:`loratool.ops.extract.extract`
   with its thread policy, against the script a user would write: load both files, per weight
   ΔW in float32, the same randomized SVD (:func:`~loratool.ops.randomized_svd.truncated_svd`,
   same seed), factors and their error, with ``torch.set_num_threads(1)``; and the same script
   with the full SVD (the classic method, for scale). Each idle and again while a child process
   spins one core (started and stopped here). Target: loratool / single-threaded script ≤ 1.3
   in both cases.
2. ``--whole-model``: every 2-D/4-D weight of the SDXL U-Net (794 weights, 2.57 B parameters) or
   the Flux.1 transformer (504 weights, 11.9 B), with their real shapes (table below, read off
   diffusers' ``UNet2DConditionModel`` with the SDXL config and ``FluxTransformer2DModel``), gets
   a fine-tune-like ΔW and goes through the per-module maths of ``extract``: ‖ΔW‖², the
   truncated SVD, up/down and the error of up·down. Every module is timed with the randomized
   solver (``--fraction`` < 1 takes an evenly spread subset and says it extrapolates); the full
   SVD runs on two weights of every distinct shape and is extrapolated by shape counts (labelled
   as such). ΔW per module: a random signed permutation of rows and columns of one of two
   reference deltas per shape, so its singular values are exactly the reference's and every
   module's optimal rank-k error is known from one full SVD of each reference (untimed):
   "steep" σᵢ ∝ i^-1 on a 256-dim subspace + a flat Gaussian bulk with 20 % of the energy, and
   "flat" σᵢ ∝ i^-0.4 + a bulk with 50 % of the energy (rank 16 keeps ~35–70 % of ‖ΔW‖, like
   real full fine-tunes).

The load average is printed beside every figure; it never asserts a time. Peak RSS is the
process's high-water mark. ``--quick``: a third of the shapes, one repeat, no full-SVD script.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_common import CASES, best_of, load, one_core_busy, peak_rss_mb
from safetensors.torch import save_file

from loratool.ops.extract import extract
from loratool.ops.randomized_svd import exact_svd, frobenius_sq, truncated_svd

# (shape, how many the model holds): all weights with ≥ 2 dims (what extract factors).
SDXL_UNET = [
    ((10240, 1280), 60), ((1280, 1280), 381), ((1280, 5120), 60), ((1280, 2048), 120), ((1280, 1280, 3, 3), 11),
    ((1280, 2560, 3, 3), 2), ((5120, 640), 10), ((640, 640, 3, 3), 8), ((640, 640), 70), ((640, 2048), 20),
    ((1280, 1920, 3, 3), 1), ((640, 2560), 10), ((640, 1920, 3, 3), 1), ((320, 320, 3, 3), 8),
    ((1280, 640, 3, 3), 1), ((640, 1280, 3, 3), 1), ((1280, 2560, 1, 1), 2), ((640, 960, 3, 3), 1), ((640, 1280), 5),
    ((320, 640, 3, 3), 2), ((1280, 2816), 1), ((320, 960, 3, 3), 1), ((1280, 1920, 1, 1), 1), ((320, 1280), 5),
    ((640, 320, 3, 3), 1), ((640, 1920, 1, 1), 1), ((1280, 640, 1, 1), 1), ((640, 1280, 1, 1), 1),
    ((640, 960, 1, 1), 1), ((1280, 320), 1), ((320, 640, 1, 1), 2), ((320, 960, 1, 1), 1), ((640, 320, 1, 1), 1),
    ((320, 4, 3, 3), 1), ((4, 320, 3, 3), 1),
]
FLUX = [
    ((12288, 3072), 76), ((3072, 3072), 269), ((18432, 3072), 38), ((3072, 15360), 38), ((3072, 12288), 38),
    ((9216, 3072), 38), ((6144, 3072), 1), ((3072, 4096), 1), ((3072, 768), 1), ((3072, 256), 2), ((3072, 64), 1),
    ((64, 3072), 1),
]
FAMILIES = {"sdxl": SDXL_UNET, "flux": FLUX}
SPECTRA = {"steep": (1.0, 0.2), "flat": (0.4, 0.5)}  # name: (power-law exponent, bulk energy share)


def reference_delta(m: int, n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """[m, n] float32: a power law on a 256-dim random subspace plus a Gaussian bulk (see the module doc)."""
    alpha, bulk_share = SPECTRA[kind]
    r = min(256, m, n)
    u = torch.randn(m, r, generator=gen) / math.sqrt(m)
    v = torch.randn(r, n, generator=gen) / math.sqrt(n)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -alpha
    planted = (u * s) @ v
    bulk = torch.randn(m, n, generator=gen)
    e_p, e_b = frobenius_sq(planted), frobenius_sq(bulk)
    scale = math.sqrt(bulk_share / (1 - bulk_share) * e_p / e_b)
    return planted.add_(bulk, alpha=scale).mul_(1e-3)


def signed_permutation(d: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """P_r D P_c with random signs: the same singular values, other singular vectors."""
    m, n = d.shape
    rows, cols = torch.randperm(m, generator=gen), torch.randperm(n, generator=gen)
    sign = torch.randint(0, 2, (m, 1), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    return d[rows][:, cols].mul_(sign)


def module_work(matrix: torch.Tensor, rank: int, exact: bool, gen: torch.Generator) -> tuple[float, int, str]:
    """What extract does per weight after ΔW: energy, SVD, factors, error of the factors. (error, steps, solver)"""
    total = frobenius_sq(matrix)
    svd = truncated_svd(matrix, rank, exact=exact, generator=gen, total_energy=total)
    root = svd.S[:rank].sqrt()
    up, down = svd.U[:, :rank] * root, root[:, None] * svd.Vh[:rank]
    err = math.sqrt(frobenius_sq((up @ down).sub_(matrix)))
    return err, svd.power_iters, svd.solver


def whole_model(family: str, rank: int, fraction: float, seed: int) -> None:
    shapes = FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    n_all = sum(c for _, c in shapes)
    params = sum(math.prod(s) * c for s, c in shapes)
    print(f"\n== {family}: whole model, solver only, rank {rank}: {n_all} weights, {params / 1e9:.2f} B parameters")
    print(f"   before: {load()}")
    t_rand = t_rand_all = t_full_est = 0.0
    n_rand = n_full = 0
    worst, worst_at = 0.0, ""
    steps: list[int] = []
    fallbacks = 0
    print(f"{'shape':>22} {'count':>5} {'timed':>5} {'rand s':>8} {'full s/w':>9} {'steps':>9} {'worst err/opt':>14}")
    for shape, count in shapes:
        m, n = shape[0], math.prod(shape[1:])
        # Full SVD, timed on one weight per reference spectrum (2 per shape), extrapolated to `count`;
        # its singular values (float32 LAPACK, ~1e-7·σ₁) give every module's optimal rank-k error.
        refs, optimal, full_times = {}, {}, []
        for kind in SPECTRA:
            refs[kind] = reference_delta(m, n, kind, gen)
            d = signed_permutation(refs[kind], gen)
            t0 = time.perf_counter()
            svd = exact_svd(d, min(m, n), frobenius_sq(d))
            root = svd.S[:rank].sqrt()
            err = math.sqrt(frobenius_sq(((svd.U[:, :rank] * root) @ (root[:, None] * svd.Vh[:rank])).sub_(d)))
            full_times.append(time.perf_counter() - t0)
            # below ~1e-6·‖ΔW‖ (rank ≥ the short side) float32 rounding is all there is: count as optimal
            optimal[kind] = max(float(svd.S.double()[rank:].square().sum().sqrt()), 1e-6 * math.sqrt(svd.total_energy))
            del d, svd
            assert err <= 1.0001 * optimal[kind], "the full SVD itself is off"
        full_each = sum(full_times) / len(full_times)
        # randomized: every weight (or an evenly spread `fraction` of them)
        timed = max(1, round(count * fraction))
        picks = sorted({int(i * count / timed) for i in range(timed)})
        t_shape, s_shape, w_shape = 0.0, [], 0.0
        for j in picks:
            kind = list(SPECTRA)[j % 2]
            d = signed_permutation(refs[kind], gen)
            t0 = time.perf_counter()
            err, st, solver = module_work(d, rank, False, gen)
            t_shape += time.perf_counter() - t0
            fallbacks += solver == "exact" and min(m, n) > 256
            s_shape.append(st)
            ratio = err / optimal[kind]
            w_shape = max(w_shape, ratio)
            if ratio > worst:
                worst, worst_at = ratio, f"{list(shape)} {kind}"
        del refs
        t_rand += t_shape
        t_rand_all += t_shape * count / len(picks)
        n_rand += len(picks)
        n_full += len(full_times)
        t_full_est += full_each * count
        steps += s_shape
        print(f"{str(list(shape)):>22} {count:5d} {len(picks):5d} {t_shape:8.2f} {full_each:9.2f} "
              f"{min(s_shape):4d}-{max(s_shape):<4d} {w_shape:14.5f}")
    print(f"   after: {load()}")
    label = "measured" if n_rand == n_all else f"extrapolated from {n_rand} timed weights"
    print(f"randomized: {t_rand:.1f} s for {n_rand} weights; whole model {t_rand_all:.1f} s ({label})")
    print(f"   half steps (products with ΔW) per weight: mean {sum(steps) / len(steps):.2f}, max {max(steps)}; "
          f"full-SVD fallbacks: {fallbacks}")
    print(f"full SVD: timed on {n_full} weights (one per reference spectrum and shape); whole model "
          f"{t_full_est:.0f} s (extrapolated by shape counts)")
    print(f"speed-up (whole model, full SVD / randomized): {t_full_est / t_rand_all:.1f}x")
    print(f"worst module error / optimal rank-{rank} error: {worst:.5f} at {worst_at} (target ≤ 1.01)")
    print(f"peak RSS so far: {peak_rss_mb():.0f} MB (largest ΔW here: "
          f"{max(math.prod(s) for s, _ in shapes) * 4 / 2**20:.0f} MB in float32)")


def write_pair(folder: Path, shapes: list[tuple[tuple[int, ...], int]], seed: int) -> tuple[Path, Path]:
    """One weight of each shape as fp16 safetensors: base and fine-tune (base + a "flat" ΔW)."""
    gen = torch.Generator().manual_seed(seed)
    base, ft = {}, {}
    for i, (shape, _) in enumerate(shapes):
        m, n = shape[0], math.prod(shape[1:])
        w = torch.randn(shape, generator=gen) * 0.02
        base[f"w{i}.weight"] = w.half()
        ft[f"w{i}.weight"] = (w + reference_delta(m, n, "flat", gen).reshape(shape) * 10).half()
    f_base, f_ft = folder / "base.safetensors", folder / "ft.safetensors"
    save_file(base, str(f_base))
    save_file(ft, str(f_ft))
    return f_ft, f_base


def baseline_extract(f_ft: Path, f_base: Path, rank: int, exact: bool, seed: int) -> int:
    """The plain script: load both files, per weight ΔW in float32, the same SVD routine, factors and
    their error; ``torch.set_num_threads(1)``."""
    from safetensors.torch import load_file

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = load_file(str(f_ft)), load_file(str(f_base))
        gen = torch.Generator().manual_seed(seed)
        for key in a:
            d = a[key].float().sub_(b[key].float())
            module_work(d.reshape(d.shape[0], -1), rank, exact, gen)
    finally:
        torch.set_num_threads(before)
    return len(a)


def versus(shapes, rank: int, args) -> None:
    """extract() against the single-threaded script, idle and with one core busy."""
    with tempfile.TemporaryDirectory(prefix="loratool-bench-") as tmp:
        f_ft, f_base = write_pair(Path(tmp), shapes, args.seed)
        mb = f_base.stat().st_size / 2**20
        print(f"\n== extract of one weight of each of {len(shapes)} SDXL shapes ({mb:.0f} MB fp16 per file), "
              f"rank {rank}: loratool vs the single-threaded script (same randomized SVD; target ratio ≤ 1.3)")
        worst = 0.0
        for case, busy in CASES:
            with one_core_busy(busy):
                base = best_of(lambda: baseline_extract(f_ft, f_base, rank, False, args.seed), args.repeat)
                full = best_of(lambda: baseline_extract(f_ft, f_base, rank, True, args.seed), 1) if args.full else None
                ours = best_of(lambda: extract(f_ft, f_base, rank=rank, device="cpu", seed=args.seed,
                                               threads=args.threads), args.repeat)
                state = load()
            worst = max(worst, ours / base)
            extra = f"   full-SVD script {full:6.2f} s ({full / ours:.1f}× loratool)" if full is not None else ""
            print(f"  {case:<14} script {base:6.2f} s   loratool {ours:6.2f} s   ratio {ours / base:5.2f}{extra}   "
                  f"({state})", flush=True)
        print(f"  worst ratio {worst:.2f} (target ≤ 1.3)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a third of the shapes, one repeat, no full-SVD run")
    ap.add_argument("--family", choices=["sdxl", "flux", "both"], default="sdxl")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--whole-model", action="store_true",
                    help="also the whole-model solver comparison (randomized vs full SVD, ~10 min on 2 cores)")
    ap.add_argument("--fraction", type=float, default=1.0, help="share of each shape's weights run randomized")
    ap.add_argument("--threads", type=int, default=None, help="loratool --threads (default: its policy)")
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs per timing")
    ap.add_argument("--no-full", dest="full", action="store_false", help="skip the full-SVD script")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.full = 1, False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {load()}")
    shapes = SDXL_UNET[::3] if args.quick else SDXL_UNET
    versus(shapes, args.rank, args)
    if args.whole_model:
        for family in (["sdxl", "flux"] if args.family == "both" else [args.family]):
            whole_model(family, args.rank, args.fraction, args.seed)
    print(f"\npeak RSS: {peak_rss_mb():.0f} MB; {load()}")


if __name__ == "__main__":
    main()
