"""DiT families (Wan, HunyuanVideo, LTX, Qwen-Image, Z-Image, Lumina 2, HiDream, Flux.2, Chroma, ...):
one :class:`DitFamily` per architecture, built from data.

A DiT family has one component, ``transformer``, whose canonical naming is diffusers' model class
(``WanTransformer3DModel``, ...). Its native naming is the original repository's, which ComfyUI,
musubi-tuner and diffusion-pipe use for LoRA keys (``diffusion_model.blocks.0.self_attn.q``,
``lora_unet_blocks_0_self_attn_q``) and BFL/Comfy-style single files use for weights. A family
holds:

* ``naming``: native module -> diffusers module(s) (a :class:`~loratool.arch.fused.FusedNaming`;
  several targets = row-fused, split / fused exactly by :mod:`loratool.arch.fused`);
* ``spellings``: other native spellings that are read but never written (ComfyUI's Flux-style HunyuanVideo
  names, its fused HunyuanVideo 1.5 q/k/v);
* ``params``: native parameters outside any LoRA-able module (RMSNorm scales stored as ``scale``,
  ``modulation`` tables) -> diffusers parameters, for single-file checkpoints;
* a JSON table ``<table>.json`` generated from diffusers' model class on the ``meta`` device by
  ``scripts/gen_dit_tables.py``: the published variants' configs and every weight-owning module
  path in both namings (block 0 only: kohya name restoration templates the block index). kohya
  heads lose their dots; they are restored from this table (so ``adaLN_modulation`` or
  ``noise_refiner`` are never split at their underscores by guessing).

Families whose native names are diffusers' own (Qwen-Image, HiDream, ERNIE-Image) or differ by a few words
(LTX-Video, LTX-2: ``renames``) give no ``naming``: it is built from the table.

A native diffusion model may hold a second diffusers model under one of its modules (Anima's ``llm_adapter``
is diffusers' ``AnimaTextConditioner``, the pipeline's ``text_conditioner`` component): a :class:`SubModel`.
Native and kohya files name its modules ``<native prefix>.<path>`` inside the diffusion model; canonically they
are ``<path>`` in their own component, checked against the sub-model's generated table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cache, cached_property

from loratool.adapter import LoraModule
from loratool.arch import Family, fused, load_table
from loratool.arch.evidence import Mismatch
from loratool.errors import MatchError
from loratool.formats.kohya_names import template as template  # block indices as #

COMPONENT = "transformer"
# Prefixes in front of dotted native LoRA keys and single-file weights.
NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# kohya prefixes: musubi-tuner / sd-scripts ``lora_unet_``; VideoX-Fun (Wan-Fun) ``lora_unet__`` (an empty
# module name before the path); SimpleTuner's LyCORIS export ``lycoris_`` is generic (see kohya_names).
KOHYA_PREFIXES = {"lora_unet": COMPONENT, "lora_unet_": COMPONENT}
# Module paths each family remembers the answer of knows() for (a library's files share their paths).
KNOWN_PATHS = 1 << 15


@dataclass(frozen=True)
class SubModel:
    """A second diffusers model the native diffusion model holds under ``native_prefix`` with the same module
    names below it (Anima: ``llm_adapter.blocks.0.self_attn.q_proj`` is ``text_conditioner``'s
    ``blocks.0.self_attn.q_proj``)."""

    native_prefix: str  # "llm_adapter"
    component: str  # the diffusers pipeline component: "text_conditioner"
    table: str  # JSON table generated from ``diffusers_class`` by scripts/gen_dit_tables.py
    diffusers_class: str  # "AnimaTextConditioner"

    @cached_property
    def data(self) -> dict:
        return load_table(self.table)

    @cached_property
    def templates(self) -> frozenset[str]:
        return frozenset(template(p) for p in self.data["diffusers_modules"])

    def knows(self, path: str) -> bool:
        """Whether ``path`` (canonical, no prefix) is a module of the sub-model."""
        return template(path) in self.templates

    def inner(self, native: str) -> str | None:
        """The canonical path of a native ``<prefix>.<path>``; None when it is not one of the sub-model's."""
        head = self.native_prefix + "."
        if not native.startswith(head):
            return None
        rest = native[len(head):]
        return rest if self.knows(rest) else None

    def native(self, path: str) -> str:
        return f"{self.native_prefix}.{path}"


@dataclass(frozen=True)
class DitFamily:
    name: str  # the arch family name: "wan"
    title: str  # "Wan 2.1 / 2.2"
    table: str  # JSON table name in loratool/arch
    diffusers_class: str  # "WanTransformer3DModel"
    other_classes: tuple[str, ...] = ()  # diffusers classes of variants (FramePack's)
    # model_index.json ``_class_name`` prefixes of its pipelines
    pipelines: tuple[str, ...] = ()
    naming: fused.FusedNaming | None = None  # None: native names are diffusers names (identity)
    spellings: tuple[fused.FusedNaming, ...] = ()
    params: fused.FusedNaming | None = None  # native parameter -> diffusers parameter (single files)
    spelling_params: fused.FusedNaming | None = None  # the same for files in the other spelling
    # diffusers block lists (identity families): "transformer_blocks", ...
    block_lists: tuple[str, ...] = ()
    # identity families whose native names differ by a few words: (regex on the diffusers path, native text)
    renames: tuple[tuple[str, str], ...] = ()
    # lower-case substrings of ``ss_base_model_version`` / ``modelspec.architecture`` naming this family
    metadata: tuple[str, ...] = ()
    # metadata substrings that name another family although they contain one of ours ("flux" in "flux.2")
    not_metadata: tuple[str, ...] = ()
    # families whose LoRAs may be merged into this one's models by name (Flux.1 into Chroma: the
    # modules Chroma lacks are explained per group, not refused as another family)
    merges_into: tuple[str, ...] = ()
    # regexes on module paths (either naming) only this family has: a hit makes detection sure
    markers: tuple[str, ...] = ()
    # stored single-file keys (prefix removed) that say "this is one of ours"; all must be present
    single_file_marks: tuple[str, ...] = ()
    # stored keys whose presence says it is not (another family sharing the marks)
    single_file_not: tuple[str, ...] = ()
    # ({canonical transformer module path: adapted weight shape}, metadata) -> variant text for ``info``
    variant: Callable[[Mapping[str, tuple[int, ...]], Mapping[str, str]], str | None] | None = None
    # (shapes by stored key) -> variant text of a base checkpoint
    base_variant: Callable[[Mapping[str, tuple[int, ...]]], str | None] | None = None
    # shapes of canonical modules -> True when they fit this family (tie-breaks look-alike families)
    shapes_fit: Callable[[Mapping[str, tuple[int, ...]]], bool] | None = None
    mismatches: tuple[Mismatch, ...] = ()
    # the naming covers the LoRA targets the family's converters know, not every module (Anima: no norms)
    partial: bool = False
    # names shared with a more common family (Chroma's are Flux.1's): claim a file only on a marker or metadata
    needs_marker: bool = False
    # markers that only count in dotted keys: a kohya head loses the dot that tells them apart
    # (HunyuanVideo's ``img_attn_qkv`` and Flux.1's ``img_attn.qkv`` are both ``img_attn_qkv``)
    dotted_markers: tuple[str, ...] = ()
    extra_kohya_prefixes: dict[str, str] = field(default_factory=dict)
    # second diffusers models inside the native diffusion model (Anima's llm_adapter = text_conditioner)
    submodels: tuple[SubModel, ...] = ()
    # (canonical modules, metadata) -> True for an adapter of a variant whose kohya files keep diffusers' names
    # (HunyuanVideo's FramePack: musubi-tuner's networks/lora_framepack.py): the kohya writer writes those; the
    # kohya reader records heads that were diffusers names of the family as ``hints["kohya_names"] = "diffusers"``
    diffusers_named: Callable[[list[LoraModule], Mapping[str, str]], bool] | None = None

    # --- namings -----------------------------------------------------------------------------
    @cached_property
    def data(self) -> dict:
        return load_table(self.table)

    @cached_property
    def primary(self) -> fused.FusedNaming:
        """The naming written back (kohya, native): the original repository's, or the identity."""
        if self.naming is not None:
            return self.naming
        return identity_naming(self.title, self.data["diffusers_modules"], self.block_lists, self.renames)

    @cached_property
    def param_naming(self) -> fused.FusedNaming | None:
        """Native parameter -> diffusers parameter for parameters outside the modules (``params``, or the
        identity over the table's ``diffusers_params`` when native names are diffusers names)."""
        if self.params is not None or self.naming is not None:
            return self.params
        return identity_naming(self.title, self.data.get("diffusers_params", ()), self.block_lists, self.renames)

    @property
    def namings(self) -> tuple[fused.FusedNaming, ...]:
        return (self.primary, *self.spellings)

    def native_module_paths(self) -> set[str]:
        """Every native module path (block 0): the primary naming's, the diffusers ones, and the other spellings'
        where their kohya (underscore) form is new — where it is not, both spell the same modules and the
        primary naming restores it."""
        data = self.data
        out = set(data["native_modules"]) | set(data["diffusers_modules"])
        flat = {p.replace(".", "_") for p in out}
        out |= {p for p in data.get("spelling_modules", ()) if p.replace(".", "_") not in flat}
        return out | {sub.native(p) for sub in self.submodels for p in sub.data["diffusers_modules"]}

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components this family's LoRAs adapt: ``transformer`` and the sub-models'."""
        return (COMPONENT, *(sub.component for sub in self.submodels))

    def submodel(self, component: str) -> SubModel | None:
        return next((sub for sub in self.submodels if sub.component == component), None)

    def inner_of(self, native: str) -> tuple[SubModel, str] | None:
        """(sub-model, canonical path) of a native path inside a sub-model; None otherwise."""
        for sub in self.submodels:
            inner = sub.inner(native)
            if inner is not None:
                return sub, inner
        return None

    @cached_property
    def _known(self) -> dict[str, bool]:
        return {}

    def knows(self, path: str) -> bool:
        """Whether ``path`` is a module of this family in any naming (sub-models' under their native prefix)."""
        known = self._known  # every family is asked about every module of every file a folder scan reads
        hit = known.get(path)
        if hit is None:
            if len(known) >= KNOWN_PATHS:
                known.clear()
            hit = known[path] = self.inner_of(path) is not None or any(
                n.diffusers_of(path) is not None or n.native_of(path) is not None for n in self.namings)
        return hit

    def diffusers_only(self, path: str) -> bool:
        """A diffusers module path of this family that no native naming spells the same way."""
        return _is_diffusers(self, path) and all(n.diffusers_of(path) is None for n in self.namings)

    def native_only(self, path: str) -> bool:
        """A native name that is not also a diffusers name of this family."""
        return (any(n.diffusers_of(path) is not None for n in self.namings)
                and self.primary.native_of(path) is None and not _is_diffusers(self, path))

    # --- the arch Family ---------------------------------------------------------------------
    @cached_property
    def family(self) -> Family:
        def native_paths(component: str) -> set[str]:
            # sub-models have no kohya prefix of their own: their modules are the diffusion model's
            # (``lora_unet_llm_adapter_...``), restored from ``native_module_paths``
            return self.native_module_paths() if component == COMPONENT else set()

        return Family(
            name=self.name,
            kohya_prefixes={**KOHYA_PREFIXES, **self.extra_kohya_prefixes},
            native_paths=native_paths,
            to_canonical=self.to_canonical,
            from_canonical=self.from_canonical,
            kohya_from_canonical=self.kohya_from_canonical if self.diffusers_named is not None else None,
            detect=self.detect,
            evidence=self.evidence,
            variant=self.evidence_variant if self.variant is not None else None,
            merges_into=self.merges_into,
            mismatches=self.mismatches,
            shapes_fit=self.shapes_fit,
        )

    def evidence_variant(self, ev) -> str | None:
        """:attr:`variant` of an adapter's evidence (:class:`loratool.arch.evidence.Evidence`): the shapes of
        its transformer modules and its metadata."""
        shapes = {p: s for (c, p), s in ev.modules.items() if c == COMPONENT and p and s is not None}
        return self.variant(shapes, ev.metadata)

    def evidence(self, ev) -> tuple[int, str]:
        """:meth:`detect` on the :mod:`loratool.arch.evidence` scale, from canonical names and shapes (any
        layout): metadata naming this family outranks a generic declaration ("flux" in "flux.2"); modules
        only this family has outrank names Flux.1 / SD3 share with it; every module being ours counts just
        under a published width."""
        from loratool.arch.evidence import DECLARED, UNIQUE, WIDTHS

        if self.metadata_says(ev.metadata):
            return DECLARED + 5, f"{self.title} named in its metadata"
        paths = ev.paths(COMPONENT)
        subs = [(sub, p) for sub in self.submodels for p in ev.paths(sub.component)]
        if not (paths or subs) or not ev.components <= set(self.components):
            return 0, ""
        shapes = {p: s for p in paths for s in [ev.modules[(COMPONENT, p)]] if s is not None}
        keys = [f"transformer.{p}.lora_A.weight" for p in [*paths, *(sub.native(p) for sub, p in subs)]]
        score = self.detect(keys, {}, shapes)
        if score >= 95:
            return UNIQUE + 5, f"modules only {self.title} has"
        if score > 0:
            return WIDTHS - 5, f"every module is a {self.title} module"
        return 0, ""

    def to_canonical(self, modules: list[LoraModule]) -> list[LoraModule]:
        """Native paths (any spelling) -> diffusers paths, fused modules split exactly; sub-model modules
        (``llm_adapter.…``) move to their own component."""
        out: list[LoraModule] = []
        for m in modules:
            if m.component != COMPONENT:
                out.append(m)
                continue
            inner = self.inner_of(m.path)
            if inner is not None:
                out.append(replace(fused.renamed(m, inner[1]), component=inner[0].component))
                continue
            if m.path.split(".", 1)[0] in {sub.native_prefix for sub in self.submodels}:
                raise MatchError(f"{COMPONENT}:{m.path}: not a module of {self.title}'s "
                                 f"{self.inner_component(m.path)}")
            naming = next((n for n in self.namings if n.diffusers_of(m.path) is not None), None)
            if naming is None:
                if not _is_diffusers(self, m.path):
                    raise MatchError(f"{COMPONENT}:{m.path}: not a module of {self.title}")
                out.append(m)
                continue
            out.extend(fused.to_canonical([m], naming))
        return out

    def inner_component(self, native: str) -> str:
        head = native.split(".", 1)[0]
        sub = next(s for s in self.submodels if s.native_prefix == head)
        return f"{sub.diffusers_class} ({sub.native_prefix}.*)"

    def from_canonical(self, modules: list[LoraModule]) -> list[LoraModule]:
        """diffusers paths -> native paths of the primary naming; split parts fuse exactly. Sub-model modules go
        back into the diffusion model under their native prefix."""
        out: list[LoraModule] = []
        rest: list[LoraModule] = []
        for m in modules:
            sub = self.submodel(m.component)
            if sub is None:
                (out if m.component == COMPONENT and self.inner_of(m.path) is not None else rest).append(m)
                continue  # (a sub-model module already in its native place passes through)
            if not sub.knows(m.path):
                raise MatchError(f"{m.component}:{m.path}: not a module of {sub.diffusers_class}")
            out.append(replace(fused.renamed(m, sub.native(m.path)), component=COMPONENT))
        return fused.from_canonical(rest, self.primary) + out

    def kohya_from_canonical(self, modules: list[LoraModule], metadata: Mapping[str, str]) -> list[LoraModule]:
        """:meth:`from_canonical` for the kohya writer: an adapter of a variant that keeps diffusers' names
        (:attr:`diffusers_named`) stays in them (kohya heads are then the diffusers paths flattened)."""
        if self.diffusers_named is None or not self.diffusers_named(modules, metadata):
            return self.from_canonical(modules)
        for m in modules:
            if m.component != COMPONENT or not _is_diffusers(self, m.path):
                raise MatchError(f"{m.component}:{m.path}: not a module of {self.title}")
        return list(modules)

    # --- detection ---------------------------------------------------------------------------
    def metadata_says(self, metadata: Mapping[str, str]) -> bool:
        text = " ".join(metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture")).lower()
        return any(m in text for m in self.metadata) and not any(m in text for m in self.not_metadata)

    def detect(self, keys: list[str], metadata: dict[str, str], shapes: Mapping | None = None) -> int:
        """How sure we are these LoRA keys (any layout) are for this family: 120 when the metadata
        says so (above Flux.1's 100 for "flux" anywhere in it), 95 when every module is ours and a
        marker only we have is among them, 60 when every module is ours, else 0."""
        if self.metadata_says(metadata):
            return 120
        found = []
        for path, dotted in iter_lora_paths(keys, self):
            if path is None:  # one module that is not ours decides: no need to restore the others
                return 0
            found.append((path, dotted))
        if not found:
            return 0
        if self.shapes_fit is not None and shapes and not self.shapes_fit(shapes):
            return 0
        marker, dotted_only = _any_of(self.markers), _any_of(self.dotted_markers)
        if marker is not None:
            for path, dotted in found:
                if marker.search(path) and (dotted or dotted_only is None or not dotted_only.search(path)):
                    return 95
        return 0 if self.needs_marker else 60


@cache
def _any_of(patterns: tuple[str, ...]) -> re.Pattern | None:
    """One regex matching where any of ``patterns`` does (None for none): a search per path, not per marker.
    Markers are plain regexes (no backreferences, no inline flags), so joining them changes no match."""
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def _is_diffusers(spec: DitFamily, path: str) -> bool:
    """A diffusers module path of this family (block indices templated against the table)."""
    return _diffusers_templates(spec.name).get(template(path)) is not None


def diffusers_module(path: str) -> bool:
    """Whether ``path`` is a diffusers module path of any DiT family."""
    t = template(path)
    return any(t in _diffusers_templates(name) for name in specs())


@cache
def _diffusers_templates(name: str) -> dict[str, bool]:
    return {template(p): True for p in get(name).data["diffusers_modules"]}


def scale_params(what: str, blocks: tuple[tuple[str, str, dict[str, str]], ...],
                 top: dict[str, str] | None = None) -> fused.FusedNaming:
    """Parameters of RMSNorms stored as ``<norm>.scale`` (BFL / Krea code) where diffusers has ``<norm>.weight``:
    ``blocks`` = (native block, diffusers block, {native norm: diffusers norm}), ``top`` likewise outside blocks."""

    def params(table: dict[str, str]) -> dict[str, tuple[str]]:
        return {fused.join(k, "scale"): (fused.join(v, "weight"),) for k, v in table.items()}

    return fused.FusedNaming(
        what=what,
        blocks=tuple(fused.Block(n, d, params(t)) for n, d, t in blocks),
        top=params(top or {}),
        swapped=lambda native, module: False,
    )


def identity_naming(title: str, diffusers_modules: Iterable[str], block_lists: tuple[str, ...],
                    renames: tuple[tuple[str, str], ...] = ()) -> fused.FusedNaming:
    """A naming whose native names are the diffusers names (blocks from ``block_lists``), each rewritten by
    ``renames`` — (regex on the diffusers path, replacement), in order: LTX's ``proj_in`` is ``patchify_proj``."""
    tables: dict[str, dict[str, tuple[str, ...]]] = {b: {} for b in block_lists}
    top: dict[str, tuple[str, ...]] = {}
    for path in diffusers_modules:
        head, _, rest = path.partition(".")
        if head in tables and rest.split(".", 1)[0].isdigit():
            inner = rest.split(".", 1)[1] if "." in rest else ""
            tables[head][_renamed("." + inner, renames)[1:]] = (inner,)
        else:
            top[_renamed(path, renames)] = (path,)
    return fused.FusedNaming(
        what=f"a {title} transformer module",
        blocks=tuple(fused.Block(b, b, t) for b, t in tables.items()),
        top=top,
        swapped=lambda native, module: False,
    )


def _renamed(path: str, renames: tuple[tuple[str, str], ...]) -> str:
    for pattern, native in renames:
        path = re.sub(pattern, native, path)
    return path


# --- registry ------------------------------------------------------------------------------------

# arch modules holding one ``SPEC`` (or ``SPECS``) each; listed in arch.FAMILY_MODULES too.
SPEC_MODULES = ("wan", "hunyuan_video", "ltx", "qwen_image", "z_image", "lumina2", "hidream", "flux2", "chroma",
                "krea2", "anima", "ernie_image")


@cache
def specs() -> dict[str, DitFamily]:
    """Every DiT family by name (the ``SPEC`` / ``SPECS`` of the arch modules :func:`loratool.arch.families` loads)."""
    import sys

    from loratool import arch

    arch.families()
    out: dict[str, DitFamily] = {}
    for mod_name in SPEC_MODULES:
        mod = sys.modules.get(f"loratool.arch.{mod_name}")
        for spec in [*getattr(mod, "SPECS", ()), *([mod.SPEC] if hasattr(mod, "SPEC") else [])]:
            out[spec.name] = spec
    return out


def get(name: str) -> DitFamily:
    return specs()[name]


def find(name: str | None) -> DitFamily | None:
    return specs().get(name) if name else None


# --- LoRA keys -> module paths (detection) ---------------------------------------------------------

_LORA_SUFFIX = re.compile(
    r"\.(lora_[AB]\.weight|lora_B\.bias|lora_(down|up|mid)\.weight|alpha|diff|diff_b|dora_scale|"
    r"hada_[wt][12](_[ab])?|lokr_[wt][12](_[ab])?|lora_magnitude_vector|lora\.(down|up)\.weight)$")
_DOTTED_PREFIXES = ("base_model.model.", *NATIVE_PREFIXES, "transformer.")


def lora_paths(keys: Iterable[str], spec: DitFamily) -> list[tuple[str | None, bool]]:
    """(module path as this family would name it or None when not ours, whether the key was dotted) for every
    LoRA module in ``keys``.

    Dotted keys (native ``diffusion_model.``, diffusers ``transformer.``) give their path; kohya heads
    (``lora_unet_...``, ``lycoris_...``) are restored through this family's table."""
    return list(iter_lora_paths(keys, spec))


def iter_lora_paths(keys: Iterable[str], spec: DitFamily) -> Iterator[tuple[str | None, bool]]:
    """:func:`lora_paths` one module at a time: detection stops at the first module that is not ours (every
    family is asked about every file, and most files are no DiT family's)."""
    seen: set[str] = set()
    index = None
    for key in keys:
        m = _LORA_SUFFIX.search(key)
        if m is None:
            continue
        head = key[: m.start()]
        if head in seen:
            continue
        seen.add(head)
        dotted = next((head[len(p):] for p in _DOTTED_PREFIXES if head.startswith(p)), None)
        if dotted is not None:
            yield (dotted if spec.knows(dotted) else None, True)
            continue
        body = next((head[len(p) + 1:] for p in ("lora_unet_", "lora_unet", "lycoris") if head.startswith(p + "_")),
                    None)
        if body is None:
            yield (None, False)
            continue
        if index is None:
            index = _kohya_index(spec.name)
        try:
            path = index.restore(body)
        except Exception:  # an ambiguous body is not evidence either way
            path = None
        yield (path if path is not None and spec.knows(path) else None, False)


@cache
def _kohya_index(name: str):
    from loratool.formats.kohya_names import PathIndex

    return PathIndex.from_paths(get(name).native_module_paths(), templated=True)


def detect_native(paths: list[str], metadata: Mapping[str, str],
                  shapes: Mapping[str, tuple[int, ...]]) -> DitFamily | None:
    """The family of a native-layout LoRA from its dotted module paths (prefix removed), metadata
    and the adapted weights' shapes (by path); None when no family knows every path."""
    keys = [f"diffusion_model.{p}.lora_A.weight" for p in paths]
    best, best_score = None, 0
    for spec in specs().values():
        score = spec.detect(keys, dict(metadata), shapes)
        if score > best_score:
            best, best_score = spec, score
    return best


# --- variants --------------------------------------------------------------------------------------

def rows_fit(shapes: Mapping[str, tuple[int, ...]], rules: Mapping[tuple[str, ...], int]) -> bool:
    """Whether every adapted weight whose path ends with one of a rule's suffixes has ``ratio × in-features``
    rows (``rules``: suffixes -> ratio): tells apart families that share names but not widths."""
    for path, shape in shapes.items():
        for suffixes, ratio in rules.items():
            if len(shape) >= 2 and path.endswith(suffixes) and shape[0] != ratio * shape[1]:
                return False
    return True


def canonical_shapes(modules: Iterable[LoraModule]) -> dict[str, tuple[int, ...]]:
    """{canonical path: adapted weight shape} of the transformer modules (what :attr:`DitFamily.variant` takes)."""
    out = {}
    for m in modules:
        if m.component != COMPONENT:
            continue
        try:
            out[m.path] = tuple(m.weight_shape)
        except (RuntimeError, ValueError, KeyError, IndexError):
            continue
    return out


def timestep_expert(metadata: Mapping[str, str]) -> str | None:
    """Wan 2.2 A14B expert from musubi-tuner's ``modelspec.timestep_range`` ("min,max" of 0..1000) or the
    base model file name (``ss_sd_model_name``: ``..._high_noise_...``): "high-noise" / "low-noise"."""
    name = metadata.get("ss_sd_model_name", "").lower()
    for word in ("high_noise", "low_noise"):
        if word in name:
            return word.replace("_", "-")
    rng = metadata.get("modelspec.timestep_range", "")
    try:
        lo, hi = (float(x) for x in rng.split(","))
    except ValueError:
        return None
    if lo > 0 and hi >= 1000:
        return "high-noise"
    if lo <= 0 and hi < 1000:
        return "low-noise"
    return None
