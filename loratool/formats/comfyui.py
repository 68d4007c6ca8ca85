"""ComfyUI's single-file LoRA layout: dotted native module paths behind ``diffusion_model.`` and
``text_encoders.<encoder>.transformer.``.

Keys (``comfy_extras/nodes_lora_extract.py`` LoraSave; ``comfy/lora.py`` reads them through its
generic ``diffusion_model.<param>`` / ``text_encoders.<param>`` key maps): ``<prefix><path>.<suffix>``
with ``path`` the model's own single-file name — BFL for Flux (``double_blocks.0.img_attn.qkv``),
MMDiT for SD3 (``joint_blocks.0.x_block.attn.qkv``), SGM for SDXL (``input_blocks.4.1...``), LDM
for SD 1.x / 2.x — and text encoders in HF naming under ``text_encoders.clip_l.transformer.``,
``text_encoders.clip_g.transformer.`` and ``text_encoders.t5xxl.transformer.``. Suffixes: kohya
(``lora_up.weight``, ``lora_down.weight``, ``alpha``, ``dora_scale``), PEFT (``lora_A.weight`` /
``lora_B.weight``, as ai-toolkit and OneTrainer write it), every LyCORIS kind, ``diff`` / ``diff_b``.
The same files come out of ai-toolkit (BFL-native models) and OneTrainer's COMFY format.

Reading: :mod:`loratool.formats.dialect_read` (dialect ``comfyui``). Writing uses the kohya suffixes
with an explicit ``alpha`` and ``diff_b`` for a LoRA bias (Δb = scale · bias), which is what LoraSave
writes and every ComfyUI version reads.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save

from loratool import arch
from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError
from loratool.formats import dialect_read, dialects, kohya
from loratool.formats.outputs import check_target
from loratool.io.atomic import atomic_path

NAME = "comfyui"
DIALECT = dialects.by_name(NAME)
WRITE_FAMILIES = ("flux", "sd3", "sdxl", "sd1", "sd2")


def detect(src) -> bool:
    return dialects.detect(src) is DIALECT


def read(src, opts) -> Adapter:
    return dialect_read.read(src, opts, DIALECT)


def _prefix(family: str, component: str) -> str:
    for scope in DIALECT.scopes:
        if scope.component_for(family) == component:
            return scope.prefix
    raise FormatError(f"ComfyUI files hold no {component} for {family}")


def _native(family: arch.Family, modules: list[LoraModule]) -> list[LoraModule]:
    """Canonical -> ComfyUI's native paths (LDM U-Net names for SD 1.x / 2.x)."""
    from loratool.arch import fused, sdxl

    out = family.from_canonical(modules)
    if family.name not in ("sd1", "sd2"):
        return out
    ldm = []
    for m in out:
        if m.component == "unet":
            path = sdxl.diffusers_to_sgm(m.path, 2, {1, 2, 3})
            if path is None:
                raise FormatError(f"unet:{m.path}: no LDM name for this U-Net module")
            m = fused.renamed(m, path)
        ldm.append(m)
    return ldm


def write(adapter: Adapter, out: Path, opts) -> list[Path]:
    out = check_target(NAME, out, opts.inputs, opts.force)
    if adapter.extras:
        name = next(iter(adapter.extras))
        raise FormatError(f"{out}: ComfyUI LoRA files hold LoRA modules only; this adapter also has the whole "
                          f"tensor {name[0]}:{name[1]} (write it as diffusers or peft)")
    for m in adapter:
        if m.kind == "set" or m.hints.get("widen"):
            raise FormatError(f"{out}: {m.component}:{m.path} sets or widens a base weight (a Flux control "
                              f"LoRA); ComfyUI reads those in their BFL form only: keep the original file")
    family = kohya._family_for_write(adapter, opts)
    if family.name not in WRITE_FAMILIES:
        raise FormatError(f"{out}: the ComfyUI layout is written for {', '.join(WRITE_FAMILIES)}, not {family.name}")
    tensors: dict[str, torch.Tensor] = {}
    for nat in _native(family, list(adapter)):
        where = f"{out}: {nat.component}:{nat.path}"
        bias = nat.tensors.get("bias")
        plain = nat
        if bias is not None:  # ComfyUI's diff_b is the bare Δb
            plain = replace(nat, tensors={k: v for k, v in nat.tensors.items() if k != "bias"})
        parts = kohya.module_tensors(plain, where)
        if bias is not None:
            parts["diff_b"] = (bias.to(torch.float32) * nat.scale).to(bias.dtype)
        head = _prefix(family.name, nat.component) + nat.path
        for suffix, t in parts.items():
            key = f"{head}.{suffix}"
            if key in tensors:
                raise FormatError(f"{where}: two modules map to the key {key!r}")
            tensors[key] = t
    metadata = {k: v for k, v in adapter.metadata.items() if isinstance(v, str)}
    metadata.update(opts.extra_metadata)
    data = save(tensors, metadata)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return [out]
