"""Reading any trainer dialect (:mod:`loratool.formats.dialects`) into canonical modules.

Per key: the dialect's scope (longest matching prefix) gives the component; the suffix (longest
known spelling: kohya, LyCORIS, PEFT, or the dialect's extras) gives the tensor's slot; the rest is
the module path — dotted, or kohya-flattened and restored from the family's name tables
(:class:`loratool.formats.kohya_names.PathIndex`, native or diffusers names). Keys are grouped per
module and built by the kohya / LyCORIS module builder (:func:`loratool.formats.kohya.build_module`),
so every dialect gets the same kinds, alpha and DoRA handling; then the family's own
``to_canonical`` renames native paths (SGM → diffusers, BFL / MMDiT fused q/k/v split exactly).

Special slots: PEFT ``lora_B.bias`` becomes the module's ``bias`` (Δb = scale · bias, as PEFT merges
it); a ComfyUI ``diff_b`` beside LoRA factors likewise (bias = diff_b / scale); BFL ``*_norm.scale``
keys become ``set`` modules on the matching diffusers norm weight; XLabs' single-block
``qkv_lora`` (linear1's q, k, v rows only) splits into to_q / to_k / to_v with the down shared.

Every key is placed or the read fails naming it: nothing is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays unimported for header-only info
    import torch

from loratool import arch
from loratool.adapter import Adapter, LoraModule
from loratool.arch.clip import CLIP_COMPONENTS, TEXT_MODEL, canonical_clip_path
from loratool.errors import FormatError
from loratool.formats import kohya
from loratool.formats.dialects import BIAS, SET, Dialect, Scope
from loratool.formats.kohya_names import PathIndex, _family_index, template

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
# XLabs' single-block q/k/v LoRA: linear1's first three row blocks (see dialects.XLABS_REWRITES).
PARTIAL_FUSED = {
    "flux": (re.compile(r"^single_blocks\.(\d+)\.linear1_qkv$"),
             ("single_transformer_blocks.{0}.attn.to_q", "single_transformer_blocks.{0}.attn.to_k",
              "single_transformer_blocks.{0}.attn.to_v")),
}
# Module paths (underscored or dotted) that only one family has.
FAMILY_EVIDENCE: tuple[tuple[str, re.Pattern], ...] = tuple((f, re.compile(r)) for f, r in (
    ("flux", r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d+[._]"),
    ("flux", r"^lora_te2_encoder_block_"),  # T5 under lora_te2: Flux (OneTrainer)
    ("sd3", r"(^|[._])joint_blocks[._]\d+[._]"),
    ("sd3", r"^lora_te3_"),  # a third text encoder (T5) under kohya-style names
    ("unet", r"(^|[._])(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)[._]\d"),
))
# Families tried in this order when names and header leave several (the more common first; SD 1.x before
# SDXL, whose U-Net names it shares).
TIE_ORDER = ("flux", "sd3", "sd1", "sd2", "sdxl")
# SD U-Nets tell their family by cross-attention width (attn2.to_k input features).
CROSS_ATTENTION = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


# ---------------------------------------------------------------------------------------- naming


def canonical_paths(family: str, component: str) -> set[str]:
    """Diffusers / HF module paths of a family's component (what non-native dialects write)."""
    if component == "transformer" and family in ("flux", "sd3"):
        if family == "flux":
            from loratool.arch import flux

            table = flux.module_table(flux.load_table("flux_modules")["num_layers"],
                                      flux.load_table("flux_modules")["num_single_layers"])
        else:
            from loratool.arch import sd3

            table = {k: v for k, v in sd3.module_table(64, range(64), pre_only_last=False).items()}
        return {t for targets in table.values() for t in targets}
    if component == "unet" and family == "sdxl":
        from loratool.arch import sdxl

        return set(sdxl.unet_map().values())
    return set(arch.get(family).native_paths(component))


def ldm_paths(family: str) -> set[str]:
    """LDM U-Net module paths of SD 1.x / 2.x (ComfyUI's native names for them)."""
    from loratool.arch import sdxl

    out = set()
    for p in arch.get(family).native_paths("unet"):
        ldm = sdxl.diffusers_to_sgm(p, 2, {1, 2, 3})
        if ldm is not None:
            out.add(ldm)
    return out


@cache
def _index(family: str, component: str, naming: str) -> PathIndex:
    if naming == "native" and family in ("sd1", "sd2") and component == "unet":
        return PathIndex.from_paths(ldm_paths(family), templated=True)
    if naming == "native":
        return _family_index(family, component)
    paths = canonical_paths(family, component)
    if component in CLIP_COMPONENTS:  # transformers >= 5 CLIP names lack text_model. (arch.clip)
        paths |= {p[len(TEXT_MODEL):] for p in paths if p.startswith(TEXT_MODEL)}
    return PathIndex.from_paths(paths, templated=True)


def _known(index: PathIndex, path: str) -> bool:
    under = path.replace(".", "_")
    if path in index.exact.get(under, ()):
        return True
    t = template(path)
    return t in index.templates.get(t.replace(".", "_"), ())


def _namings(scope: Scope) -> tuple[str, ...]:
    return ("native", "canonical") if scope.naming == "auto" else (scope.naming,)


def resolve_path(scope: Scope, body: str, family: str, component: str) -> tuple[str, str] | None:
    """(dotted path, naming) of a key body under ``scope``, or None when the family has no such module."""
    for naming in _namings(scope):
        index = _index(family, component, naming)
        if scope.joiner == "_":
            try:
                path = index.restore(body[:-1] if body.endswith("_") else body)
            except FormatError as exc:
                raise FormatError(f"module path is ambiguous: {exc}") from None
            if path is not None:
                return path, naming
        elif _known(index, body):
            return body, naming
    return None


# ---------------------------------------------------------------------------------------- keys


@cache
def _suffixes(aliases_key: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """(spelling, normalised suffix), longest spelling first."""
    table = {s: s for s in (*kohya.SUFFIXES, *kohya.SHARED)}
    table.update(dict(aliases_key))
    return tuple(sorted(table.items(), key=lambda kv: -len(kv[0])))


def split_key(key: str, dialect: Dialect) -> tuple[Scope, str, str, str] | None:
    """(scope, body, stored suffix, normalised suffix) of a key, or None when the dialect cannot place it."""
    scopes = sorted(dialect.scopes, key=lambda s: -len(s.prefix))
    suffixes = _suffixes(tuple(sorted(dialect.aliases.items())))
    for scope in scopes:
        if not key.startswith(scope.prefix):
            continue
        rest = key[len(scope.prefix):]
        if scope.joiner == "_":
            head, dot, suffix = rest.partition(".")
            norm = dict(suffixes).get(suffix) if dot else None
            if norm is not None and re.fullmatch(r"[A-Za-z0-9_]+", head):
                return scope, head, suffix, norm
            continue
        for spelling, norm in suffixes:
            if rest.endswith("." + spelling) and len(rest) > len(spelling) + 1:
                body = rest[: -len(spelling) - 1]
                for pattern, repl in dialect.rewrites:
                    body = re.sub(pattern, repl, body)
                return scope, body, spelling, norm
    return None


# ---------------------------------------------------------------------------------------- family


def _shape_family(src, keys: Iterable[str]) -> str | None:
    infos = src.tensor_infos()
    for key in keys:
        low = key.lower()
        if "attn2" in low and ("to_k" in low) and ("down" in low or "lora_a" in low):
            shape = infos[key][0]
            if len(shape) == 2:
                return CROSS_ATTENTION.get(int(shape[1]))
    return None


def candidate_families(dialect: Dialect, src, given: str | None) -> list[arch.Family]:
    """The families a dialect file may be for, most likely first: --family, the dialect's only family,
    metadata, names only one family has, cross-attention width; else every family of the dialect."""
    if given:
        return [arch.get(given)]
    if len(dialect.families) == 1:
        return [arch.get(dialect.families[0])]
    fam = arch.detect([], src.metadata)
    if fam is not None and fam.name in dialect.families:
        return [fam]
    keys = src.keys
    found = {f for f, rx in FAMILY_EVIDENCE if any(rx.search(k) for k in keys)}
    if "unet" in found:
        found.discard("unet")
        sdxl = any(re.search(r"(^lora_te2_text_model|^text_encoders\.clip_g\.|label_emb|add_embedding|"
                             r"attentions[._]\d+[._]transformer_blocks[._][1-9])", k) for k in keys)
        shaped = "sdxl" if sdxl else _shape_family(src, keys)
        found |= {shaped} if shaped else {"sd1", "sd2", "sdxl"}
    found = found & set(dialect.families) or set(dialect.families)
    return [arch.get(f) for f in TIE_ORDER if f in found]


# ---------------------------------------------------------------------------------------- modules


def _set_module(family: str, component: str, body: str, tensor: torch.Tensor, where: str) -> LoraModule:
    """A BFL ``<norm>.scale`` key -> a ``set`` module on the diffusers norm weight it replaces."""
    table = _norm_params(family)
    param = table.get(f"{body}.scale") or table.get(f"{body}.weight")
    if param is None:
        raise FormatError(f"{where}: {body} is no normalisation weight of {family} (a set key must name one)")
    return LoraModule(component=component, path=param[: -len(".weight")], kind="set", layer="norm",
                      tensors={"value": tensor})


@cache
def _norm_params(family: str) -> dict[str, str]:
    if family == "flux":
        from loratool.arch import flux

        return flux.norm_table(64, 128)
    if family == "sd3":
        from loratool.arch import sd3

        return sd3.norm_table(64, range(64))
    return {}


def _build(where: str, component: str, path: str, parts: dict[str, torch.Tensor]) -> LoraModule:
    parts = dict(parts)
    bias = parts.pop(BIAS, None)
    diff_b = parts.pop("diff_b", None) if any(s in parts for s in LORA_SUFFIXES) else None
    module = kohya.build_module(where, component, path, parts)
    if bias is not None or diff_b is not None:
        if module.kind != "lora":
            raise FormatError(f"{where}: a bias delta beside a {module.kind} module")
        if bias is not None and diff_b is not None:
            raise FormatError(f"{where}: both lora_B.bias and diff_b")
        # canonical lora bias is scaled like the factors (PEFT); ComfyUI's diff_b is the bare Δb
        module.tensors["bias"] = bias if bias is not None else diff_b / module.scale
    return module


def _partial_fused(family: str, modules: list[LoraModule]) -> list[LoraModule]:
    rule = PARTIAL_FUSED.get(family)
    if rule is None:
        return modules
    from loratool.arch import fused

    pattern, targets = rule
    out = []
    for m in modules:
        hit = pattern.match(m.path)
        if hit is None:
            out.append(m)
            continue
        paths = tuple(t.format(hit.group(1)) for t in targets)
        out.extend(fused.split(m, paths, lambda rows, inp: fused.qkv_rows(".qkv", rows, inp), False))
    return out


def _canonical(family: arch.Family, modules: list[LoraModule], ldm: set[int]) -> list[LoraModule]:
    from loratool.arch import fused, sdxl

    out = []
    for i, m in enumerate(modules):
        if i in ldm:  # SD 1.x / 2.x LDM U-Net names (ComfyUI) -> diffusers
            new = sdxl.sgm_to_diffusers(m.path, 2)
            if new is None:
                raise FormatError(f"unet:{m.path}: no diffusers counterpart of this LDM U-Net module")
            m = fused.renamed(m, new)
        out.append(m)
    out = _partial_fused(family.name, out)
    sets = [m for m in out if m.kind == "set"]
    out = family.to_canonical([m for m in out if m.kind != "set"])
    return [fused.renamed(m, canonical_clip_path(m.component, m.path)) for m in out + sets]


def read(src, opts, dialect: Dialect) -> Adapter:
    """Read ``src`` (written in ``dialect``) into an :class:`Adapter`; ``opts.family`` overrides detection.

    When neither the header nor names only one family has tell the family, the first candidate whose
    module names hold every key is taken (SD 1.x before SDXL: their diffusers and LDM / SGM U-Net names
    coincide, so the modules read are the same)."""
    given = getattr(opts, "family", None)
    candidates = candidate_families(dialect, src, given)
    first_error: FormatError | None = None
    for family in candidates:
        try:
            adapter = _read(src, dialect, family)
        except FormatError as exc:
            first_error = first_error or exc
            continue
        if given:
            arch.check_family(given, adapter)  # --family against what the names and widths say
        return adapter
    if len(candidates) > 1:
        raise FormatError(f"{first_error} (tried {', '.join(f.name for f in candidates)}; pass --family)") from None
    raise first_error


def _read(src, dialect: Dialect, family: arch.Family) -> Adapter:
    where = str(src.path)
    tensors = src.tensors
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    heads: dict[tuple[str, str], str] = {}
    namings: dict[tuple[str, str], str] = {}
    sets: list[LoraModule] = []
    for key in src.keys:
        parsed = split_key(key, dialect)
        if parsed is None:
            raise FormatError(f"{where}: key {key!r} is not a {dialect.name} LoRA key this reader knows")
        scope, body, _, suffix = parsed
        component = scope.component_for(family.name)
        if component is None:
            raise FormatError(f"{where}: key {key!r}: {family.name} has no component under {scope.prefix!r}")
        if suffix == SET:
            sets.append(_set_module(family.name, component, body, tensors[key], f"{where}: {key}"))
            continue
        partial = PARTIAL_FUSED.get(family.name)
        if partial is not None and partial[0].match(body):
            hit = (body, "native")
        else:
            hit = resolve_path(scope, body, family.name, component)
        if hit is None:
            raise FormatError(f"{where}: key {key!r}: {body!r} is not a {component} module of {family.name} "
                              f"(pass --family if the family is wrong)")
        path, naming = hit
        g = groups.setdefault((component, path), {})
        if suffix in g:
            raise FormatError(f"{where}: module {component}:{path} has its {suffix} tensor twice")
        g[suffix] = tensors[key]
        heads.setdefault((component, path), key.rsplit(".", 1)[0] if scope.joiner == "." else key.split(".")[0])
        namings[(component, path)] = naming
    modules: list[LoraModule] = []
    ldm: set[int] = set()
    for (component, path), parts in groups.items():
        module = _build(f"{where}: {heads[(component, path)]}", component, path, parts)
        if dialect.widen:
            module.hints["widen"] = True
        if module.kind == "lora" and module.alpha is None:
            module.hints["alpha_assumed"] = True
        if namings[(component, path)] == "native" and family.name in ("sd1", "sd2") and component == "unet":
            ldm.add(len(modules))
        modules.append(module)
    try:
        modules = _canonical(family, modules, ldm) + sets
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    _apply_header_config(src, modules, where)
    lycoris = any(m.kind not in ("lora", "set") or "mid" in m.tensors for m in modules)
    # LyCORIS kinds under kohya-style or diffusers-named keys are what the lycoris layout names
    layout = "lycoris" if lycoris and dialect.layout in ("kohya", "diffusers") else dialect.layout
    adapter = Adapter(metadata=dict(src.metadata), source_format=layout, family=family.name,
                      dialect=dialect.name)
    for m in modules:
        adapter.add(m)
    return adapter


def _apply_header_config(src, modules: list[LoraModule], where: str) -> None:
    """A diffusers ``lora_adapter_metadata`` header (SimpleTuner PEFT saves) gives the modules' alphas."""
    from loratool.formats import diffusers, peft

    components = list(dict.fromkeys(m.component for m in modules))
    configs = diffusers.parse_metadata(src.metadata, components, where)
    for m in modules:
        if m.component in configs and m.kind == "lora" and m.hints.get("alpha_assumed"):
            peft.apply_config(m, configs[m.component], m.path, f"{where} [{m.component}]")
            m.hints.pop("alpha_assumed")
