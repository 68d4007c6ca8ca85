"""Stable Diffusion 1.x and 2.x: kohya uses the diffusers U-Net names and HF CLIP names.

Prefixes: ``lora_unet`` → ``unet``, ``lora_te`` → ``text_encoder`` (CLIP ViT-L for SD1,
OpenCLIP ViT-H in HF naming for SD2). Native names are canonical, so the maps are identity.
Paths come from ``sd.json`` (generated from the SD1.5 / SD2 configs by ``arch/generate.py``).
Text-encoder paths are canonical with the checkpoint's ``text_model.`` prefix; transformers ≥ 5
drops it from ``CLIPTextModel``'s module names, so files built on such a model
(``lycoris_encoder_layers_0_...``) are read too and renamed to the prefixed form.
SD1 and SD2 share their module names; only metadata (``ss_base_model_version``, ``ss_v2``,
``modelspec.architecture``) tells them apart, and SD1 wins a tie.
"""

from __future__ import annotations

import re
from dataclasses import replace

from loratool.adapter import LoraModule
from loratool.arch import Family, identity, load_table

PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder"}
_UNET_DIFFUSERS = re.compile(r"^(lora_unet|lycoris)_(down_blocks|up_blocks|mid_block)_")
_OTHER_FAMILIES = ("sdxl", "stable-diffusion-xl", "flux", "sd3", "stable-diffusion-3")


CLIP_ROOT = "text_model."


def _paths(family: str):
    def native_paths(component: str) -> set[str]:
        paths = set(load_table("sd")[family].get(component, ()))
        if component == "text_encoder":
            paths |= {p[len(CLIP_ROOT):] for p in paths if p.startswith(CLIP_ROOT)}
        return paths

    return native_paths


def to_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    """Text-encoder paths without ``text_model.`` (transformers ≥ 5 module names) get it back."""
    return [replace(m, path=CLIP_ROOT + m.path)
            if m.component == "text_encoder" and not m.path.startswith(CLIP_ROOT) else m
            for m in modules]


def _metadata_version(metadata: dict[str, str]) -> str | None:
    """'sd1' / 'sd2' / 'other' from kohya or modelspec metadata; None when silent."""
    version = metadata.get("ss_base_model_version", "").lower()
    arch_ = metadata.get("modelspec.architecture", "").lower()
    if version.startswith("sd_v1") or arch_.startswith("stable-diffusion-v1"):
        return "sd1"
    if version.startswith("sd_v2") or arch_.startswith("stable-diffusion-v2"):
        return "sd2"
    if any(m in version or m in arch_ for m in _OTHER_FAMILIES) or version or arch_:
        return "other"
    if metadata.get("ss_v2", "").lower() == "true":
        return "sd2"
    if metadata.get("ss_v2", "").lower() == "false":
        return "sd1"
    return None


def _detector(family: str):
    def detect(keys: list[str], metadata: dict[str, str]) -> int:
        meta = _metadata_version(metadata)
        if meta is not None:
            return 100 if meta == family else 0
        if any(k.startswith(("lora_te1_", "lora_te2_", "lora_te3_")) for k in keys):
            return 0
        score = 0
        if any(_UNET_DIFFUSERS.match(k) for k in keys):
            score += 40
        if any(k.startswith("lora_te_text_model_") for k in keys):
            score += 40
        return score if family == "sd1" or not score else score - 1

    return detect


FAMILIES = [
    Family(name=name, kohya_prefixes=dict(PREFIXES), native_paths=_paths(name), to_canonical=to_canonical,
           from_canonical=identity, detect=_detector(name))
    for name in ("sd1", "sd2")
]
