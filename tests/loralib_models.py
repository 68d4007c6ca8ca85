"""A tiny torch model built from loralib's own layers, for the loralib layout tests and fixtures.

It holds one of each loralib class that loratool reads: ``Embedding`` (``wte``), ``Linear``
(``h.0.mlp.fc``), ``Linear`` with ``fan_in_fan_out`` (``h.0.mlp.proj``) and ``MergedLinear``
with ``enable_lora=[True, False, True]`` and ``fan_in_fan_out`` (``h.0.attn.c_attn``, GPT-2 style).
"""

from __future__ import annotations

import loralib
import torch
from tiny_models import randomize_lora, seeded
from torch import nn

# The sidecar describing TinyLoralib, as a user would write it (per-module entries override defaults).
SIDECAR = {
    "r": 4,
    "lora_alpha": 16,
    "modules": {
        "wte": {"r": 3, "lora_alpha": 6, "layer": "embedding"},
        "h.0.attn.c_attn": {"r": 2, "lora_alpha": 5, "enable_lora": [True, False, True], "fan_in_fan_out": True},
        "h.0.mlp.proj": {"r": 2, "lora_alpha": 3, "fan_in_fan_out": True},
    },
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = loralib.MergedLinear(
            8, 24, r=2, lora_alpha=5, enable_lora=[True, False, True], fan_in_fan_out=True
        )
        self.mlp = nn.Module()
        self.mlp.fc = loralib.Linear(8, 12, r=4, lora_alpha=16)
        self.mlp.proj = loralib.Linear(12, 8, r=2, lora_alpha=3, fan_in_fan_out=True)


class TinyLoralib(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = loralib.Embedding(20, 8, r=3, lora_alpha=6)
        self.h = nn.ModuleList([Block()])


def tiny_loralib(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyLoralib:
    """A seeded TinyLoralib in train mode (unmerged) with random LoRA factors."""
    seeded(seed)
    model = TinyLoralib()
    randomize_lora(model, seed=seed + 1)
    return model.to(dtype).train()


def merged_deltas(model: TinyLoralib) -> dict[str, torch.Tensor]:
    """ΔW of each LoRA layer exactly as loralib merges it on ``eval()`` (W_merged − W)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, loralib.LoRALayer)}
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    model.eval()
    deltas = {n: layers[n].weight.detach() - before[n] for n in layers}
    model.train()
    return deltas
