"""Model families: naming knowledge as data, one :class:`Family` per architecture.

A family says how kohya names a model (prefix → component, the module paths its keys are
built from) and how those native names map to the canonical HF / diffusers naming. Family
modules (``sd``, ``llm`` here; ``sdxl``, ``sd3``, ``flux`` when present) expose ``FAMILY`` or
``FAMILIES``; :func:`families` collects them once. Module-path tables are generated from the
real models by ``python -m loratool.arch.generate`` and shipped as JSON beside this file.

Adding a family (the detection hook): a module listed in :data:`FAMILY_MODULES` exposes a
:class:`Family` whose ``evidence(ev: Evidence) -> (score, why)`` scores an adapter's canonical module
names, shapes, metadata and configs on the scale of :mod:`loratool.arch.evidence` (100 declared, 90
names only it has, 70 widths of its published models, 40 shared structure, 0 not it), and whose
``merges_into`` names the families (and stand-alone base kinds: ``clip``, ``t5``) its LoRAs may be
merged into besides its own. :func:`family_of` (every reader, through ``api.read_source``, sets
``Adapter.family`` with it), :func:`check_family` (``--family``) and the merge's family check then know
the new family with no other change. ``detect(keys, metadata)`` scores kohya keys before a kohya file
is read (it picks the name table); return 0 when the family has no kohya naming.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.arch.evidence import Evidence, Identity, Mismatch, Width, best, conflict, identify
from loratool.errors import FormatError, UsageError

DATA = Path(__file__).parent
# Family modules in detection-tie order; the optional ones are written by others and may be absent.
FAMILY_MODULES = ("sd", "sdxl", "sd3", "flux", "llm",
                  # DiT families (arch/dit.py builds them from data)
                  "wan", "hunyuan_video", "ltx", "qwen_image", "z_image", "lumina2", "hidream", "flux2", "chroma",
                  "krea2", "anima", "ernie_image")


@dataclass
class Family:
    name: str  # "sd1", "sd2", "sdxl", "sd3", "flux", "llm"
    kohya_prefixes: dict[str, str]  # "lora_unet" -> "unet", "lora_te1" -> "text_encoder", ...
    # component -> dotted module paths in the naming kohya uses for this family (SDXL: SGM names)
    native_paths: Callable[[str], set[str]]
    to_canonical: Callable[[list[LoraModule]], list[LoraModule]]  # native -> HF/diffusers naming
    from_canonical: Callable[[list[LoraModule]], list[LoraModule]]  # inverse, exact
    # score from kohya keys + metadata (ss_base_model_version, modelspec.architecture); highest wins
    detect: Callable[[list[str], dict[str, str]], int]
    # score (and why) from canonical names, shapes, metadata and configs: see loratool.arch.evidence
    evidence: Callable[[Evidence], tuple[int, str]] | None = None
    # other families / base kinds ("clip", "t5") this family's LoRAs may be merged into by name
    merges_into: tuple[str, ...] = ()
    # the variant an adapter's evidence names (FLUX.1-dev from guidance modules...), None when it does not tell
    variant: Callable[[Evidence], str | None] | None = None
    # the widths its adapted weights fix (``info``, ``check``): see loratool.arch.evidence.Width
    widths: tuple[Width, ...] = ()
    # modules a base of this family may lack, explained per group (another variant's): ``check`` / ``merge``
    mismatches: tuple[Mismatch, ...] = ()
    # {kohya head or module path: (rows, in-features)} -> False when the widths are a look-alike family's
    # (FLUX.2 and Flux.1 share kohya names, not linear1's rows): vetoes a :attr:`detect` score from names
    shapes_fit: Callable[[Mapping[str, tuple[int, ...]]], bool] | None = None
    # (canonical modules, metadata) -> the modules in the naming the kohya writer uses, where that depends on the
    # adapter (HunyuanVideo: FramePack LoRAs keep diffusers' names); None: from_canonical
    kohya_from_canonical: Callable[[list[LoraModule], Mapping[str, str]], list[LoraModule]] | None = None

    @property
    def components(self) -> list[str]:
        return list(dict.fromkeys(self.kohya_prefixes.values()))


def identity(modules: list[LoraModule]) -> list[LoraModule]:
    """to/from_canonical of a family whose kohya names already are the HF / diffusers names."""
    return list(modules)


@cache
def load_table(name: str) -> Any:
    """A JSON table shipped in ``loratool/arch`` (``sd``, ``llm``, ...)."""
    path = DATA / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FormatError(f"{path}: naming table missing from the installation ({exc.strerror})") from None


@cache
def families() -> dict[str, Family]:
    """Every registered family by name, in :data:`FAMILY_MODULES` order."""
    found: dict[str, Family] = {}
    for mod_name in FAMILY_MODULES:
        full = f"loratool.arch.{mod_name}"
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name != full:
                raise
            continue
        fams = list(getattr(mod, "FAMILIES", ()))
        if getattr(mod, "FAMILY", None) is not None:
            fams.append(mod.FAMILY)
        for fam in fams:
            found[fam.name] = fam
    return found


def get(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise FormatError(f"unknown model family {name!r}; known: {', '.join(fams)}")
    return fams[name]


# detect() scores at or above this come from the metadata naming the family: shapes do not overrule them
DECLARED_SCORE = 100


def detect(keys: list[str], metadata: dict[str, str],
           shapes: Mapping[str, tuple[int, ...]] | None = None) -> Family | None:
    """The family scoring highest on these kohya keys and metadata (None when all score 0); ``shapes``
    ({key head: (rows, in-features)}: :func:`loratool.shapes.module_shapes`) rule out a family whose widths
    they contradict (``Family.shapes_fit``)."""
    best, best_score = None, 0
    for fam in families().values():
        score = fam.detect(keys, metadata)
        if 0 < score < DECLARED_SCORE and shapes and fam.shapes_fit is not None and not fam.shapes_fit(shapes):
            score = 0
        if score > best_score:
            best, best_score = fam, score
    return best


def _evidence(adapter: Adapter | None, kohya_keys) -> Evidence:
    if adapter is None:
        return Evidence({}, kohya_keys=tuple(kohya_keys))
    return Evidence.of(adapter, tuple(kohya_keys))


def family_of(adapter: Adapter, kohya_keys: list[str] | tuple[str, ...] = ()) -> str | None:
    """The family an adapter is for, from its names, shapes, metadata and configs (and its kohya keys
    when it was read from a kohya-named file); None when unknown or ambiguous."""
    verdict = best(_evidence(adapter, kohya_keys), families())
    return None if verdict is None else verdict.family


def identity_of(adapter: Adapter, kohya_keys: list[str] | tuple[str, ...] = ()) -> Identity:
    """The family (``adapter.family`` when set), variant and widths of the base ``adapter`` needs
    (:func:`loratool.arch.evidence.identify`)."""
    return identify(_evidence(adapter, kohya_keys), families(), adapter.family)


def check_family(name: str, adapter: Adapter | None, kohya_keys: list[str] | tuple[str, ...] = ()) -> Family:
    """``--family name`` for ``adapter`` (None: only its kohya keys are known yet): the family, or a
    :class:`UsageError` when the names or widths are another family's (an SD3 LoRA named with Flux
    names would load nowhere)."""
    fam = get(name)
    why = conflict(name, _evidence(adapter, kohya_keys), families())
    if why is not None:
        raise UsageError(f"{why}; drop --family, or pass the family the adapter was trained for")
    return fam
