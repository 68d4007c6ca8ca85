"""Single-file checkpoints of the DiT families (:mod:`loratool.arch.dit`): which family a file is,
and where each canonical (diffusers) parameter is stored in it.

Files hold the native parameter names, bare or behind ``model.diffusion_model.`` (ComfyUI's
repackaged files, the original releases). A stored ``<native module>.weight`` / ``.bias`` holds
what the family's naming maps the module to: one diffusers module, or several stacked by rows
(fused q/k/v, HunyuanVideo's ``linear1``, Lumina 2's GQA ``qkv``), or one with its row halves
swapped (``final_layer.adaLN_modulation.1``: [shift; scale] against diffusers' [scale; shift]).
Row ranges follow the stored shapes through the naming's ``split_rows``. Other parameters
(RMSNorm ``scale``, ``modulation`` tables) come from the family's ``params`` naming.
"""

from __future__ import annotations

from collections.abc import Mapping

from loratool.arch import dit
from loratool.arch.checkpoints import Target

UNET_PREFIX = "model.diffusion_model."


def _prefix(keys) -> str:
    return UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in keys) else ""


def _inner(keys) -> dict[str, str]:
    prefix = _prefix(keys)
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def single_file_family(keys) -> str | None:
    """The DiT family whose single-file marks these stored keys carry; None otherwise."""
    inner = set(_inner(keys))
    for spec in dit.specs().values():
        marks = spec.single_file_marks
        if marks and all(m in inner for m in marks) and not any(n in inner for n in spec.single_file_not):
            return spec.name
    return None


def targets(family: str, keys, shapes: Mapping[str, tuple[int, ...]], transforms: bool) -> dict:
    """{(``transformer``, diffusers parameter): Target} of a single file of ``family``."""
    spec = dit.get(family)
    param_namings = [n for n in (spec.param_naming, spec.spelling_params) if n is not None]
    out: dict = {}
    for name, key in _inner(keys).items():
        module, _, suffix = name.rpartition(".")
        parts = naming = None
        if suffix in ("weight", "bias"):
            naming = next((n for n in spec.namings if n.diffusers_of(module) is not None), None)
            parts = naming.diffusers_of(module) if naming is not None else None
        if parts is not None:
            if len(parts) == 1:
                if naming.swapped(module, None):
                    if transforms:
                        out[(dit.COMPONENT, f"{parts[0]}.{suffix}")] = Target(key, None, "swap_halves")
                else:
                    out[(dit.COMPONENT, f"{parts[0]}.{suffix}")] = Target(key)
                continue
            weight = shapes.get(key[: -len(suffix)] + "weight") or shapes.get(key)
            if weight is None:
                continue  # no shape, no rows: the key stays unmapped (reported by info / extract)
            in_features = weight[1] if len(weight) > 1 else weight[0]
            for path, rows in zip(parts, naming.split_rows(module, weight[0], in_features)):
                out[(dit.COMPONENT, f"{path}.{suffix}")] = Target(key, rows)
            continue
        param = next((n.diffusers_of(name) for n in param_namings if n.diffusers_of(name) is not None), None)
        if param is not None:
            out[(dit.COMPONENT, param[0])] = Target(key)
    return out


def diffusers_family(config: Mapping | None, pipeline: Mapping | None, keys) -> tuple[str, str] | None:
    """(family, class) of a diffusers transformer (its ``config.json``) or pipeline folder
    (``model_index.json``), or of a bare diffusers-named transformer file by its keys."""
    if pipeline:
        cls = str(pipeline.get("_class_name", ""))
        for spec in dit.specs().values():
            if any(cls.startswith(p) for p in spec.pipelines):
                return spec.name, cls
        return None
    cls = (config or {}).get("_class_name")
    if cls:
        for spec in dit.specs().values():
            if cls == spec.diffusers_class or cls in spec.other_classes:
                return spec.name, cls
        return None
    paths = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight")}
    if not paths:
        return None
    best = None
    for spec in dit.specs().values():
        templates = dit._diffusers_templates(spec.name)
        hits = sum(dit.template(p) in templates for p in paths)
        if hits == len(paths) and (best is None or len(templates) < best[1]):
            best = (spec, len(templates))  # the smallest vocabulary that holds every path is the most specific
    return (best[0].name, best[0].diffusers_class) if best else None


def base_variant(family: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    spec = dit.find(family)
    if spec is None or spec.base_variant is None:
        return None
    return spec.base_variant(shapes)


def checkpoint_family(ckpt) -> str | None:
    """The DiT family of an opened base checkpoint (single file, ``transformer/`` folder, pipeline)."""
    import json

    from loratool.arch import checkpoints

    for group in ckpt.groups:
        if group.targets is not None:
            fam = checkpoints.checkpoint_family(group.key_to_part)
            if dit.find(fam) is not None:
                return fam
            continue
        if group.component not in (None, dit.COMPONENT, "transformer_2"):
            continue
        folder = group.parts[0].path.parent
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            config = None
        hit = diffusers_family(config if isinstance(config, dict) else None, None, group.key_to_part)
        if hit is not None:
            return hit[0]
    return None


def route_expert(ckpt, adapter):
    """A Wan 2.2 A14B pipeline folder holds two experts: ``transformer/`` (high noise, early steps) and
    ``transformer_2/`` (low noise). A LoRA whose metadata names the low-noise expert (musubi-tuner's
    ``modelspec.timestep_range``, ``ss_sd_model_name``) is merged into ``transformer_2``; any other goes to
    ``transformer`` as diffusers' loader does. Returns ``adapter`` or a renamed copy."""
    comps = {g.component for g in ckpt.groups}
    if not {dit.COMPONENT, "transformer_2"} <= comps or dit.timestep_expert(adapter.metadata) != "low-noise":
        return adapter
    from dataclasses import replace

    from loratool.adapter import Adapter

    out = Adapter(metadata=dict(adapter.metadata), source_format=adapter.source_format, family=adapter.family,
                  dialect=adapter.dialect, config=dict(adapter.config), extras=dict(adapter.extras))
    for m in adapter:
        out.add(replace(m, component="transformer_2") if m.component == dit.COMPONENT else m)
    return out
