"""Regenerate ``loratool/arch/lora_diffusion_order.json``: the order in which cloneofsimo's lora_diffusion
numbers the modules of SD 1.x / 2.x (``unet:0``, ``unet:1``, ... in ``save_safeloras``).

lora_diffusion (``lora_diffusion/lora.py``: ``extract_lora_as_tensor`` -> ``_find_modules_v2``) walks
``model.modules()`` and, inside every module whose class name is a target (``Attention`` /
``CrossAttention``, ``GEGLU``, ``ResnetBlock2D``; ``CLIPAttention``, ``CLIPMLP``), its ``named_modules()``,
taking each Linear / Conv2d: so the order is the models' registration order. The table lists, per family
and component, every Linear / Conv2d under such a class in ``named_modules()`` order of diffusers' UNet and
transformers' CLIP (published configs, built on the ``meta`` device), with its target class and shape.

Run ``python scripts/gen_lora_diffusion_order.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loratool.arch.generate import CLIP_L, OPENCLIP_H, SD2_UNET, SD15_UNET, meta_model

OUT = Path(__file__).resolve().parents[1] / "loratool" / "arch" / "lora_diffusion_order.json"
TARGETS = {"Attention": "Attention", "CrossAttention": "Attention", "GEGLU": "GEGLU",
           "ResnetBlock2D": "ResnetBlock2D", "CLIPAttention": "CLIPAttention", "CLIPMLP": "CLIPMLP"}


def ordered(model, prefix: str = "") -> list[list]:
    out = []
    for name, module in model.named_modules():
        target = TARGETS.get(type(module).__name__)
        if target is None:
            continue
        for sub, child in module.named_modules():
            if sub and isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                out.append([prefix + f"{name}.{sub}", target, list(child.weight.shape)])
    return out


def main() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    table = {}
    for fam, unet_cfg, te_cfg in (("sd1", SD15_UNET, CLIP_L), ("sd2", SD2_UNET, OPENCLIP_H)):
        unet = meta_model(lambda c=unet_cfg: UNet2DConditionModel(**c))
        te = meta_model(lambda c=te_cfg: CLIPTextModel(CLIPTextConfig(**c)))
        # transformers >= 5 drops CLIPTextModel's text_model. wrapper; the canonical names keep it
        table[fam] = {"unet": ordered(unet), "text_encoder": ordered(te, "" if hasattr(te, "text_model") else
                                                                       "text_model.")}
    OUT.write_text(json.dumps(table, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({sum(len(v) for f in table.values() for v in f.values())} entries)")


if __name__ == "__main__":
    main()
