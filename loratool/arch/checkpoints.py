"""Key maps for the single-file checkpoints A1111, ComfyUI and CivitAI distribute.

:func:`canonical_targets` maps every canonical parameter ``(component, diffusers/HF name)`` of
a single file to the stored key holding it and, for fused weights, the row range inside it:

===========  =========================================  ===========================================
family       stored prefix                              component (canonical naming)
===========  =========================================  ===========================================
sd1          ``model.diffusion_model.`` (LDM U-Net)     ``unet`` (diffusers ``UNet2DConditionModel``)
             ``cond_stage_model.transformer.``          ``text_encoder`` (HF CLIP, ``text_model.*``)
sd2          ``model.diffusion_model.``                 ``unet``
             ``cond_stage_model.model.`` (OpenCLIP-H)   ``text_encoder``
sdxl         ``model.diffusion_model.`` (SGM U-Net)     ``unet``
             ``conditioner.embedders.0.transformer.``   ``text_encoder`` (CLIP-L)
             ``conditioner.embedders.1.model.``         ``text_encoder_2`` (OpenCLIP-G, with projection)
sdxl refiner ``conditioner.embedders.0.model.``         ``text_encoder_2``
flux         BFL names, bare or ``model.diffusion_model.``  ``transformer`` (``FluxTransformer2DModel``)
sd3          MMDiT names, bare or ``model.diffusion_model.``  ``transformer`` (``SD3Transformer2DModel``)
             ``text_encoders.clip_l.transformer.``      ``text_encoder`` (HF CLIP-L)
             ``text_encoders.clip_g.transformer.``      ``text_encoder_2`` (HF CLIP-G)
             ``text_encoders.t5xxl.transformer.``       ``text_encoder_3`` (HF T5)
===========  =========================================  ===========================================

OpenCLIP stores attention as one ``in_proj_weight`` = rows [q; k; v] (q_proj/k_proj/v_proj get
row thirds) and ``text_projection`` as [in, out] (the transpose of HF's ``text_projection.weight``).
Flux fuses q/k/v (and the single-block MLP) by rows and stores the final modulation with its
halves swapped (see :mod:`loratool.arch.flux`); SD3's MMDiT fuses q/k/v likewise and swaps the halves
of the final modulation and of the last block's context modulation (:mod:`loratool.arch.sd3`).

A :class:`Target` unpacks as ``(stored key, rows)``. The two placements a row range cannot
express (``transpose``: OpenCLIP ``text_projection``; ``swap_halves``: Flux ``norm_out.linear``)
carry ``Target.transform`` and are only returned with ``transforms=True``; callers that
handle them place ΔW with :func:`to_stored`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

from loratool.arch import flux, sd3, sdxl
from loratool.arch.fused import swap_halves
from loratool.errors import FormatError

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIXES = {
    "cond_stage_model.transformer.": "text_encoder",  # SD 1.x
    "conditioner.embedders.0.transformer.": "text_encoder",  # SDXL CLIP-L
}
OPEN_CLIP_PREFIXES = {
    "cond_stage_model.model.": "text_encoder",  # SD 2.x OpenCLIP-H
    "conditioner.embedders.1.model.": "text_encoder_2",  # SDXL OpenCLIP-G
    "conditioner.embedders.0.model.": "text_encoder_2",  # SDXL refiner OpenCLIP-G
}
# Prefixes whose canonical text encoder has a projection (SD 2.x's diffusers text encoder has none).
OPEN_CLIP_PROJECTION = ("conditioner.embedders.1.model.", "conditioner.embedders.0.model.")
# OpenCLIP widths when no shapes are given (the released models).
OPEN_CLIP_WIDTH = {"cond_stage_model.model.": 1024, "conditioner.embedders.1.model.": 1280,
                   "conditioner.embedders.0.model.": 1280}
# OpenCLIP parameter -> HF CLIP parameter (outside the resblocks).
OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# OpenCLIP resblock part -> HF CLIP encoder-layer part.
OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
QKV = ("q_proj", "k_proj", "v_proj")
FLUX_MARK = "double_blocks.0.img_attn.qkv.weight"
FLUX_DEFAULT_WIDTH = 3072  # Flux.1 hidden size when shapes are not given


class Target(tuple):
    """``(stored key, rows)``; ``rows`` is a ``(start, stop)`` range along dim 0 or None for the
    whole tensor. ``transform`` is None, ``"transpose"`` or ``"swap_halves"``."""

    transform: str | None

    def __new__(cls, key: str, rows: tuple[int, int] | None = None, transform: str | None = None):
        obj = super().__new__(cls, (key, rows))
        obj.transform = transform
        return obj

    @property
    def key(self) -> str:
        return self[0]

    @property
    def rows(self) -> tuple[int, int] | None:
        return self[1]


def to_stored(delta: torch.Tensor, target: Target) -> torch.Tensor:
    """A canonical-shaped ΔW laid out as the stored tensor (or its row range) holds it."""
    if target.transform == "transpose":
        return delta.T
    if target.transform == "swap_halves":
        return swap_halves(delta)
    return delta


def _shapes(keys: Iterable[str] | Mapping[str, tuple[int, ...]], shapes) -> tuple[list[str], dict]:
    if isinstance(keys, Mapping):
        return list(keys), {k: tuple(v) for k, v in keys.items()}
    return list(keys), dict(shapes or {})


def checkpoint_family(keys: Iterable[str] | Mapping) -> str | None:
    """``sd1``, ``sd2``, ``sdxl``, ``sdxl_refiner``, ``flux``, ``sd3`` or a DiT family (``wan``, ``chroma``...,
    :mod:`loratool.arch.dit_checkpoints`; asked first: Chroma / Flux.2 files share Flux.1's keys) for a
    single-file base; None otherwise."""
    ks = set(keys)
    from loratool.arch import dit_checkpoints

    dit_family = dit_checkpoints.single_file_family(ks)
    if dit_family is not None:
        return dit_family
    if FLUX_MARK in ks or UNET_PREFIX + FLUX_MARK in ks:
        return "flux"
    if any(k.startswith(UNET_PREFIX + "joint_blocks.") or k.startswith("joint_blocks.") for k in ks):
        return "sd3"
    if any(k.startswith("conditioner.embedders.1.") for k in ks) or UNET_PREFIX + "label_emb.0.0.weight" in ks:
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in ks):
        return "sdxl_refiner"
    if any(k.startswith("cond_stage_model.model.") for k in ks):
        return "sd2"
    if any(k.startswith(("cond_stage_model.transformer.", UNET_PREFIX + "input_blocks.")) for k in ks):
        return "sd1"
    return None


def layers_per_block(unet_keys: Iterable[str]) -> int:
    """L from the first downsampler's position: it is ``input_blocks.{L+1}.0.op``."""
    ops, inputs = [], []
    for k in unet_keys:
        m = re.match(r"input_blocks\.(\d+)\.0\.op\.", k)
        if m:
            ops.append(int(m.group(1)))
        m = re.match(r"input_blocks\.(\d+)\.", k)
        if m:
            inputs.append(int(m.group(1)))
    if ops:
        return min(ops) - 1
    return max(inputs) if inputs else 0


def _unet_targets(keys: list[str]) -> dict:
    inner = [k[len(UNET_PREFIX):] for k in keys if k.startswith(UNET_PREFIX)]
    lpb = layers_per_block(inner)
    out = {}
    for k in inner:
        name = sdxl.sgm_to_diffusers(k, lpb)
        if name is not None:
            out[("unet", name)] = Target(UNET_PREFIX + k)
    return out


def _clip_targets(keys: list[str]) -> dict:
    out = {}
    for k in keys:
        for prefix, comp in CLIP_PREFIXES.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                if not name.startswith("text_model."):  # old transformers layouts without the wrapper
                    name = "text_model." + name
                out[(comp, name)] = Target(k)
    return out


def _open_clip_targets(keys: list[str], shapes: dict, transforms: bool) -> dict:
    out = {}
    for k in keys:
        for prefix, comp in OPEN_CLIP_PREFIXES.items():
            if not k.startswith(prefix):
                continue
            name = k[len(prefix):]
            if name in OPEN_CLIP_TOP:
                out[(comp, OPEN_CLIP_TOP[name])] = Target(k)
            elif name == "text_projection":
                if transforms and prefix in OPEN_CLIP_PROJECTION:
                    out[(comp, "text_projection.weight")] = Target(k, None, "transpose")
            else:
                m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", name)
                m2 = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", name)
                if m2:
                    layer = f"text_model.encoder.layers.{m2.group(1)}.self_attn"
                    width = shapes[k][0] // 3 if k in shapes else OPEN_CLIP_WIDTH[prefix]
                    for j, proj in enumerate(QKV):
                        out[(comp, f"{layer}.{proj}.{m2.group(2)}")] = Target(k, (j * width, (j + 1) * width))
                elif m and m.group(2) in OPEN_CLIP_LAYER:
                    part = OPEN_CLIP_LAYER[m.group(2)]
                    out[(comp, f"text_model.encoder.layers.{m.group(1)}.{part}.{m.group(3)}")] = Target(k)
    return out


def _fused_targets(table: dict[str, tuple[str, ...]], inner: dict[str, str], transforms: bool,
                   swapped: Callable[[str], bool], rows_of: Callable[[str, str], list[tuple[int, int]]]) -> dict:
    """Targets of the transformer weights and biases of ``table`` (native module -> diffusers modules)
    stored in ``inner`` (native name -> stored key): whole, a row range of a fused tensor
    (``rows_of(native, stored key)``, one range per diffusers module) or halves swapped."""
    out = {}
    for native, targets in table.items():
        for suffix in (".weight", ".bias"):
            stored = inner.get(native + suffix)
            if stored is None:
                continue
            if swapped(native):
                if transforms:
                    out[("transformer", targets[0] + suffix)] = Target(stored, None, "swap_halves")
                continue
            if len(targets) == 1:
                out[("transformer", targets[0] + suffix)] = Target(stored)
                continue
            for path, rows in zip(targets, rows_of(native, stored)):
                out[("transformer", path + suffix)] = Target(stored, rows)
    return out


def _flux_targets(keys: list[str], shapes: dict, transforms: bool) -> dict:
    prefix = UNET_PREFIX if UNET_PREFIX + FLUX_MARK in set(keys) else ""
    inner = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    doubles = {int(m.group(1)) for k in inner if (m := re.match(r"double_blocks\.(\d+)\.", k))}
    singles = {int(m.group(1)) for k in inner if (m := re.match(r"single_blocks\.(\d+)\.", k))}
    table = flux.module_table(max(doubles, default=-1) + 1, max(singles, default=-1) + 1)

    def rows_of(native: str, stored: str) -> list[tuple[int, int]]:
        shape = shapes.get(inner.get(native + ".weight", "")) or shapes.get(stored)
        if shape is not None and len(shape) == 2:
            rows_n, width = shape
        elif shape is not None:  # a bias: width follows from the weight's row count
            rows_n = shape[0]
            width = FLUX_DEFAULT_WIDTH if native.endswith("linear1") else rows_n // 3
        else:
            width = FLUX_DEFAULT_WIDTH
            rows_n = width * (3 + flux.MLP_RATIO) if native.endswith("linear1") else 3 * width
        return flux.split_rows(native, rows_n, width)

    out = _fused_targets(table, inner, transforms, lambda native: native in flux.SWAPPED, rows_of)
    for native, param in flux.norm_table(len(doubles), len(singles)).items():
        if native in inner:
            out[("transformer", param)] = Target(inner[native])
    return out


def _sd3_targets(keys: list[str], shapes: dict, transforms: bool) -> dict:
    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX + "joint_blocks.") for k in keys) else ""
    inner = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    layers = {int(m.group(1)) for k in inner if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    dual = {int(m.group(1)) for k in inner if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))}
    depth = max(layers, default=-1) + 1

    def swapped(native: str) -> bool:
        # the last block's context modulation is the pre-only one (2·D rows) by construction
        return native == sd3.ALWAYS_SWAPPED or native == f"joint_blocks.{depth - 1}.{sd3.CONTEXT_MOD}"

    def rows_of(native: str, stored: str) -> list[tuple[int, int]]:
        weight = inner.get(native + ".weight")
        shape = shapes.get(weight) if weight is not None else None
        rows_n = shape[0] if shape else (shapes[stored][0] if stored in shapes else None)
        if rows_n is None:
            raise FormatError(f"{stored}: placing q/k/v rows of an SD3 file needs its tensor shapes")
        width = rows_n // 3
        return [(0, width), (width, 2 * width), (2 * width, 3 * width)]

    out = _fused_targets(sd3.module_table(depth, dual), inner, transforms, swapped, rows_of)
    for native, param in sd3.norm_table(depth, dual).items():
        if native in inner:
            out[("transformer", param)] = Target(inner[native])
    for k in keys:
        for te_prefix, comp in sd3.TEXT_ENCODER_PREFIXES.items():
            if k.startswith(te_prefix):
                out[(comp, k[len(te_prefix):])] = Target(k)
    return out


def canonical_targets(
    keys: Iterable[str] | Mapping[str, tuple[int, ...]],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    transforms: bool = False,
) -> dict[tuple[str, str], Target] | None:
    """{(component, canonical parameter name): Target(stored key, rows)} for a single-file
    checkpoint, or None when ``keys`` are not one.

    Pass shapes (a {key: shape} mapping as ``keys`` or as ``shapes``) so fused rows follow the
    file; without them the released widths are assumed (Flux.1 3072, OpenCLIP-H 1024, -G 1280). SD3's
    fused q/k/v need the shapes (its widths differ between SD3 / SD3.5 models).
    """
    keys, shapes = _shapes(keys, shapes)
    family = checkpoint_family(keys)
    if family is None:
        return None
    if family == "flux":
        return _flux_targets(keys, shapes, transforms)
    if family == "sd3":
        return _sd3_targets(keys, shapes, transforms)
    if family not in SINGLE_FILE_ARCHITECTURES:
        from loratool.arch import dit_checkpoints

        return dit_checkpoints.targets(family, keys, shapes, transforms)
    out = _unet_targets(keys)
    out.update(_clip_targets(keys))
    out.update(_open_clip_targets(keys, shapes, transforms))
    return out


# --- naming the family of any base checkpoint (``info``) -------------------------------------------

# diffusers pipeline class (model_index.json ``_class_name``) prefix -> family.
PIPELINE_FAMILIES = (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("Flux", "flux"),
                     ("StableDiffusion", "sd1"))
CROSS_ATTENTION_FAMILIES = sdxl.CROSS_ATTENTION_FAMILIES  # cross_attention_dim of the released U-Nets -> family
# First path segments of HF transformers language models (``model.layers.0...``, GPT-2's ``transformer.h.0``...).
_LLM_BODY = re.compile(r"^(model\.|transformer\.|)(layers|h|decoder\.layers|encoder\.block|block)\.\d+\.")
SINGLE_FILE_ARCHITECTURES = {"sd1": "LDM single file", "sd2": "LDM single file (OpenCLIP-H)",
                             "sdxl": "SGM single file", "sdxl_refiner": "SGM single file (refiner)",
                             "flux": "BFL single file", "sd3": "MMDiT single file"}


def _unet_family(shapes: Mapping[str, tuple[int, ...]], config: Mapping | None) -> str:
    """SD1 / SD2 / SDXL for a diffusers ``UNet2DConditionModel`` state dict (and its config when given)."""
    cfg = dict(config or {})
    if cfg.get("addition_embed_type") == "text_time" or "add_embedding.linear_1.weight" in shapes:
        ctx = cfg.get("cross_attention_dim")
        return "sdxl_refiner" if ctx == 1280 else "sdxl"
    ctx = cfg.get("cross_attention_dim")
    if ctx is None:
        for k, shape in shapes.items():
            if k.endswith("attn2.to_k.weight") and len(shape) == 2:
                ctx = shape[1]
                break
    if ctx in CROSS_ATTENTION_FAMILIES:
        return CROSS_ATTENTION_FAMILIES[ctx]
    # other widths (tiny or custom U-Nets): SD2 projects attention with Linear, SD1 with a 1×1 conv
    linear = cfg.get("use_linear_projection")
    if linear is None:
        proj = next((s for k, s in shapes.items() if k.endswith("attentions.0.proj_in.weight")), None)
        linear = proj is not None and len(proj) == 2
    return "sd2" if linear else "sd1"


def base_family(
    shapes: Mapping[str, tuple[int, ...]],
    config: Mapping | None = None,
    pipeline: Mapping | None = None,
) -> tuple[str | None, str | None]:
    """(family, architecture) of a base model from its tensor names and shapes, plus the diffusers /
    transformers ``config.json`` of a component (``config``) or the ``model_index.json`` of a pipeline
    folder (``pipeline``) when there is one. Header data only; (None, None) when nothing is recognised.

    Families are those of :func:`checkpoint_family` plus ``llm`` (HF transformers language models)
    and ``clip`` / ``t5`` (text encoders on their own: several families share them).
    """
    from loratool.arch import dit, dit_checkpoints

    if pipeline:
        cls = str(pipeline.get("_class_name", ""))
        hit = dit_checkpoints.diffusers_family(None, pipeline, ())
        if hit is not None:
            return hit
        for prefix, fam in PIPELINE_FAMILIES:
            if cls.startswith(prefix):
                return fam, cls
        return None, cls or None
    single = checkpoint_family(shapes)
    if single is not None:
        if single not in SINGLE_FILE_ARCHITECTURES:
            return single, f"{dit.get(single).title} single file"
        return single, SINGLE_FILE_ARCHITECTURES[single]
    cfg = dict(config or {})
    cls = cfg.get("_class_name") or next(iter(cfg.get("architectures") or ()), None)
    keys = list(shapes)
    hit = dit_checkpoints.diffusers_family(cfg, None, keys) if cls is None or cfg.get("_class_name") else None
    if hit is not None:
        return hit
    if cls == "UNet2DConditionModel" or (cls is None and any(k.startswith("down_blocks.") for k in keys)
                                         and any(".attn2." in k for k in keys)):
        return _unet_family(shapes, cfg), "UNet2DConditionModel"
    if cls == "FluxTransformer2DModel" or (cls is None and any(k.startswith("single_transformer_blocks.")
                                                               for k in keys)):
        return "flux", "FluxTransformer2DModel"
    if cls == "SD3Transformer2DModel" or (cls is None and "pos_embed.proj.weight" in shapes
                                          and any(k.startswith("transformer_blocks.") for k in keys)):
        return "sd3", "SD3Transformer2DModel"
    if cls is not None and str(cls).startswith("CLIPText") or any(k.startswith("text_model.encoder.") for k in keys):
        name = cls or ("CLIPTextModelWithProjection" if "text_projection.weight" in shapes else "CLIPTextModel")
        return "clip", name
    if cls is not None and str(cls).startswith("T5") or any(".SelfAttention.q.weight" in k for k in keys):
        return "t5", cls or "T5EncoderModel"
    if cfg.get("model_type") or cfg.get("architectures") or any(_LLM_BODY.match(k) for k in keys):
        return "llm", cls
    return None, cls
