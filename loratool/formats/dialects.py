"""Trainer dialects: how the LoRA files real trainers write spell their keys, as data.

A dialect is a variant of a layout (:mod:`loratool.formats`) that a trainer or loader writes:
its own key prefixes (which component a key adapts), its own module naming (the family's native
single-file names — BFL for Flux, MMDiT for SD3, SGM / LDM for the U-Nets — or the diffusers / HF
names), flattened (``_``) or dotted paths, its own suffix spellings and its alpha convention. One
:class:`Dialect` entry per trainer; :mod:`loratool.formats.dialect_read` turns any of them into
canonical modules, and the layouts' readers hand a file over when :func:`detect` names a dialect.

Where the key names come from (each entry's ``source``):

==============  ==========================================================================  ===========
dialect         keys (``P`` = module path)                                                  layout
==============  ==========================================================================  ===========
comfyui         ``diffusion_model.P.lora_up.weight`` / ``.lora_A.weight`` / LyCORIS          native
                suffixes, ``.alpha``, ``.dora_scale``, ``.diff`` / ``.diff_b``; P native
                (SGM / LDM U-Nets; BFL / MMDiT when ``text_encoders.{clip_l,clip_g,t5xxl}.
                transformer.P`` keys come with them; transformer-only files: the native layout)
ai-toolkit      ``transformer.P.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, P     diffusers
                diffusers names (``diffusers`` calls these "ai-toolkit mixes")
bfl-control     bare BFL names + PEFT suffixes, ``lora_B.bias``, ``*_norm.scale`` (set),     kohya
                ``img_in`` wider than the base (FLUX.1-Depth / Canny LoRAs)
xlabs           ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight``,         kohya
                ``single_blocks.N.processor.{qkv,proj}_lora.…`` (x-flux)
original        bare BFL / MMDiT names (or behind ``transformer.``) + PEFT or kohya          kohya
                suffixes, alpha kept (OneTrainer's ORIGINAL format)
peft-wrapped    ``base_model.model.P.lora_A.weight``, P BFL or diffusers names (fal          peft
                Kontext trainer, flash-SD3 / HunyuanDiT releases)
onetrainer      ``lora_transformer_P`` (P diffusers names, underscored), ``lora_te1_`` CLIP,  kohya /
                ``lora_te2_`` T5 on Flux (CLIP-G on SDXL / SD3), ``lora_te3_`` T5 on SD3,    lycoris
                ``lora_unet_P`` with diffusers names on SDXL, ``dora_scale``; header
                ``ot_branch`` / ``ot_revision``
simpletuner     ``transformer.base_model.model.P.lora_A.weight``; ``lycoris_P`` with         diffusers /
                diffusers names (header ``lycoris_config``); ``lora_unet_P_.…`` (trailing    lycoris
                ``_`` from its converters)
diffusers-old   ``P.processor.to_q_lora.down.weight`` without the ``unet.`` prefix,           diffusers
                ``.safetensors`` or ``pytorch_lora_weights.bin``
==============  ==========================================================================  ===========

cloneofsimo's ``lora_diffusion`` files (``unet:0:up``) and MLX-LM adapters have layouts of their
own (:mod:`loratool.formats.lora_diffusion`, :mod:`loratool.formats.mlx`) and are named as
dialects of them here too.

Detection (:func:`detect`) tries the entries in order; an entry claims a file when one of its
``markers`` groups matches (every regex of the group matches some key, or the header key named by
``meta:``) and every key falls under one of its scopes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from itertools import compress, repeat

# Suffix spellings -> the kohya / LyCORIS suffix (:data:`loratool.formats.kohya.SUFFIXES`) the module
# builder knows, or a special slot: BIAS (PEFT ``lora_B.bias``, Δb = scale · bias), SET (a weight
# replaced outright). Every dialect reads the kohya, LyCORIS and PEFT spellings; ``extra`` ones only
# where the entry names them.
BIAS = "@bias"
SET = "@set"
ALIASES: dict[str, str] = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",  # PEFT's adapter-name infix, left in by some exporters
    "lora_B.default.weight": "lora_up.weight",
    "lora_B.bias": BIAS,
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "set_weight": SET,  # ComfyUI's rename of BFL control norms (comfy/lora_convert.py)
}
EXTRA_ALIASES: dict[str, dict[str, str]] = {
    "down-up": {"down.weight": "lora_down.weight", "up.weight": "lora_up.weight"},  # XLabs, old processors
    "norm-scale": {"scale": SET},  # BFL control LoRAs store the qk-norm scales they set
}


@dataclass(frozen=True)
class Scope:
    """One key prefix of a dialect.

    ``component``: the canonical component, or ``{family: component}`` when it depends on the family.
    ``naming``: ``native`` (the family's single-file names; SD 1.x / 2.x U-Nets use LDM names),
    ``canonical`` (diffusers / HF names) or ``auto`` (native first, then canonical).
    ``joiner``: ``.`` for dotted paths, ``_`` for kohya-flattened ones (restored from the family's
    name tables; one trailing ``_`` is dropped)."""

    prefix: str
    component: str | dict[str, str]
    naming: str = "canonical"
    joiner: str = "."

    def component_for(self, family: str) -> str | None:
        if isinstance(self.component, str):
            return self.component
        return self.component.get(family)


@dataclass(frozen=True)
class Dialect:
    name: str
    layout: str  # the layout it is a variant of (``lycoris`` instead of ``kohya`` when it holds LyCORIS kinds)
    source: str  # where the key names come from
    families: tuple[str, ...]
    scopes: tuple[Scope, ...]
    # Detection: any group whose regexes all match some key ("meta:NAME": the header holds NAME).
    markers: tuple[tuple[str, ...], ...]
    extra: tuple[str, ...] = ()  # names of EXTRA_ALIASES groups this dialect uses
    # Dotted-path rewrites applied before naming (regex, replacement), e.g. XLabs processor names.
    rewrites: tuple[tuple[str, str], ...] = ()
    widen: bool = False  # modules may widen the base weight (delta.widen)
    # Layouts whose own detection comes first: a file they claim is theirs (HunyuanVideo's
    # ``transformer.double_blocks.*`` names are the native layout's, not Flux's).
    defer_to: tuple[str, ...] = ()
    note: str = ""  # what `info` adds to the dialect's name

    @property
    def aliases(self) -> dict[str, str]:
        out = dict(ALIASES)
        for name in self.extra:
            out.update(EXTRA_ALIASES[name])
        return out


UNET = {"sd1": "unet", "sd2": "unet", "sdxl": "unet"}
DENOISER = {**UNET, "flux": "transformer", "sd3": "transformer"}
T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}
COMFY_TEXT = (
    Scope("text_encoders.clip_l.transformer.", "text_encoder"),
    Scope("text_encoders.clip_g.transformer.", "text_encoder_2"),
    Scope("text_encoders.t5xxl.transformer.", T5),
)
XLABS_REWRITES = (
    (r"^double_blocks\.(\d+)\.processor\.qkv_lora1$", r"double_blocks.\1.img_attn.qkv"),
    (r"^double_blocks\.(\d+)\.processor\.qkv_lora2$", r"double_blocks.\1.txt_attn.qkv"),
    (r"^double_blocks\.(\d+)\.processor\.proj_lora1$", r"double_blocks.\1.img_attn.proj"),
    (r"^double_blocks\.(\d+)\.processor\.proj_lora2$", r"double_blocks.\1.txt_attn.proj"),
    # single blocks: the LoRA adds to linear1's q, k, v rows only (x-flux SingleStreamBlockLoraProcessor)
    (r"^single_blocks\.(\d+)\.processor\.qkv_lora$", r"single_blocks.\1.linear1_qkv"),
    (r"^single_blocks\.(\d+)\.processor\.proj_lora$", r"single_blocks.\1.linear2"),
)
PROCESSOR_REWRITES = (  # diffusers < 0.20 attention processors (diffusers.loaders, AttnProcsLayers)
    (r"^(.+?)\.(?:processor\.)?(to_q|to_k|to_v)_lora$", r"\1.\2"),
    (r"^(.+?)\.(?:processor\.)?to_out_lora$", r"\1.to_out.0"),
)

DIALECTS: tuple[Dialect, ...] = (
    Dialect(
        name="xlabs", layout="kohya", families=("flux",), extra=("down-up",), rewrites=XLABS_REWRITES,
        source="XLabs-AI/x-flux src/flux/modules/layers.py (DoubleStreamBlockLoraProcessor, "
               "SingleStreamBlockLoraProcessor; LoRALinearLayer .down / .up, no alpha saved)",
        scopes=(Scope("diffusion_model.", "transformer", "native"), Scope("", "transformer", "native")),
        markers=((r"(^|\.)(double|single)_blocks\.\d+\.processor\.(qkv|proj)_lora\d?\.(down|up)\.weight$",),),
        note="x-flux",
    ),
    Dialect(
        name="bfl-control", layout="kohya", families=("flux",), extra=("norm-scale",), widen=True,
        source="black-forest-labs FLUX.1-Depth-dev-lora / FLUX.1-Canny-dev-lora (keys as read by diffusers "
               "_convert_bfl_flux_control_lora_to_diffusers and ComfyUI comfy/lora_convert.py)",
        scopes=(Scope("", "transformer", "native"),),
        markers=((r"^(double|single)_blocks\.\d+\..*(query|key)_norm\.scale$", r"\.lora_[AB]\.weight$"),),
        note="Flux control LoRA: widens img_in, sets the qk-norm scales",
    ),
    Dialect(
        name="original", layout="kohya", families=("flux", "sd3"),
        source="Nerogar/OneTrainer modules/util/convert_lora_util.py (ORIGINAL format: the model's own names, "
               "lora_A / lora_B, alpha kept); ai-toolkit BFL-named saves behind 'transformer.'",
        scopes=(Scope("", "transformer", "native"), Scope("transformer.", "transformer", "native")),
        defer_to=("native",),
        markers=((r"^(transformer\.)?(double_blocks|single_blocks|joint_blocks)\.\d+\..+\.(lora_[AB]|lora_down|lora_up)"
                  r"\.weight$",),),
        note="the model's own single-file names, no prefix",
    ),
    Dialect(
        name="peft-wrapped", layout="peft", families=("flux", "sd3"),
        source="fal.ai Kontext trainer output (diffusers _convert_fal_kontext_lora_to_diffusers); ComfyUI "
               "comfy/lora.py 'base_model.model.' key map (flash-SD3, HunyuanDiT)",
        scopes=(Scope("base_model.model.", "transformer", "auto"),),
        markers=((r"^base_model\.model\.(double_blocks|single_blocks|joint_blocks|transformer_blocks|"
                  r"single_transformer_blocks)\.\d+\.", r"\.lora_[AB]\.weight$"),),
        note="a PEFT-wrapped transformer saved as one file",
    ),
    Dialect(
        name="simpletuner", layout="diffusers", families=("flux", "sd3", "sdxl", "sd1", "sd2"),
        source="bghira/SimpleTuner simpletuner/helpers/training/save_hooks.py (_save_lycoris: LyCORIS "
               "'lycoris_' names over the diffusers model, header lycoris_config); PEFT-wrapped saves "
               "'transformer.base_model.model.' (ComfyUI issue #4347); trailing '_' heads (ComfyUI #4347)",
        scopes=(Scope("transformer.base_model.model.", "transformer"),
                Scope("lycoris_", DENOISER, "canonical", "_"),
                Scope("lora_unet_", DENOISER, "canonical", "_")),
        markers=((r"^transformer\.base_model\.model\.",), ("meta:lycoris_config", r"^lycoris_"),
                 (r"^lora_unet_\w+_\.",)),
    ),
    Dialect(
        name="onetrainer", layout="kohya", families=("flux", "sd3", "sdxl", "sd1", "sd2"),
        source="Nerogar/OneTrainer modules/util/convert_lora_util.py (convert_to_mixture: 'lora_transformer', "
               "'lora_te{i}'), modules/model/FluxModel.py (lora_te2 = T5), StableDiffusionXLModel.py; header "
               "ot_branch / ot_revision (modules/modelSaver/mixin/DtypeModelSaverMixin.py)",
        scopes=(Scope("lora_transformer_", "transformer", "canonical", "_"),
                Scope("lora_unet_", DENOISER, "auto", "_"),
                Scope("lora_te1_", "text_encoder", "canonical", "_"),
                Scope("lora_te2_", "text_encoder_2", "canonical", "_"),
                Scope("lora_te3_", "text_encoder_3", "canonical", "_"),
                Scope("lora_te_", "text_encoder", "canonical", "_")),
        # its header: ot_branch / ot_revision (modules/modelSaver/mixin/DtypeModelSaverMixin.py)
        markers=((r"^lora_transformer_",), (r"^lora_te2_encoder_block_\d+_",), ("meta:ot_revision",)),
    ),
    Dialect(
        name="ai-toolkit", layout="diffusers", families=("flux", "sd3"),
        source="ostris/ai-toolkit toolkit/network_mixins.py (save: diffusers names, kohya suffixes); "
               "diffusers _convert_kohya_flux_lora_to_diffusers ('has_peft_state_dict' mixes)",
        scopes=(Scope("transformer.", "transformer"), Scope("lora_unet_", DENOISER, "auto", "_"),
                Scope("lora_te1_", "text_encoder", "canonical", "_")),
        markers=((r"^transformer\..+\.(lora_down|lora_up)\.weight$",),),
    ),
    Dialect(
        # transformer-only ComfyUI files are the native layout's own (loratool.formats.native); this
        # entry takes the ones it does not hold: U-Net families and text encoders beside the model
        name="comfyui", layout="native", families=("flux", "sd3", "sdxl", "sd1", "sd2"),
        source="comfyanonymous/ComfyUI comfy_extras/nodes_lora_extract.py (LoraSave: 'diffusion_model.', "
               "'text_encoders.'), comfy/lora.py (model_lora_keys_unet / _clip); OneTrainer COMFY saves",
        scopes=(Scope("diffusion_model.", DENOISER, "native"), *COMFY_TEXT),
        markers=((r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.",),
                 (r"^text_encoders\.(clip_l|clip_g|t5xxl)\.transformer\.",)),
    ),
    Dialect(
        name="diffusers-old", layout="diffusers", families=("sd1", "sd2", "sdxl"), extra=("down-up",),
        rewrites=PROCESSOR_REWRITES,
        source="diffusers < 0.20 AttnProcsLayers.save_attn_procs (keys without the 'unet.' prefix; "
               "ComfyUI comfy/lora.py 'diffusers_lora_prefix' ['', 'unet.'])",
        scopes=(Scope("", UNET),),
        markers=((r"^(down_blocks|up_blocks|mid_block)\.\d+\..*\.(?:processor\.)?to_(q|k|v|out)_lora\."
                  r"(down|up)\.weight$",),),
    ),
)


@dataclass(frozen=True)
class _Marker:
    pattern: re.Pattern
    literals: tuple[str, ...]  # texts every match contains (none known: ()), the longest first


@dataclass(frozen=True)
class _Compiled:
    dialect: Dialect
    markers: tuple[tuple[_Marker | str, ...], ...] = field(default=())
    prefixes: tuple[str, ...] = ()


_REGEX_SYNTAX = set(".^$*+?{}[]|()\\")
_CLASS_ESCAPES = set("dwsDWSbBAZ")  # escapes that match a class of characters or a position


def required_literals(pattern: str) -> tuple[str, ...]:
    """The runs of plain characters outside any group, class or quantifier of ``pattern``, longest first: texts
    every match contains. () when the pattern has a top-level ``|``, inline flags or escapes not read here."""
    if "(?" in pattern.replace("(?:", ""):
        return ()
    runs, run, depth, i = [], "", 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            char, width = pattern[i + 1], 2  # an escaped punctuation mark: itself
        elif c in _REGEX_SYNTAX:
            char, width = None, 1
            if c == "\\":
                if pattern[i + 1:i + 2] not in _CLASS_ESCAPES:
                    return ()  # \x41, \1...: not worth reading
                width = 2
            elif c == "[":
                start = i + 1 + (pattern[i + 1:i + 2] == "^")
                end = pattern.find("]", start + 1)
                if end < 0 or "\\" in pattern[i:end]:
                    return ()
                width = end - i + 1
            elif c == "{":
                end = pattern.find("}", i)
                if end < 0:
                    return ()
                width = end - i + 1  # a repeat count, not text
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            elif c == "|" and depth == 0:
                return ()
        else:
            char, width = c, 1
        quantified = pattern[i + width:i + width + 1] in ("?", "*", "+", "{")
        if char is not None and depth == 0 and not quantified:
            run += char
        else:
            runs.append(run)
            run = ""
        i += width
    return tuple(sorted({r for r in [*runs, run] if r and "\n" not in r}, key=lambda r: (-len(r), r)))


@cache
def _compiled() -> tuple[_Compiled, ...]:
    out = []
    for d in DIALECTS:
        groups = tuple(tuple(m if m.startswith("meta:") else _Marker(re.compile(m), required_literals(m)) for m in g)
                       for g in d.markers)
        out.append(_Compiled(d, groups, tuple(s.prefix for s in d.scopes)))
    return tuple(out)


def _group_matches(group, keys: list[str], joined: str, metadata: dict[str, str]) -> bool:
    """Whether every marker of ``group`` matches some key (``joined``: the keys, one a line)."""
    for m in group:
        if isinstance(m, str):
            if m[len("meta:"):] not in metadata:
                return False
            continue
        # Every file of a folder scan is asked about every marker: a text no key holds rules a marker out with
        # one substring search; else the regex runs on the keys holding its longest text (C-level loops).
        if any(lit not in joined for lit in m.literals):
            return False
        found = compress(keys, map(str.__contains__, keys, repeat(m.literals[0]))) if m.literals else keys
        if next(filter(m.pattern.search, found), None) is None:
            return False
    return True


def detect(src) -> Dialect | None:
    """The dialect ``src`` is written in (None: the layout's plain form, or no dialect knows it)."""
    if src.config is not None:
        return None  # a config beside the weights (PEFT folder, loralib sidecar): the layout's own
    keys = src.keys
    if not keys:
        return None
    joined = "\n".join(keys)
    for c in _compiled():
        # the scopes first: a foreign key ends that test at once, where a marker search reads every key
        if not ("" in c.prefixes or all(map(str.startswith, keys, repeat(c.prefixes)))):
            continue
        if any(_group_matches(g, keys, joined, src.metadata) for g in c.markers) and not _deferred(c.dialect, src):
            return c.dialect
    return None


def _deferred(dialect: Dialect, src) -> bool:
    from loratool import formats

    return any(formats.layout(name).detect(src) for name in dialect.defer_to)


def by_name(name: str) -> Dialect:
    for d in DIALECTS:
        if d.name == name:
            return d
    raise KeyError(name)
