"""PEFT AdaLoRA adapters (``peft_type: ADALORA``), read into plain LoRA modules.

Keys (``P`` = ``base_model.model.``; ``peft.tuners.adalora``): ``P<path>.lora_A`` [r, in] (right
singular vectors), ``P<path>.lora_E`` [r, 1] (singular values), ``P<path>.lora_B`` [out, r] (left), no
``.weight`` suffix; older PEFT versions also saved ``P<path>.ranknum``. PEFT's ``SVDLinear``:

    ΔW = B @ (A ⊙ E) · scaling / (ranknum + 1e-5),   scaling = lora_alpha (r when lora_alpha ≤ 0)

transposed with ``fan_in_fan_out``. ``ranknum`` is the rank the module was created with, ``init_r``:
PEFT saves the tensors already cut to the rows ``rank_pattern`` keeps (``{"<path>.lora_E": [bools]}``)
and, loading them, keeps ranknum = init_r (``resize_modules_by_rank_pattern``); a ``ranknum`` tensor in
the file wins. r is the kept rank (the length of E).

Each module becomes a plain LoRA with down = A ⊙ E (E folded into the rows of A, in float64, cast back
to A's dtype), up = B and alpha = r · scaling / (ranknum + 1e-5), so scale = alpha / r gives the same
ΔW, and every writer writes a plain LoRA. A module whose pattern keeps no row (r = 0, ΔW = 0) is left
out and named in the ``loratool.adalora_zero_rank`` metadata entry. The config kept for writers is the
LoRA part of the AdaLoRA config (target modules, base model, fan_in_fan_out…), ``peft_type: LORA``.
"""

from __future__ import annotations

from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.arch.clip import canonical_clip_path
from loratool.errors import FormatError
from loratool.formats import ReadOptions
from loratool.formats import peft as peft_format

PEFT_TYPE = "ADALORA"
RANKNUM_EPS = 1e-5  # PEFT adds it to ranknum in forward and merge
SUFFIXES = {".lora_A": "A", ".lora_B": "B", ".lora_E": "E", ".ranknum": "ranknum"}
# AdaLoRA-only config fields: training schedule and rank allocation, meaningless for plain LoRA.
ADALORA_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                  "total_step", "rank_pattern", "alpha_pattern", "r", "lora_alpha")
ZERO_RANK_KEY = "loratool.adalora_zero_rank"


def _scaling(config: dict[str, Any], r: int) -> float:
    alpha = float(config.get("lora_alpha", 8))
    return alpha if alpha > 0 else float(r)


def _group(tensors: dict[str, torch.Tensor], where: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for suffix, slot in SUFFIXES.items():
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[slot] = tensor
                break
        else:
            if peft_format.is_lora_like(key):
                raise FormatError(f"{where}: key {key!r} is not an AdaLoRA tensor this tool understands")
            whole[key] = tensor
    return groups, whole


def _module(component: str, fpath: str, g: dict[str, torch.Tensor], config: dict[str, Any],
            where: str) -> LoraModule | None:
    missing = [s for s in ("A", "B", "E") if s not in g]
    if missing:
        raise FormatError(f"{where}: AdaLoRA module {fpath!r} lacks lora_{' and lora_'.join(missing)}")
    a, b, e = g["A"], g["B"], g["E"]
    r = int(a.shape[0])
    if a.dim() != 2 or b.dim() != 2 or tuple(b.shape[1:]) != (r,) or e.numel() != r:
        raise FormatError(f"{where}: AdaLoRA module {fpath!r}: lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)}, "
                          f"lora_B {tuple(b.shape)} do not chain")
    if r == 0:
        return None
    init_r = int(config.get("init_r", 12))
    ranknum = float(g["ranknum"].reshape(-1)[0]) if "ranknum" in g else float(init_r)
    scale = _scaling(config, r) / (ranknum + RANKNUM_EPS)
    down = (a.to(torch.float64) * e.to(torch.float64).reshape(r, 1)).to(a.dtype)
    path = canonical_clip_path(component, fpath)
    module = LoraModule(component=component, path=path, kind="lora", layer="linear", tensors={"down": down, "up": b},
                        alpha=scale * r, fan_in_fan_out=bool(config.get("fan_in_fan_out", False)))
    if path != fpath:
        module.hints["file_path"] = fpath
    return module


def lora_config(config: dict[str, Any]) -> dict[str, Any]:
    """The AdaLoRA config without its AdaLoRA-only fields, as a LoRA config for writers."""
    out = {k: v for k, v in config.items() if k not in ADALORA_FIELDS}
    out["peft_type"] = "LORA"
    return out


def read(src, opts: ReadOptions | None = None) -> Adapter:
    where = str(src.folder or src.path)
    config = dict(src.config or {})
    component = peft_format._component(src, config)
    tensors = src.tensors
    if tensors and all(k.startswith(peft_format.PREFIX) for k in tensors):
        tensors = {k[len(peft_format.PREFIX):]: v for k, v in tensors.items()}
    groups, whole = _group(tensors, where)
    adapter = Adapter(source_format=peft_format.NAME)
    zero: list[str] = []
    for fpath, g in groups.items():
        module = _module(component, fpath, g, config, where)
        if module is None:
            zero.append(fpath)
            continue
        adapter.add(module)
    for name, tensor in whole.items():
        adapter.extras[(component, name)] = tensor
    adapter.config[component] = lora_config(config)
    adapter.metadata = {k: v for k, v in src.metadata.items() if k not in ("format", peft_format.COMPONENT_KEY)}
    if zero:
        adapter.metadata[ZERO_RANK_KEY] = ", ".join(zero)
        # the original targets still select the pruned modules: writers list the kept ones instead
        adapter.config[component].pop("target_modules", None)
    return adapter
