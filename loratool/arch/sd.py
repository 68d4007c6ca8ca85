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
from loratool.arch.evidence import DECLARED, LAYOUT, WEAK, Evidence, Width

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


NAMES = {"sd1": re.compile(r"stable-diffusion-v-?1|sd_v1|\bsd-?1\.[45]\b"),
         "sd2": re.compile(r"stable-diffusion-(v-?)?2|sd_v2|\bsd-?2\.[01]\b")}
# Text-encoder width: SD 2.x's OpenCLIP-H is 1024 wide (CLIP-L, shared by every other family, 768).
TEXT_WIDTH = re.compile(r"\.self_attn\.q_proj$")
PROJ_IN = re.compile(r"\.attentions\.\d+\.proj_in$")


def _evidence(family: str):
    def evidence(ev: Evidence) -> tuple[int, str]:
        from loratool.arch.sdxl import cross_attention_family, unet_layout

        if ev.declares(NAMES[family]):
            return DECLARED, "declared in its metadata"
        comps = ev.components
        layout = unet_layout(ev)
        if not comps or comps - {"unet", "text_encoder"} or layout == "sdxl":
            return 0, ""
        score, why = (LAYOUT, "SD 1.x/2.x U-Net blocks") if layout == "sd" else (WEAK, "U-Net / CLIP components")
        # SD 1.x and 2.x share every name: their widths and SD 2.x's Linear attention projections
        # (use_linear_projection; SD 1.x: 1×1 convs) tell them apart
        if cross_attention_family(ev) == family:
            return score + 10, why + f", the cross-attention width of the released {family} U-Net"
        if family == "sd2" and ev.in_features("text_encoder", TEXT_WIDTH) == {1024}:
            return score + 10, why + ", text-encoder width 1024 (OpenCLIP-H)"
        dims = {len(s) for s in ev.shapes("unet", PROJ_IN)}
        if dims == {2 if family == "sd2" else 4}:
            return score + 5, why + (", linear proj_in" if family == "sd2" else ", conv proj_in")
        return score, why

    return evidence


# Widths an SD U-Net / CLIP LoRA fixes (released: cross-attention 768 SD 1.x, 1024 SD 2.x; channels 320/640/1280).
UNET_WIDTHS = (
    Width("cross_attention", "unet", r"\.attn2\.to_k$", 1, "cross-attention (text) width"),
    Width("unet_channels", "unet", r"\.attentions\.\d+\.proj_in$", 0, "U-Net attention channels"),
)
TEXT_WIDTHS = (Width("text_encoder", "text_encoder", r"\.self_attn\.q_proj$", 1, "text encoder width"),)


def _variant(ev: Evidence) -> str | None:
    """SD 2.x v-prediction (768-v) models, as sd-scripts records the training (``ss_v_parameterization``)."""
    return "v-prediction" if str(ev.metadata.get("ss_v_parameterization", "")).lower() == "true" else None


FAMILIES = [
    Family(name=name, kohya_prefixes=dict(PREFIXES), native_paths=_paths(name), to_canonical=to_canonical,
           from_canonical=identity, detect=_detector(name), evidence=_evidence(name),
           merges_into=(other, "clip"), variant=_variant, widths=UNET_WIDTHS + TEXT_WIDTHS)
    for name, other in (("sd1", "sd2"), ("sd2", "sd1"))
]
