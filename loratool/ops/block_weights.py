"""Per-module strength: LoRA Block Weight vectors and presets, and ``PATTERN:VALUE`` strengths.

The block of a module (tables in ``arch/block_weights.json``, from the sd-webui-lora-block-weight
extension):

* SD 1.x / 2.x / SDXL: text-encoder modules are ``BASE``; a U-Net module takes the block of its
  LDM/SGM name (``input_blocks.i`` → ``INii``, ``middle_block`` → ``M00``, ``output_blocks.i`` →
  ``OUTii``; the diffusers → SGM translation is :func:`loratool.arch.sdxl.diffusers_to_sgm`);
  ``time_embedding``, ``add_embedding``, ``conv_out``… are in no block.
* Flux.1: ``CLIP`` (text_encoder), ``T5`` (text_encoder_2), ``IN`` (img_in, txt_in, time_in,
  vector_in, guidance_in), ``Dii`` (double block i), ``Sii`` (single block i), ``OUT`` (final layer).

A vector (``--block-weights``) is a preset name (``INS``, ``MIDD``, ``OUTALL``, ``FLUXALL``…),
or comma-separated numbers whose count says which IDs they are: 12 / 17 / 20 / 26 (SD: the
extension's BLOCKID12 … BLOCKID26) or 61 (Flux: CLIP, T5, IN, D00–D18, S00–S37, OUT); 57 numbers
are D00–D18 and S00–S37 alone (CLIP, T5, IN, OUT keep 1). Two conventions for the blocks a
short vector does not list:

* ``a,b,c,…`` (the extension's syntax): weight 0, as its ``to26`` fills them;
* ``[a, b, c, …]`` (JSON, kohya sd-scripts' ``--lbws``): weight 1 (kohya scales only the listed blocks).

A module in no block keeps weight 1 (both tools do) and is named in a warning.

Strength patterns (``--strength PATTERN:VALUE``, repeatable, the last match wins and replaces the
block weight): PATTERN is a glob (``fnmatch``, case-sensitive, ``*`` crosses dots) matched
against the module's block ID, component, path and ``component.path``, or a plain name matching
when it is a run of whole dotted segments of one of them (``text_encoder``, ``up_blocks.1``,
``conv1``, ``attn1.to_q``, ``OUT03``; globs: ``unet.up_blocks.*``, ``*.to_[qk]``).

The factor multiplies the module's strength: merge W' = W + λ·f·ΔW; stack wᵢ·f·ΔWᵢ.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.arch import load_table
from loratool.errors import UsageError

SCHEME_OF_FAMILY = {"sd1": "sd", "sd2": "sd", "sdxl": "sd", "flux": "flux"}
# Up-block levels with attention (their upsampler sits at ``.2.conv``): SD 1.x/2.x vs SDXL.
_UP_ATTENTION = {"sd1": {1, 2, 3}, "sd2": {1, 2, 3}, "sdxl": {0, 1}}
FLUX_BLOCKS_ONLY = 57  # D00–D18 + S00–S37 (a loratool shorthand; see the module docstring)


@cache
def tables() -> dict[str, Any]:
    return load_table("block_weights")


def _ids(n: int) -> list[str] | None:
    ids = tables()["ids"]
    if str(n) in ids:
        return list(ids[str(n)])
    if n == FLUX_BLOCKS_ONLY:
        return list(ids["61"][3:-1])
    return None


def scheme_of(ids: list[str]) -> str:
    return "flux" if "D00" in ids else "sd"


# ------------------------------------------------------------------ which block a module is in
def guess_family(adapter: Adapter) -> str | None:
    """``sd1`` / ``sdxl`` / ``flux`` from the reader's decision, else from component and path names."""
    if adapter.family in SCHEME_OF_FAMILY:
        return adapter.family
    comps = set(adapter.components)
    if "unet" in comps:
        return "sdxl" if "text_encoder_2" in comps else "sd1"
    if "transformer" in comps and any(m.path.startswith(("transformer_blocks.", "single_transformer_blocks."))
                                      for m in adapter.by_component("transformer")):
        return "flux"
    return None


def block_of(module: LoraModule, family: str) -> str | None:
    """The LoRA Block Weight ID controlling ``module`` (None: in no block)."""
    scheme = SCHEME_OF_FAMILY.get(family)
    if scheme is None:
        return None
    table = tables()["schemes"][scheme]
    if module.component in table["components"]:
        return table["components"][module.component]
    if scheme == "sd":
        if module.component != "unet":
            return None
        from loratool.arch.sdxl import diffusers_to_sgm

        ldm = diffusers_to_sgm(module.path, 2, _UP_ATTENTION[family])
        if ldm is None:
            return None
        for block, prefix in table["unet_ldm_prefixes"].items():
            if ldm == prefix or ldm.startswith(prefix + "."):
                return block
        return None
    if module.component != "transformer":
        return None
    head, _, rest = module.path.partition(".")
    if head in table["indexed"]:
        index = rest.split(".", 1)[0]
        return f"{table['indexed'][head]}{int(index):02}" if index.isdigit() else None
    return table["prefixes"].get(head)


def block_map(adapter: Adapter, family: str | None = None) -> tuple[str | None, dict[str, list[str]]]:
    """(family, {block ID: modules it controls}) in the order of the full ID list; ``""`` holds the rest."""
    family = family or guess_family(adapter)
    if family not in SCHEME_OF_FAMILY:
        return family, {"": [f"{m.component}:{m.path}" for m in adapter]}
    order = _ids(61 if SCHEME_OF_FAMILY[family] == "flux" else 26) or []
    found: dict[str, list[str]] = {b: [] for b in order}
    found[""] = []
    for m in adapter:
        found.setdefault(block_of(m, family) or "", []).append(f"{m.component}:{m.path}")
    return family, found


# ------------------------------------------------------------------ parsing vectors and patterns
@dataclass(frozen=True)
class BlockVector:
    """Weights per block ID; ``unlisted`` is the weight of the scheme's IDs the vector does not list."""

    scheme: str
    weights: dict[str, float]
    unlisted: float
    text: str

    def weight(self, block: str | None) -> float:
        if block is None:
            return 1.0
        return self.weights.get(block, self.unlisted)


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--block-weights {where!r}: {text!r} is not a number (random entries R / U / X "
                         f"of the extension are not supported)") from None
    if not math.isfinite(value):
        raise UsageError(f"--block-weights {where!r}: {text!r} is not a finite number")
    return value


def parse_block_weights(text: str) -> BlockVector:
    """A preset name, ``a,b,c`` numbers (extension) or a JSON list (kohya ``--lbws``)."""
    raw = text.strip()
    presets = tables()["presets"]
    if raw in presets:
        values, unlisted = [float(v) for v in presets[raw]], 0.0
    elif raw.startswith("["):
        try:
            values = json.loads(raw)
        except json.JSONDecodeError:
            raise UsageError(f"--block-weights {text!r}: not a JSON list of numbers") from None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise UsageError(f"--block-weights {text!r}: not a JSON list of numbers")
        values, unlisted = [_number(str(v), text) for v in values], 1.0
    elif "," in raw or _is_number(raw):
        values, unlisted = [_number(v.strip(), text) for v in raw.split(",")], 0.0
    else:
        raise UsageError(f"--block-weights {text!r}: not a preset ({', '.join(presets)}) or a list of numbers")
    ids = _ids(len(values))
    if ids is None:
        raise UsageError(f"--block-weights {text!r}: {len(values)} numbers; give 12, 17, 20 or 26 (SD / SDXL), "
                         f"61 or {FLUX_BLOCKS_ONLY} (Flux)")
    scheme = scheme_of(ids)
    if len(values) == FLUX_BLOCKS_ONLY:
        unlisted = 1.0
    return BlockVector(scheme, dict(zip(ids, values)), unlisted, raw)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_strength(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition(":")
    if not sep or not pattern:
        raise UsageError(f"--strength {text!r}: write PATTERN:VALUE (e.g. 'text_encoder:0.5')")
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"--strength {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise UsageError(f"--strength {text!r}: the value must be finite")
    return pattern, number


def _matches(pattern: str, names: list[str]) -> bool:
    glob = any(c in pattern for c in "*?[")
    for name in names:
        if glob and fnmatch.fnmatchcase(name, pattern):
            return True
        if not glob and f".{pattern}." in f".{name}.":
            return True
    return False


# ------------------------------------------------------------------ the factor of each module
@dataclass
class ModuleWeights:
    """f(input i, module): the block weight of input i's vector, replaced by the last matching strength."""

    vectors: list[BlockVector | None]  # one per input
    families: list[str | None]
    strengths: list[tuple[str, float]] = field(default_factory=list)
    _seen: dict[tuple[int, str, str], tuple[str | None, float]] = field(default_factory=dict)
    _used_patterns: set[int] = field(default_factory=set)

    def factor(self, i: int, module: LoraModule) -> float:
        key = (i, module.component, module.path)
        if key not in self._seen:
            family = self.families[i]
            block = block_of(module, family) if family else None
            vector = self.vectors[i]
            value = vector.weight(block) if vector is not None else 1.0
            names = [module.component, module.path, f"{module.component}.{module.path}"] + ([block] if block else [])
            for n, (pattern, strength) in enumerate(self.strengths):
                if _matches(pattern, names):
                    value = strength
                    self._used_patterns.add(n)
            self._seen[key] = (block, value)
        return self._seen[key][1]

    def scaled(self, weights: Sequence[float], entries: list[tuple[int, LoraModule]]) -> list[float]:
        """``weights`` with wᵢ·f(i, module) for the inputs holding this module."""
        out = [float(w) for w in weights]
        for i, m in entries:
            out[i] = out[i] * self.factor(i, m)
        return out

    def warnings(self) -> list[str]:
        out = []
        outside: dict[int, list[str]] = {}
        for (i, comp, path), (block, _) in self._seen.items():
            if block is None and self.vectors[i] is not None:
                outside.setdefault(i, []).append(f"{comp}:{path}")
        for i, names in outside.items():
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            out.append(f"input {i + 1}: {len(names)} modules are in no LoRA Block Weight block and keep weight 1 "
                       f"(unless a --strength pattern matched them): {shown}")
        for n, (pattern, value) in enumerate(self.strengths):
            if n not in self._used_patterns:
                out.append(f"--strength '{pattern}:{value:g}' matched no module")
        return out

    def describe(self) -> dict[str, Any]:
        return {"block_weights": [v.text if v is not None else None for v in self.vectors],
                "strengths": [f"{p}:{v:g}" for p, v in self.strengths]}


def module_weights(adapters: Sequence[Adapter], block_weights: Sequence[str] | None,
                   strengths: Sequence[str] | None, *, family: str | None = None) -> ModuleWeights:
    """Parse ``--block-weights`` (once for all inputs, or once per input) and ``--strength``."""
    n = len(adapters)
    texts = list(block_weights or [])
    if len(texts) not in (0, 1, n):
        raise UsageError(f"--block-weights given {len(texts)} times for {n} LoRAs: give it once, or once per LoRA")
    vectors: list[BlockVector | None] = [None] * n
    if texts:
        parsed = [parse_block_weights(t) for t in texts]
        vectors = parsed * n if len(parsed) == 1 else parsed
    families: list[str | None] = []
    for i, (adapter, vector) in enumerate(zip(adapters, vectors)):
        fam = family if family in SCHEME_OF_FAMILY else guess_family(adapter)
        if vector is not None:
            if fam is None:
                raise UsageError(f"--block-weights: input {i + 1} is not an SD / SDXL / Flux LoRA (block weights "
                                 f"are defined for those); pass --family, or use --strength patterns")
            if SCHEME_OF_FAMILY[fam] != vector.scheme:
                raise UsageError(f"--block-weights {vector.text!r} is a {vector.scheme.upper()} vector but input "
                                 f"{i + 1} is a {fam} LoRA")
        families.append(fam)
    return ModuleWeights(vectors, families, [parse_strength(s) for s in strengths or []])


def apply_to_plan(plan: Any, weights: ModuleWeights) -> None:
    """Multiply every merge application's strength by its module's factor (a ``MatchPlan``)."""
    for apps in plan.applications.values():
        for app in apps:
            app.strength = app.strength * weights.factor(app.adapter, app.module)


@dataclass
class BlockReport:
    """Which modules each LoRA Block Weight entry controls (``loratool info --blocks``)."""

    path: str
    family: str | None
    blocks: dict[str, list[str]]  # block ID -> "component:path"; "" = in no block

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "family": self.family,
                "blocks": {b: mods for b, mods in self.blocks.items() if b},
                "in_no_block": self.blocks.get("", [])}


def block_report(path: str, format: str | None = None, *, base: str | None = None, config: str | None = None,
                 family: str | None = None) -> BlockReport:
    from loratool.api import load

    adapter = load(path, format, base=base, config=config, family=family)
    fam, blocks = block_map(adapter, family)
    return BlockReport(str(path), fam, blocks)
