"""``--as-lora`` against PEFT 0.21's ``convert_to_lora`` on the same PEFT LoHa / LoKr adapters, in one run.

    python bench/bench_as_lora.py [--layers 8] [--dim 1024] [--rank 8] [--threads N]

A stack of ``--layers`` Linear(dim, dim) layers gets a PEFT LoHa (r, alpha = r) and a PEFT LoKr
(r, factor 16, w1 whole, w2 factorised) adapter with random factors. Each is converted to plain
LoRA twice:

* PEFT: ``peft.convert_to_lora(model, rank)``: dense ΔW = get_delta_weight(), float32 SVD, truncate;
* loratool: :func:`loratool.ops.as_lora.as_lora` on the same tensors (LoHa hada_w1_a/b, hada_w2_a/b;
  LoKr lokr_w1, lokr_w2_a/b, PEFT's scale alpha / r), exact factor forms and their SVD, no dense ΔW.

at the exact rank (LoHa r², LoKr rank(w1)·r: both tools should be exact) and at a lower rank (both
should reach the Eckart–Young optimum). Printed per case: time of each tool, the ratio, and the
worst relative ΔW error ‖ΔW − B·A‖ / ‖ΔW‖ over the layers, measured here in float64 on each tool's
written factors, beside the load average. The script prints; it never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _model(layers: int, dim: int):
    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)])

    return Stack()


def _peft_model(kind: str, layers: int, dim: int, rank: int):
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    torch.manual_seed(0)
    cfg = (LoHaConfig(r=rank, alpha=rank, target_modules=["0", "1", "2", "3", "4", "5", "6", "7"][:layers])
           if kind == "loha" else
           LoKrConfig(r=rank, alpha=rank, decompose_factor=16, target_modules=[str(i) for i in range(layers)]))
    model = get_peft_model(_model(layers, dim), cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _adapter(model, kind: str):
    """The same adapter as loratool modules (PEFT's LoHa / LoKr tensors; scale = PEFT's alpha / r)."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer

    from loratool.adapter import Adapter, LoraModule

    ad = Adapter(source_format="peft")
    for name, mod in model.named_modules():
        if isinstance(mod, LoHaLayer) and "default" in mod.hada_w1_a:
            t = {"w1a": mod.hada_w1_a["default"], "w1b": mod.hada_w1_b["default"],
                 "w2a": mod.hada_w2_a["default"], "w2b": mod.hada_w2_b["default"]}
            r = t["w1b"].shape[0]
        elif isinstance(mod, LoKrLayer) and "default" in mod.lokr_w1:
            t = {"w1": mod.lokr_w1["default"], "w2a": mod.lokr_w2_a["default"], "w2b": mod.lokr_w2_b["default"]}
            r = t["w2b"].shape[0]
        else:
            continue
        t = {k: v.detach().clone() for k, v in t.items()}
        ad.add(LoraModule("model", name.removeprefix("base_model.model."), kind=kind, tensors=t,
                          alpha=mod.scaling["default"] * r))
    return ad


def _worst_error(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    from peft.tuners.tuners_utils import BaseTunerLayer

    worst = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, BaseTunerLayer) or name not in factors:
            continue
        want = mod.get_delta_weight("default").detach().double()
        up, down = factors[name]
        worst = max(worst, float((up.double() @ down.double() - want).norm() / want.norm()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import convert_to_lora

    from loratool.ops.as_lora import as_lora

    print(f"{args.layers} × Linear({args.dim}, {args.dim}), rank {args.rank}, torch threads {torch.get_num_threads()}")
    for kind in ("loha", "lokr"):
        model = _peft_model(kind, args.layers, args.dim, args.rank)
        adapter = _adapter(model, kind)
        # LoHa: rank ≤ r²; LoKr (factor 16): kron(w1 [16, 16] whole, w2a @ w2b of rank r): rank ≤ 16·r
        exact = min(args.rank ** 2 if kind == "loha" else 16 * args.rank, args.dim)
        for target in (exact, max(1, exact // 4)):
            t0 = time.perf_counter()
            _, state = convert_to_lora(model, rank=target)
            t_peft = time.perf_counter() - t0
            peft_f = {}
            for key, v in state.items():
                if key.endswith(".lora_A.weight"):
                    name = key[: -len(".lora_A.weight")]
                    peft_f[name] = (state[name + ".lora_B.weight"], v)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            res = as_lora(adapter, rank=target, device="cpu")
            t_ours = time.perf_counter() - t0
            ours_f = {}
            for m in res.adapter:
                ours_f["base_model.model." + m.path] = (m.tensors["up"] * m.scale, m.tensors["down"])
            print(f"{kind} rank {target:5d}: PEFT {t_peft:7.3f} s, worst rel. error {_worst_error(model, peft_f):.2e} | "
                  f"loratool {t_ours:7.3f} s, worst rel. error {_worst_error(model, ours_f):.2e} | "
                  f"speed-up ×{t_peft / t_ours:5.1f} | load {load:.2f}")


if __name__ == "__main__":
    main()
