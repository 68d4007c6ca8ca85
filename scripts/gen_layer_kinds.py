"""Regenerate ``loratool/arch/layer_kinds.json``: what a layer is where a LoRA file's names and
factor shapes do not say, read off the real model classes on the ``meta`` device (no weights, no
network).

* ``conv_kernels``: {family: {component: {"khxkw": [diffusers module paths]}}} for every ``Conv2d``
  of the image models (a LoHa / LoKr on a k×k conv without a Tucker core stores its product
  flattened, [out, in·kh·kw]; the kernel comes from here).
* ``conv1d``: {transformers model_type: {"module": modeling package, "paths": [...]}}: the
  modules that are transformers ``Conv1D`` (weight stored [in, out]: PEFT's ``fan_in_fan_out``),
  paths relative to the base model with layer indices as ``N``; every model type whose modeling
  file builds a ``Conv1D`` is listed, so a type not listed has none.

Run ``python scripts/gen_layer_kinds.py``.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import torch

from loratool.arch.generate import SD2_UNET, SD15_UNET, meta_model

ARCH = Path(__file__).resolve().parents[1] / "loratool" / "arch"


def conv_kernels(model) -> dict[str, list[str]]:
    """{"3x3": [paths], "1x1": [...]} of every Conv2d."""
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            out.setdefault("x".join(str(k) for k in mod.kernel_size), []).append(name)
    return {kernel: sorted(paths) for kernel, paths in sorted(out.items())}


def image_tables() -> dict[str, dict]:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    gen = importlib.import_module("gen_arch_tables")  # scripts/ sibling: the published SDXL / SD3 configs
    out = {}
    for family, cfg in (("sd1", SD15_UNET), ("sd2", SD2_UNET), ("sdxl", gen.SDXL_UNET)):
        out[family] = {"unet": conv_kernels(meta_model(lambda c=cfg: UNet2DConditionModel(**c)))}
    sd3 = meta_model(lambda: SD3Transformer2DModel(**gen.SD3_VARIANTS["sd3-medium"]))
    out["sd3"] = {"transformer": conv_kernels(sd3)}
    return out


def conv1d_table() -> dict[str, dict]:
    import transformers
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto import configuration_auto
    from transformers.pytorch_utils import Conv1D

    models = Path(transformers.__file__).parent / "models"
    builds = {p.parent.name for p in models.glob("*/modeling_*.py") if re.search(r"=\s*Conv1D\(", p.read_text())}
    out = {}
    for model_type in configuration_auto.CONFIG_MAPPING_NAMES:
        module = configuration_auto.model_type_to_module_name(model_type)
        if module not in builds:
            continue
        cfg = AutoConfig.for_model(model_type)
        if hasattr(cfg, "add_cross_attention"):
            cfg.add_cross_attention = True  # GPT-2's cross-attention Conv1D layers (c_attn, q_attn, c_proj)
        try:
            model = meta_model(lambda c=cfg: AutoModel.from_config(c))
        except ValueError:
            continue  # a sub-config (clvp_encoder...) with no model of its own; its parent type is listed
        paths = sorted({re.sub(r"\.\d+\.", ".N.", n) for n, m in model.named_modules() if isinstance(m, Conv1D)})
        if paths:
            out[model_type] = {"module": module, "paths": paths}
    if {"gpt2", "openai-gpt"} - set(out):
        raise SystemExit(f"expected GPT-2 and GPT among the Conv1D models, found {sorted(out)}")
    return out


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    data = {"conv_kernels": image_tables(), "conv1d": conv1d_table()}
    path = ARCH / "layer_kinds.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
