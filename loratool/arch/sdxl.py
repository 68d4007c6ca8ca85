"""SDXL: the SGM (``generative-models``) U-Net naming used by kohya SDXL LoRAs and SGM
single-file checkpoints, and its map to diffusers' ``UNet2DConditionModel`` naming.

The same LDM/SGM U-Net naming is used by SD 1.x / 2.x single-file checkpoints
(``model.diffusion_model.*``); only the block layout (``layers_per_block``, which levels carry
attention) differs, so the translation below is parametrised by it.

SGM → diffusers, with L = layers_per_block:

* ``input_blocks.i`` (i ≥ 1): level b = (i-1) // (L+1), slot j = (i-1) % (L+1);
  ``.0.<res>`` → ``down_blocks.b.resnets.j.<res'>`` and ``.1.<x>`` → ``down_blocks.b.attentions.j.<x>``
  for j < L; j = L is the downsampler ``.0.op`` → ``down_blocks.b.downsamplers.0.conv``.
* ``middle_block.0/1/2`` → ``mid_block.resnets.0`` / ``mid_block.attentions.0`` / ``mid_block.resnets.1``.
* ``output_blocks.i``: b = i // (L+1), j = i % (L+1); ``.0`` resnet, ``.1`` attention, and the
  upsampler ``.1.conv`` (level without attention) or ``.2.conv`` → ``up_blocks.b.upsamplers.0.conv``.
* resnet parts (``RESNET``) and top-level modules (``TOP``) are renamed by table; attention
  internals (``transformer_blocks.0.attn1.to_q`` ...) are named alike in both.
"""

from __future__ import annotations

import re
from functools import cache

from loratool.adapter import LoraModule
from loratool.arch import Family, load_table
from loratool.arch.evidence import DECLARED, LAYOUT, STRUCTURE, UNIQUE, WIDTHS, Evidence, Width
from loratool.arch.fused import renamed
from loratool.errors import MatchError

# SGM resnet part -> diffusers ResnetBlock2D part.
RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
RESNET_INV = {v: k for k, v in RESNET.items()}

# SGM top-level module -> diffusers module. ``label_emb`` is SDXL's added (text_time) embedding.
TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
TOP_INV = {v: k for k, v in TOP.items()}
MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
MIDDLE_INV = {v: k for k, v in MIDDLE.items()}


def _split_top(name: str, table: dict[str, str]) -> tuple[str, str] | None:
    """(table key, rest) when ``name`` is a table key or starts with one followed by a dot."""
    for k in table:
        if name == k or name.startswith(k + "."):
            return k, name[len(k):]
    return None


def _resnet_part(rest: str, table: dict[str, str]) -> str | None:
    """Rename the resnet part at the start of ``rest`` (``.in_layers.2.weight`` -> ``.conv1.weight``)."""
    hit = _split_top(rest.lstrip("."), table)
    if hit is None:
        return None
    return "." + table[hit[0]] + hit[1]


def sgm_to_diffusers(name: str, layers_per_block: int) -> str | None:
    """Translate an SGM U-Net module or parameter name to diffusers; None when it has no counterpart."""
    hit = _split_top(name, TOP)
    if hit is not None:
        return TOP[hit[0]] + hit[1]
    mid = re.match(r"middle_block\.(\d+)(\..*)?$", name)
    if mid is not None:
        inner, rest = MIDDLE.get(mid.group(1)), mid.group(2) or ""
        if inner is None:
            return None
        if inner.startswith("resnets"):
            part = _resnet_part(rest, RESNET)
            return None if part is None else f"mid_block.{inner}{part}"
        return f"mid_block.{inner}{rest}"
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)(\..*)?$", name)
    if m is None:
        return None
    where, i, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4) or ""
    span = layers_per_block + 1
    if where == "input_blocks":
        if i == 0:
            return None
        b, j = (i - 1) // span, (i - 1) % span
        if sub == "0" and rest.startswith(".op"):
            return f"down_blocks.{b}.downsamplers.0.conv{rest[3:]}"
        if sub == "0":
            part = _resnet_part(rest, RESNET)
            return None if part is None else f"down_blocks.{b}.resnets.{j}{part}"
        if sub == "1":
            return f"down_blocks.{b}.attentions.{j}{rest}"
        return None
    b, j = i // span, i % span
    if sub == "0":
        part = _resnet_part(rest, RESNET)
        return None if part is None else f"up_blocks.{b}.resnets.{j}{part}"
    if rest.startswith(".conv") and (rest == ".conv" or rest.startswith(".conv.")):
        return f"up_blocks.{b}.upsamplers.0.conv{rest[5:]}"
    if sub == "1":
        return f"up_blocks.{b}.attentions.{j}{rest}"
    return None


def diffusers_to_sgm(name: str, layers_per_block: int, up_attention_levels: set[int]) -> str | None:
    """Inverse of :func:`sgm_to_diffusers`; ``up_attention_levels`` are the up-block indices
    that carry attentions (their upsampler sits at ``.2.conv`` instead of ``.1.conv``)."""
    hit = _split_top(name, TOP_INV)
    if hit is not None:
        return TOP_INV[hit[0]] + hit[1]
    span = layers_per_block + 1
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(\..*)?$", name)
    if m is None:
        m2 = re.match(r"mid_block\.(resnets\.\d+|attentions\.\d+)(\..*)?$", name)
        if m2 is None or m2.group(1) not in MIDDLE_INV:
            return None
        rest = m2.group(2) or ""
        idx = MIDDLE_INV[m2.group(1)]
        if m2.group(1).startswith("resnets"):
            part = _resnet_part(rest, RESNET_INV)
            return None if part is None else f"middle_block.{idx}{part}"
        return f"middle_block.{idx}{rest}"
    where, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
    if where == "down_blocks":
        if kind == "downsamplers":
            if not rest.startswith(".conv"):
                return None
            return f"input_blocks.{b * span + layers_per_block + 1}.0.op{rest[5:]}"
        i = 1 + b * span + j
        if kind == "resnets":
            part = _resnet_part(rest, RESNET_INV)
            return None if part is None else f"input_blocks.{i}.0{part}"
        if kind == "attentions":
            return f"input_blocks.{i}.1{rest}"
        return None
    if kind == "upsamplers":
        if not rest.startswith(".conv"):
            return None
        sub = 2 if b in up_attention_levels else 1
        return f"output_blocks.{b * span + layers_per_block}.{sub}.conv{rest[5:]}"
    i = b * span + j
    if kind == "resnets":
        part = _resnet_part(rest, RESNET_INV)
        return None if part is None else f"output_blocks.{i}.0{part}"
    if kind == "attentions":
        return f"output_blocks.{i}.1{rest}"
    return None


# --- shipped tables (generated by scripts/gen_arch_tables.py from the real SDXL configs) ---


def unet_map() -> dict[str, str]:
    """{SGM module path: diffusers module path} for every SDXL base U-Net module with a weight."""
    return load_table("sdxl_unet")["sgm_to_diffusers"]


@cache
def _unet_inv() -> dict[str, str]:
    return {v: k for k, v in unet_map().items()}


def text_encoder_paths(component: str) -> set[str]:
    """HF module paths of SDXL's CLIP-L (``text_encoder``) and OpenCLIP-G (``text_encoder_2``)."""
    return set(load_table("sdxl_text_encoders")[component])


def native_paths(component: str) -> set[str]:
    # SGM names (sd-scripts) and diffusers names (diffusers' ``convert_state_dict_to_kohya``: the
    # U-Net path with "." -> "_" behind ``lora_unet``); both restore, and to_canonical accepts both.
    if component == "unet":
        return set(unet_map()) | set(unet_map().values())
    if component in ("text_encoder", "text_encoder_2"):
        return text_encoder_paths(component)
    return set()


def _rename_unet(module: LoraModule, table: dict[str, str], fallback) -> LoraModule:
    if module.component != "unet":
        return module
    new = table.get(module.path)
    if new is None:
        new = fallback(module.path)
    if new is None:
        raise MatchError(f"unet:{module.path}: not an SDXL U-Net module")
    return renamed(module, new)


def to_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    """SGM U-Net paths -> diffusers paths (text encoders already use HF names). Pure renames: exact."""
    table = unet_map()
    canon = set(table.values())

    def fallback(path: str) -> str | None:
        # A path that already is a diffusers name (mixed files, diffusers' convert_state_dict_to_kohya)
        # passes through unchanged.
        if path in canon or diffusers_to_sgm(path, 2, {0, 1}) is not None:
            return path
        return sgm_to_diffusers(path, 2)

    return [_rename_unet(m, table, fallback) for m in modules]


def from_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    """diffusers U-Net paths -> SGM paths. Pure renames: exact."""
    inv = _unet_inv()
    return [_rename_unet(m, inv, lambda p: diffusers_to_sgm(p, 2, {0, 1})) for m in modules]


SGM_MARKERS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def detect(keys: list[str], metadata: dict[str, str]) -> int:
    """Score how sure we are a kohya file is SDXL (0 = not SDXL)."""
    version = metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")
    if "sdxl" in version.lower() or "stable-diffusion-xl" in version.lower():
        return 100
    score = 0
    if any(k.startswith("lora_te2_") for k in keys):
        score += 40
    if any(k.startswith(SGM_MARKERS) for k in keys):
        score += 40
    if any(k.startswith("lora_te1_") for k in keys):
        score += 10
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_joint_blocks_"))
           for k in keys):
        return 0
    return score


# --- family evidence from canonical (diffusers) U-Net names and shapes ---

# ``cross_attention_dim`` of the released U-Nets (their unet/config.json) -> family.
CROSS_ATTENTION_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
CROSS_ATTENTION = re.compile(r"\.attn2\.to_k$")
# Block layouts of the released configs: SD 1.x / 2.x down (CrossAttn ×3, Down), up (Up, CrossAttn ×3), one
# transformer block per attention; SDXL down (Down, CrossAttn ×2), up (CrossAttn ×2, Up), 2 or 10 transformer
# blocks per attention, a text-time ``add_embedding``.
SD_LAYOUT = re.compile(r"^(down_blocks\.0\.attentions\.|down_blocks\.3\.|up_blocks\.3\.)")
SDXL_LAYOUT = re.compile(r"^(up_blocks\.0\.attentions\.|add_embedding\.)|\.attentions\.\d+\.transformer_blocks\.[1-9]")
SDXL_NAMES = re.compile(r"sdxl|sd_xl|stable-diffusion-xl")


def unet_layout(ev: Evidence) -> str | None:
    """"sd" (SD 1.x / 2.x), "sdxl", or None from the U-Net module paths an adapter touches."""
    paths = ev.paths("unet")
    sd = any(SD_LAYOUT.search(p) for p in paths)
    xl = any(SDXL_LAYOUT.search(p) for p in paths)
    return "sd" if sd and not xl else "sdxl" if xl and not sd else None


def cross_attention_family(ev: Evidence) -> str | None:
    """The released U-Net whose cross-attention width the adapter's ``attn2.to_k`` modules have."""
    fams = {CROSS_ATTENTION_FAMILIES.get(w) for w in ev.in_features("unet", CROSS_ATTENTION)}
    return fams.pop() if len(fams) == 1 else None


def evidence(ev: Evidence) -> tuple[int, str]:
    """SDXL: declared, a U-Net beside ``text_encoder_2``, the SDXL block layout, or its widths."""
    if ev.declares(SDXL_NAMES):
        return DECLARED, "declared in its metadata"
    comps = ev.components
    if not comps or comps - {"unet", "text_encoder", "text_encoder_2"}:
        return 0, ""
    layout = unet_layout(ev)
    if layout == "sd":
        return 0, ""
    if {"unet", "text_encoder_2"} <= comps:
        return UNIQUE, "a U-Net with a second text encoder (text_encoder_2)"
    if layout == "sdxl":
        return LAYOUT, "SDXL U-Net blocks (attention in up_blocks.0, several transformer blocks)"
    if cross_attention_family(ev) == "sdxl":
        return WIDTHS, "cross-attention width 2048"
    if "text_encoder_2" in comps:
        return STRUCTURE, "a second CLIP text encoder"
    return 0, ""


# Widths an SDXL LoRA fixes (released: cross-attention 2048, add_embedding input 2816; text encoders 768 / 1280).
SDXL_WIDTHS = (
    Width("cross_attention", "unet", r"\.attn2\.to_k$", 1, "cross-attention (text) width"),
    Width("unet_channels", "unet", r"\.attentions\.\d+\.proj_in$", 0, "U-Net attention channels"),
    Width("add_embedding", "unet", r"^add_embedding\.linear_1$", 1, "added text/time embedding input"),
    Width("text_encoder", "text_encoder", r"\.self_attn\.q_proj$", 1, "text encoder width (CLIP-L)"),
    Width("text_encoder_2", "text_encoder_2", r"\.self_attn\.q_proj$", 1, "second text encoder width (CLIP-G)"),
)

FAMILY = Family(
    name="sdxl",
    kohya_prefixes={"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"},
    native_paths=native_paths,
    to_canonical=to_canonical,
    from_canonical=from_canonical,
    detect=detect,
    evidence=evidence,
    merges_into=("sdxl_refiner", "clip"),
    widths=SDXL_WIDTHS,
)
