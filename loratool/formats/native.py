"""Native (ComfyUI-format) LoRA files: the model's own module names, dotted, behind
``diffusion_model.`` (ComfyUI, diffusion-pipe, lightx2v, ai-toolkit for some families),
``model.diffusion_model.``, or ``transformer.`` with original names (diffusion-pipe's HunyuanVideo).

Key = prefix + native module path + suffix. Suffixes and the canonical tensor each holds:

==============================================  ==============================================
``lora_A.weight`` / ``lora_down.weight``        ``down`` [r, in(, k…)]
``lora_B.weight`` / ``lora_up.weight``          ``up`` [out, r(, 1…)]
``alpha``                                       alpha (missing: alpha = r, scale 1, unless an
                                                ``adapter_config.json`` beside the file gives it)
``lora_B.bias``                                 ``bias``: Δb = scale · bias (PEFT ``lora_bias``)
``diff_b`` beside LoRA factors                  Δb = diff_b, unscaled (ComfyUI adds it to the bias;
                                                diffusers loads it as ``lora_B.bias`` with the
                                                alpha folded into A and B): stored as
                                                ``bias = diff_b / scale``
``diff`` / ``diff_b`` alone                     a ``full`` module (lightx2v / CausVid, norm layers too)
``hada_*`` / ``lokr_*`` / ``lora_mid.weight``   LyCORIS kinds, as in kohya files
``dora_scale``                                  DoRA magnitude, as in kohya files
==============================================  ==============================================

The family (and so the map to canonical diffusers names) comes from ``--family`` or from the module
paths, shapes and metadata (:func:`loratool.arch.dit.detect_native`; Flux.1 / SD3 BFL / MMDiT names are
recognised by their vocabulary). Modules of a family's sub-model (Anima's ``llm_adapter.*``) are read into its own
component (``text_conditioner``) and written back under the prefix. Writing uses ``diffusion_model.`` + the
family's native names +
``lora_A`` / ``lora_B`` + ``alpha`` (what ComfyUI loads); ``bias`` is written as ``diff_b = scale · bias``.
"""

from __future__ import annotations

from pathlib import Path

from loratool import arch
from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError, UsageError
from loratool.formats import kohya
from loratool.formats import peft as peft_layout
from loratool.header_only import torch
from loratool.io.atomic import atomic_path, check_output

NAME = "native"
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
WRITE_PREFIX = "diffusion_model."
COMPONENT = "transformer"
# native suffix -> kohya suffix (then read by kohya.build_module)
RENAMED = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_SUFFIXES = sorted([*RENAMED, *kohya.SUFFIXES, *kohya.SHARED, "lora_B.bias"], key=len, reverse=True)


def split_key(key: str) -> tuple[str, str, str] | None:
    """(prefix, module path, suffix) of a native key; None when it is not one."""
    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    rest = key[len(prefix):]
    for suffix in _SUFFIXES:
        if rest.endswith("." + suffix) and len(rest) > len(suffix) + 1:
            return prefix, rest[: -len(suffix) - 1], suffix
    return None


def _parsed(keys: list[str]) -> list[tuple[str, str, str]] | None:
    out = []
    for k in keys:
        s = split_key(k)
        if s is None:
            return None
        out.append(s)
    return out


def _bfl_families() -> list:
    """The families besides the DiT ones that name a ``transformer`` natively: Flux.1 (BFL), SD3 (MMDiT)."""
    from loratool.arch import dit

    return [f for f in arch.families().values()
            if "transformer" in f.kohya_prefixes.values() and dit.find(f.name) is None]


def detect(src) -> bool:
    """Every key is prefix + path + suffix; ``diffusion_model.`` files always, ``transformer.`` ones only when
    a DiT family knows every path and some of them only as native names (else they are diffusers files)."""
    parsed = _parsed(src.keys)
    if not parsed:
        return False
    if any(p != "transformer." for p, _, _ in parsed):
        return True
    from loratool.arch import dit

    paths = {path for _, path, _ in parsed}
    return any(all(spec.knows(p) for p in paths) and any(spec.native_only(p) for p in paths)
               for spec in dit.specs().values())


def _group(src) -> dict[str, dict[str, str]]:
    parsed = _parsed(src.keys)
    if parsed is None:
        bad = next(k for k in src.keys if split_key(k) is None)
        raise FormatError(f"{src.path}: key {bad!r} is not a native LoRA key (prefix + module path + suffix)")
    groups: dict[str, dict[str, str]] = {}
    for key, (_, path, suffix) in zip(src.keys, parsed):
        g = groups.setdefault(path, {})
        suffix = RENAMED.get(suffix, suffix)
        if suffix in g:
            raise FormatError(f"{src.path}: module {path!r} has its {suffix} tensor twice (lora_A and lora_down?)")
        g[suffix] = key
    return groups


def _shapes(src, groups: dict[str, dict[str, str]]) -> dict[str, tuple[int, ...]]:
    """{native path: adapted weight shape} from lora up/down (or diff) shapes, header only."""
    infos = src.tensor_infos()
    out = {}
    for path, parts in groups.items():
        if "lora_up.weight" in parts and "lora_down.weight" in parts:
            up, down = infos[parts["lora_up.weight"]][0], infos[parts["lora_down.weight"]][0]
            if len(up) >= 2 and len(down) >= 2:
                out[path] = (up[0], *down[1:])
        elif "diff" in parts:
            out[path] = tuple(infos[parts["diff"]][0])
    return out


def _family(src, opts, groups):
    if opts.family:
        return arch.get(opts.family)
    from loratool.arch import dit

    spec = dit.detect_native(list(groups), src.metadata, _shapes(src, groups))
    if spec is not None:
        return spec.family
    # Flux.1 BFL / SD3 MMDiT names in ComfyUI format: the family whose vocabulary holds every path
    from loratool.formats.kohya_names import PathIndex

    for fam in _bfl_families():
        index = PathIndex.from_paths(fam.native_paths(COMPONENT), templated=True)
        if all(index.restore(p.replace(".", "_")) == p for p in groups):
            return fam
    sample = ", ".join(list(groups)[:3])
    raise FormatError(f"{src.path}: cannot tell which model family these native module names are for "
                      f"({sample}); pass --family ({', '.join(arch.families())})")


def _bias_from_diff_b(module: LoraModule, diff_b: torch.Tensor) -> torch.Tensor:
    """``bias`` with scale · bias = diff_b (computed in float64, stored in diff_b's dtype)."""
    return (diff_b.double() / module.scale).to(diff_b.dtype)


def read(src, opts) -> Adapter:
    from loratool.formats import dialects

    dialect = dialects.detect(src)
    if dialect is not None:  # ComfyUI files this layout does not hold (U-Nets, text encoders): formats.dialects
        from loratool.formats import dialect_read

        return dialect_read.read(src, opts, dialect)
    groups = _group(src)
    family = _family(src, opts, groups)
    tensors = src.tensors
    config = dict(src.config) if src.config and "r" in src.config else None
    modules: list[LoraModule] = []
    for path, parts in groups.items():
        where = f"{src.path}: {path}"
        values = {suffix: tensors[key] for suffix, key in parts.items()}
        factored = "lora_down.weight" in values or "lora_up.weight" in values
        diff_b = values.pop("diff_b", None) if factored else None
        lora_bias = values.pop("lora_B.bias", None)
        module = kohya.build_module(where, COMPONENT, path, values)
        if "alpha" not in values and config is not None and module.kind == "lora":
            peft_layout.apply_config(module, config, path, where)
        elif "alpha" not in values and module.kind != "full":
            module.hints["alpha_assumed"] = True
        if lora_bias is not None:
            module.tensors["bias"] = lora_bias
        if diff_b is not None:
            if module.kind != "lora" or lora_bias is not None:
                raise FormatError(f"{where}: diff_b beside {module.kind} factors (and lora_B.bias) cannot be read")
            module.tensors["bias"] = _bias_from_diff_b(module, diff_b)
        module.hints.update(native_path=path, native_family=family.name)
        modules.append(module)
    adapter = Adapter(metadata=dict(src.metadata), source_format=NAME, family=family.name)
    for m in family.to_canonical(modules):
        adapter.add(m)
    if config is not None:
        adapter.config[COMPONENT] = config
    return adapter


# ----------------------------------------------------------------------------------- writing


def _family_for_write(adapter: Adapter, opts):
    name = opts.family or adapter.family or next(
        (m.hints.get("native_family") or m.hints.get("kohya_family") for m in adapter
         if m.hints.get("native_family") or m.hints.get("kohya_family")), None)
    if name is None:
        raise UsageError("cannot tell which model family's native names to write; pass --family")
    fam = arch.get(name)
    if "transformer" not in fam.kohya_prefixes.values():
        raise UsageError(f"family {name} has no native transformer naming; the native layout holds DiT families")
    return fam


def module_tensors(m: LoraModule, where: str) -> dict[str, torch.Tensor]:
    """{native suffix: tensor} of one module."""
    bias = m.tensors.get("bias")
    plain = m if bias is None else LoraModule(
        m.component, m.path, m.kind, m.layer, {k: v for k, v in m.tensors.items() if k != "bias"}, m.alpha,
        m.rslora, m.magnitude, m.fan_in_fan_out, dict(m.hints))
    out = {{"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(s, s): t
           for s, t in kohya.module_tensors(plain, where).items()}
    if bias is not None:
        out["diff_b"] = (bias.double() * m.scale).to(bias.dtype)
    return out


def write(adapter: Adapter, out: Path, opts) -> list[Path]:
    out = check_output(out, opts.inputs, opts.force)
    if adapter.extras:
        raise FormatError(f"{out}: the native layout holds LoRA modules only; this adapter has whole tensors too")
    from loratool.arch import dit

    def refuse_others(held: set[str]) -> None:
        others = sorted({m.component for m in adapter} - held)
        if others:
            raise FormatError(f"{out}: the native layout holds the transformer only; this adapter also adapts "
                              f"{', '.join(others)} (write kohya or diffusers instead)")

    # sub-models live inside the diffusion model (Anima's text_conditioner: diffusion_model.llm_adapter.*)
    refuse_others({c for spec in dit.specs().values() for c in spec.components})
    family = _family_for_write(adapter, opts)
    spec = dit.find(family.name)
    refuse_others(set(spec.components) if spec is not None else {COMPONENT})
    widening = next((m for m in adapter if m.kind == "set" or m.hints.get("widen")), None)
    if widening is not None:
        raise FormatError(f"{out}: {widening.component}:{widening.path} sets or widens a base weight (a Flux control "
                          f"LoRA); ComfyUI reads those in their BFL form only: keep the original file")
    tensors: dict[str, torch.Tensor] = {}
    for m in family.from_canonical(list(adapter)):
        for suffix, t in module_tensors(m, f"{out}: {m.path}").items():
            tensors[f"{WRITE_PREFIX}{m.path}.{suffix}"] = t
    metadata = {k: v for k, v in adapter.metadata.items() if isinstance(v, str)}
    metadata.update(opts.extra_metadata)
    data = peft_layout.serialise(tensors, metadata)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return [out]

