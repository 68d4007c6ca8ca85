"""Resize benchmark: loratool's factor SVD against the usual dense-SVD resize, in one run.

    python bench/bench_resize.py [--sample 20] [--device cpu] [--threads N] [--skip-flux]

* SDXL-shaped kohya LoRA: the real SDXL U-Net attention modules (every Linear / 1×1 conv inside
  a Transformer2DModel, names and shapes from diffusers' ``UNet2DConditionModel`` built with the
  SDXL config on the ``meta`` device) plus both CLIP text encoders (CLIP-L 12×768, CLIP-G 32×1280),
  rank 64, alpha 32, random fp16 factors, resized to rank 16.
* Dense baseline (what kohya's ``resize_lora.py`` does per module): ΔW = up @ down in float32,
  full ``torch.linalg.svd``, keep 16. It is timed on a random sample of modules and
  EXTRAPOLATED to the whole LoRA by the SVD cost model m·n·min(m, n) (labelled as such).
* Flux-shaped rank-32 LoRA (19 double + 38 single blocks, hidden 3072, MLP 12288, diffusers
  names), bf16, resized to rank 16 by loratool: whole-LoRA time.
* Agreement: max over the sampled modules of ‖ΔW_k(dense) − ΔW_k(loratool)‖ / ‖ΔW_k(dense)‖.
* Peak memory: the process's peak RSS.

The script prints; it never asserts on time.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import sys
import time

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.delta import delta_weight
from loratool.ops.linalg import factor_svd
from loratool.ops.resize import resize

RANK_IN, RANK_OUT = 64, 16


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


def flux_shapes(hidden: int = 3072, mlp: int = 12288) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for i in range(19):
        p = f"transformer_blocks.{i}"
        for name in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out"):
            out.append((f"{p}.{name}", (hidden, hidden)))
        for ff in ("ff", "ff_context"):
            out.append((f"{p}.{ff}.net.0.proj", (mlp, hidden)))
            out.append((f"{p}.{ff}.net.2", (hidden, mlp)))
        out.append((f"{p}.norm1.linear", (6 * hidden, hidden)))
        out.append((f"{p}.norm1_context.linear", (6 * hidden, hidden)))
    for i in range(38):
        p = f"single_transformer_blocks.{i}"
        for name in ("attn.to_q", "attn.to_k", "attn.to_v"):
            out.append((f"{p}.{name}", (hidden, hidden)))
        out.append((f"{p}.proj_mlp", (mlp, hidden)))
        out.append((f"{p}.proj_out", (hidden, hidden + mlp)))
        out.append((f"{p}.norm.linear", (3 * hidden, hidden)))
    return out


def build(shapes: dict[str, list], rank: int, alpha: float, dtype: torch.dtype, seed: int) -> Adapter:
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


def dense_resize(module: LoraModule, k: int) -> torch.Tensor:
    """The usual method: dense ΔW, full SVD, keep k. Returns ΔW_k [out, in·k·k]."""
    delta = delta_weight(module, dtype=torch.float32)
    mat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def svd_cost(module: LoraModule) -> float:
    shape = module.weight_shape
    m, n = shape[0], math.prod(shape[1:])
    return float(m) * n * min(m, n)


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", type=int, default=20, help="modules timed for the dense baseline")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-flux", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both methods (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")

    shapes = {"unet": sdxl_unet_shapes(), "text_encoder": clip_shapes(12, 768, 3072),
              "text_encoder_2": clip_shapes(32, 1280, 5120)}
    sdxl = build(shapes, RANK_IN, 32.0, torch.float16, seed=0)
    n_params = sum(t.numel() for m in sdxl.modules.values() for t in m.tensors.values())
    print(f"SDXL-shaped kohya LoRA: {len(sdxl)} modules ({len(shapes['unet'])} U-Net, "
          f"{len(shapes['text_encoder'])} CLIP-L, {len(shapes['text_encoder_2'])} CLIP-G), rank {RANK_IN}, "
          f"{n_params / 1e6:.1f} M parameters (fp16)")

    t0 = time.perf_counter()
    res = resize(sdxl, RANK_OUT, device=args.device)
    ours = time.perf_counter() - t0
    print(f"loratool factor-SVD resize to rank {RANK_OUT}, whole LoRA: {ours:.2f} s "
          f"(mean Frobenius norm kept {res.mean_fro_kept:.4f})")

    rng = random.Random(0)
    modules = list(sdxl.modules.values())
    sample = rng.sample(modules, min(args.sample, len(modules)))
    dense_t = 0.0
    worst = worst_float = 0.0
    for module in sample:
        t0 = time.perf_counter()
        want = dense_resize(module, RANK_OUT)
        dense_t += time.perf_counter() - t0
        got = delta_weight(res.adapter.modules[module.key], dtype=torch.float32)
        got = got.reshape(got.shape[0], -1)
        worst = max(worst, float((got - want).norm() / want.norm()))
        svd = factor_svd(module.tensors["up"].reshape(module.tensors["up"].shape[0], -1),
                         module.tensors["down"].reshape(RANK_IN, -1), module.scale, rank=RANK_OUT)
        ours_float = ((svd.U * svd.S) @ svd.Vh).float()
        worst_float = max(worst_float, float((ours_float - want).norm() / want.norm()))
    cost_all = sum(svd_cost(m) for m in modules)
    cost_sample = sum(svd_cost(m) for m in sample)
    dense_all = dense_t * cost_all / cost_sample
    print(f"dense-SVD resize (form ΔW + torch.linalg.svd), measured on {len(sample)} sampled modules: "
          f"{dense_t:.2f} s")
    print(f"dense-SVD resize, whole LoRA EXTRAPOLATED by m·n·min(m,n): {dense_all:.1f} s "
          f"({dense_all / 60:.1f} min)")
    print(f"speed-up (extrapolated dense / measured loratool): {dense_all / ours:.0f}×")
    print(f"agreement on the sampled modules, max ‖ΔW_k(dense) − ΔW_k(loratool)‖ / ‖ΔW_k(dense)‖: "
          f"{worst_float:.2e} before the fp16 cast, {worst:.2e} as stored in fp16")
    del res, sdxl

    if not args.skip_flux:
        flux = build({"transformer": flux_shapes()}, 32, 32.0, torch.bfloat16, seed=1)
        print(f"Flux-shaped LoRA: {len(flux)} modules, rank 32 (bf16)")
        t0 = time.perf_counter()
        fres = resize(flux, RANK_OUT, device=args.device)
        print(f"loratool resize of the whole Flux-shaped rank-32 LoRA to rank {RANK_OUT}: "
              f"{time.perf_counter() - t0:.2f} s (mean Frobenius norm kept {fres.mean_fro_kept:.4f})")
        del fres, flux
    print(f"peak RSS: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
