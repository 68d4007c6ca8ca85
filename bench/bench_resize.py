"""Resize benchmark: loratool against a plain single-threaded factor-SVD script, idle and with one
core busy, plus SDXL-shaped LoKr / LoHa files and the dense-SVD method for scale.

    python bench/bench_resize.py [--quick] [--threads N] [--repeat 2] [--sample 6]

Inputs (random factors, real shapes):

* SDXL-shaped kohya LoRA: every Linear / 1×1 conv inside the SDXL U-Net's Transformer2DModels
  (names and shapes from diffusers' ``UNet2DConditionModel`` with the SDXL config on the ``meta``
  device) plus both CLIP text encoders, rank 64, alpha 32, fp16 → rank 16.
* Flux-shaped LoRA: 19 double + 38 single blocks (hidden 3072, MLP 12288), rank 32, bf16 → rank 8.
* SDXL-shaped LyCORIS LoKr and LoHa files: the same modules, shapes exactly as LyCORIS 4.1.3's own
  ``LokrModule`` / ``LohaModule`` build them (dim 16, factor -1; some LoKr modules fall back to
  LyCORIS' full-matrix mode), written by loratool's kohya writer, resized to rank 16 end to end.

Measured in one run, each case idle and again while a child process spins one core (started and
stopped by this script):

* baseline: the plain script a user would write — per module, QR of up and of downᵀ, SVD of the
  r×r core, keep k, split √σ onto both sides — float64, ``torch.set_num_threads(1)``;
* loratool: :func:`loratool.ops.resize.resize` with its default thread policy (``--threads``).

Printed: best-of-``--repeat`` seconds, the ratio loratool / baseline (target ≤ 1.3 in both
cases), the whole-file times (target: SDXL and Flux < 10 s, LoKr / LoHa < 30 s), and the dense
method (form ΔW, full SVD) timed on ``--sample`` modules and EXTRAPOLATED by m·n·min(m, n)
(labelled as such). The load average is printed beside every figure. It never asserts on time.
``--quick``: the U-Net part of SDXL only, a third of Flux, one repeat, no dense sample (~1 min).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import CASES, best_of, load, one_core_busy, peak_rss_mb

from loratool.adapter import Adapter, LoraModule
from loratool.api import save
from loratool.delta import delta_weight
from loratool.ops.resize import resize, resize_file


def sdxl_unet_shapes() -> list[tuple[str, tuple[int, ...]]]:
    from diffusers import UNet2DConditionModel

    cfg = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    out = []
    for name, mod in unet.named_modules():
        if ".attentions." not in name:
            continue
        if isinstance(mod, torch.nn.Linear):
            out.append((name, (mod.out_features, mod.in_features)))
        elif isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1):
            out.append((name, (mod.out_channels, mod.in_channels, 1, 1)))
    return out


def clip_shapes(layers: int, hidden: int, mlp: int) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.append((f"text_model.encoder.layers.{i}.self_attn.{proj}", (hidden, hidden)))
        out.append((f"text_model.encoder.layers.{i}.mlp.fc1", (mlp, hidden)))
        out.append((f"text_model.encoder.layers.{i}.mlp.fc2", (hidden, mlp)))
    return out


def flux_shapes(hidden: int = 3072, mlp: int = 12288, double: int = 19, single: int = 38):
    out = []
    for i in range(double):
        p = f"transformer_blocks.{i}"
        for name in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out"):
            out.append((f"{p}.{name}", (hidden, hidden)))
        for ff in ("ff", "ff_context"):
            out.append((f"{p}.{ff}.net.0.proj", (mlp, hidden)))
            out.append((f"{p}.{ff}.net.2", (hidden, mlp)))
        out.append((f"{p}.norm1.linear", (6 * hidden, hidden)))
        out.append((f"{p}.norm1_context.linear", (6 * hidden, hidden)))
    for i in range(single):
        p = f"single_transformer_blocks.{i}"
        for name in ("attn.to_q", "attn.to_k", "attn.to_v"):
            out.append((f"{p}.{name}", (hidden, hidden)))
        out.append((f"{p}.proj_mlp", (mlp, hidden)))
        out.append((f"{p}.proj_out", (hidden, hidden + mlp)))
        out.append((f"{p}.norm.linear", (3 * hidden, hidden)))
    return out


def build_lora(shapes: dict[str, list], rank: int, alpha: float, dtype: torch.dtype, seed: int) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(source_format="kohya", metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    for component, entries in shapes.items():
        for path, shape in entries:
            out_f, in_f = shape[0], shape[1]
            layer = "conv" if len(shape) == 4 else "linear"
            down = torch.randn(rank, in_f, *shape[2:], generator=gen) / math.sqrt(in_f)
            up = torch.randn(out_f, rank, *([1, 1] if layer == "conv" else []), generator=gen) * 0.1
            adapter.add(LoraModule(component, path, layer=layer, alpha=alpha,
                                   tensors={"down": down.to(dtype), "up": up.to(dtype)}))
    return adapter


_LYCORIS_SLOTS = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
                  "lokr_w2_b": "w2b", "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b"}


def build_lycoris(shapes: dict[str, list], algo: str, dim: int, seed: int) -> Adapter:
    """Modules shaped exactly as LyCORIS' own LokrModule / LohaModule build them, random values."""
    import logging

    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    cls = LokrModule if algo == "lokr" else LohaModule
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(source_format="lycoris", metadata={"ss_network_module": "lycoris.kohya",
                                                         "ss_network_dim": str(dim), "ss_network_alpha": str(dim)})
    for component, entries in shapes.items():
        for path, shape in entries:
            with torch.device("meta"):
                org = torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else torch.nn.Conv2d(shape[1], shape[0], 1)
            lyco = cls("x", org, 1.0, dim, dim, factor=-1)
            tensors = {}
            for key, value in lyco.state_dict().items():
                if key in _LYCORIS_SLOTS:
                    t = torch.randn(tuple(value.shape), generator=gen) / math.sqrt(max(value.shape[-1], 1))
                    tensors[_LYCORIS_SLOTS[key]] = t.half()
            layer = "conv" if len(shape) == 4 else "linear"
            adapter.add(LoraModule(component, path, kind=algo, layer=layer, alpha=float(dim), tensors=tensors,
                                   hints={"weight_shape": shape}))
    return adapter


def baseline_resize(adapter: Adapter, k: int) -> int:
    """The plain script: per module QR + QR + r×r SVD in float64, one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m in adapter:
            up = m.tensors["up"].double().reshape(m.tensors["up"].shape[0], -1)
            down = m.tensors["down"].double().reshape(m.rank, -1)
            qu, ru = torch.linalg.qr(up)
            qd, rd = torch.linalg.qr(down.T)
            uc, s, vch = torch.linalg.svd((ru @ rd.T) * m.scale, full_matrices=False)
            root = s[:k].sqrt()
            new_up, new_down = ((qu @ uc[:, :k]) * root).to(m.dtype), (root[:, None] * (vch[:k] @ qd.T)).to(m.dtype)
            del new_up, new_down
    finally:
        torch.set_num_threads(before)
    return len(adapter)


def dense_extrapolated(adapter: Adapter, k: int, sample: int) -> tuple[float, int]:
    """Form ΔW, full SVD, keep k, on a random sample; extrapolated by m·n·min(m, n)."""
    modules = list(adapter)
    picks = random.Random(0).sample(modules, min(sample, len(modules)))

    def cost(m: LoraModule) -> float:
        s = m.weight_shape
        a, b = s[0], math.prod(s[1:])
        return float(a) * b * min(a, b)

    t = 0.0
    for m in picks:
        t0 = time.perf_counter()
        d = delta_weight(m, dtype=torch.float32)
        u, s, vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
        (u[:, :k] * s[:k]) @ vh[:k]
        t += time.perf_counter() - t0
    return t * sum(cost(m) for m in modules) / sum(cost(m) for m in picks), len(picks)


def versus(label: str, adapter: Adapter, k: int, args) -> list[float]:
    """loratool vs baseline, idle and with one core busy; returns the ratios."""
    ratios = []
    for case, busy in CASES:
        with one_core_busy(busy):
            base = best_of(lambda: baseline_resize(adapter, k), args.repeat)
            ours = best_of(lambda: resize(adapter, k, device=args.device, threads=args.threads), args.repeat)
            state = load()
        ratios.append(ours / base)
        print(f"  {label:<34} {case:<14} baseline {base:6.2f} s   loratool {ours:6.2f} s   "
              f"ratio {ours / base:5.2f}   ({state})", flush=True)
    return ratios


def whole_file(label: str, adapter: Adapter, k: int, args, tmp: Path, family: str | None) -> float:
    src = tmp / f"{label}.safetensors"
    save(adapter, src, "kohya", family=family)
    out = tmp / f"{label}_r{k}.safetensors"
    t0 = time.perf_counter()
    res = resize_file(src, out, k, device=args.device, threads=args.threads, force=True, family=family)
    t = time.perf_counter() - t0
    methods: dict[str, int] = {}
    for m in res.modules:
        methods[m.method] = methods.get(m.method, 0) + 1
    print(f"  {label:<34} whole file {src.stat().st_size / 2**20:7.1f} MB → rank {k}: {t:6.2f} s   "
          f"({len(res.modules)} modules, methods {methods}, mean ‖ΔW‖ kept {res.mean_fro_kept:.4f}; {load()})",
          flush=True)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs, one repeat, no dense sample")
    ap.add_argument("--threads", type=int, default=None, help="loratool --threads (default: its policy)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs per timing")
    ap.add_argument("--sample", type=int, default=6, help="modules timed for the dense-SVD extrapolation")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.sample = 1, 0
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch default {torch.get_num_threads()} threads, "
          f"device {args.device}; {load()}")
    unet = sdxl_unet_shapes()
    sdxl_shapes = {"unet": unet} if args.quick else {
        "unet": unet, "text_encoder": clip_shapes(12, 768, 3072), "text_encoder_2": clip_shapes(32, 1280, 5120)}
    flux = {"transformer": flux_shapes(double=6, single=13) if args.quick else flux_shapes()}
    sdxl = build_lora(sdxl_shapes, 64, 32.0, torch.float16, seed=0)
    flux_lora = build_lora(flux, 32, 32.0, torch.bfloat16, seed=1)
    print(f"SDXL-shaped LoRA: {len(sdxl)} modules, rank 64 fp16; Flux-shaped LoRA: {len(flux_lora)} modules, "
          f"rank 32 bf16{' (--quick: U-Net only, a third of Flux)' if args.quick else ''}")

    print("\n== maths only (in memory): loratool resize vs the single-threaded factor-SVD script (target ≤ 1.3)")
    ratios = versus("SDXL r64 → 16", sdxl, 16, args) + versus("Flux r32 → 8", flux_lora, 8, args)
    print(f"  worst ratio {max(ratios):.2f} (target ≤ 1.3)")

    with tempfile.TemporaryDirectory(prefix="loratool-bench-") as tmp:
        tmp = Path(tmp)
        print("\n== whole files (read, resize, write), idle (target: LoRA < 10 s, LoKr / LoHa < 30 s)")
        whole_file("sdxl_lora_r64", sdxl, 16, args, tmp, "sdxl")
        whole_file("flux_lora_r32", flux_lora, 8, args, tmp, "flux")
        lyco = {}
        for algo in ("lokr", "loha"):
            lyco[algo] = build_lycoris(sdxl_shapes, algo, 16, seed=2)
            whole_file(f"sdxl_{algo}_dim16", lyco[algo], 16, args, tmp, "sdxl")
    if args.sample:
        print(f"\n== for scale: the dense method (ΔW + full SVD), timed on {args.sample} sampled modules, "
              f"EXTRAPOLATED by m·n·min(m,n)")
        for label, adapter, k in (("SDXL LoRA r64 → 16", sdxl, 16), ("SDXL LoKr → 16", lyco["lokr"], 16),
                                  ("SDXL LoHa → 16", lyco["loha"], 16)):
            t, n = dense_extrapolated(adapter, k, args.sample)
            print(f"  {label:<34} dense whole adapter ≈ {t:7.1f} s (extrapolated from {n} modules; {load()})")
    print(f"\npeak RSS {peak_rss_mb():.0f} MB; {load()}")


if __name__ == "__main__":
    sys.exit(main())
