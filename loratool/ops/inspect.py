"""What ``loratool info`` reports about an adapter: a dataclass, never printed here.

Without ``stats`` no tensor data is read and torch is not imported: the layout's own ``read``
runs on a header-only :class:`~loratool.formats.source.Source` whose tensors are shape-only
stand-ins (:mod:`loratool.header_only`; zip-format pickles described from their pickle index,
:mod:`loratool.io.pickle_header`). Only tensors with at most one element (kohya ``.alpha``
scalars) are read for real, since alpha values are data. A reader that needs tensor values runs
again on the real tensors (``header_only`` false).

With ``stats`` every module's ΔW is described by its singular values σ₁ ≥ σ₂ ≥ … computed from
its exact factor form (:func:`loratool.ops.factor_form.singular_values`: QR / Gram of up and downᵀ
and an SVD of the small core; for LoKr the products σᵢ(W₁)·σⱼ(W₂) of its Kronecker factors; a
dense SVD only for modules with no smaller exact form, e.g. ``full``), in float64:

* ``norm``            ‖ΔW‖_F = √(Σ σᵢ²)
* ``effective_rank``  exp(−Σ pᵢ log pᵢ) with pᵢ = σᵢ / Σ σⱼ (Roy & Vetterli 2007; between 1
                      and the rank; 0 for ΔW = 0)
* ``numerical_rank``  #{σᵢ > σ₁ · max(m, n) · eps(float64)} (numpy's ``matrix_rank`` rule)
* ``sigma_max``       σ₁ (spectral norm)

DoRA modules are described by their ΔW; the magnitude re-normalisation is not in these numbers.

A base model (a single-file SD / SDXL / Flux / SD3 checkpoint, a diffusers component file or
folder, a diffusers pipeline folder, an HF transformers model, sharded or not) is not an
adapter: :func:`inspect` recognises it when no LoRA layout claims the file and its keys carry
no LoRA markers, and returns a :class:`CheckpointReport` (family, tensor count, dtype mix,
parameter count, size) read from the safetensors headers alone.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool import arch, formats
from loratool.adapter import Adapter, LoraModule
from loratool.api import base_vocabulary, read_source
from loratool.delta_rank import delta_rank
from loratool.errors import FormatError
from loratool.formats.source import Source, header_view, open_source
from loratool.header_only import dtype_name, read_header_only, torch
from loratool.io import hub
from loratool.ops import Progress
from loratool.ops.argument_order import looks_like_base
from loratool.ops.training_metadata import top_tags, trigger_phrases
from loratool.validate import nonfinite_modules

if TYPE_CHECKING:
    from loratool.ops.scan import ScanReport

# Metadata keys holding bulky JSON: kept in ``metadata``, left out of the training table.
BULKY_KEYS = frozenset({
    "ss_tag_frequency", "ss_dataset_dirs", "ss_datasets", "ss_reg_dataset_dirs", "ss_bucket_info",
    "lora_adapter_metadata", "modelspec.thumbnail",
})

# ss_base_model_version / modelspec.architecture prefixes -> family name (longest match first).
_FAMILY_HINTS = (
    ("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"),
    ("sd_v2", "sd2"), ("stable-diffusion-v2", "sd2"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
)


@dataclass
class ModuleStats:
    norm: float
    effective_rank: float
    numerical_rank: int
    sigma_max: float


@dataclass
class ModuleInfo:
    path: str  # dotted module path inside the component (canonical naming)
    component: str
    kind: str
    layer: str
    rank: int  # the rank ΔW can have (LoKr: rank(w1)·rank(w2) of ΔW = w1 ⊗ w2)
    factor_rank: int  # the rank the layout stores and alpha divides (LoKr lora_dim; 0 for whole factors)
    alpha: float | None  # as stored; alpha = rank when the layout stores none
    scale: float
    shape: list[int]  # the adapted base weight's shape
    dtype: str
    dora: bool = False
    rslora: bool = False
    fan_in_fan_out: bool = False
    alpha_assumed: bool = False
    stats: ModuleStats | None = None


@dataclass
class InfoReport:
    path: str
    format: str
    size_bytes: int
    files: list[str]
    family: str | None
    base_model: dict[str, str]
    components: list[str]
    modules: list[ModuleInfo]
    extras: list[dict[str, Any]]
    metadata: dict[str, str]
    training: dict[str, str]
    modelspec: dict[str, str]
    tags: list[tuple[str, int]]
    trigger_phrases: list[str] = field(default_factory=list)
    dialect: str | None = None
    warnings: list[str] = field(default_factory=list)
    header_only: bool = True
    stats: bool = False
    # the base it needs, from names, shapes and metadata (loratool.arch.evidence.identify): the family's
    # variant, the widths its weights fix ({name: values}) and what told the family
    variant: str | None = None
    widths: dict[str, list[int]] = field(default_factory=dict)
    family_evidence: str | None = None
    # with stats: ΔW per block ([{block, component, module_count, norm, effective_rank}]): loratool.ops.blocks
    block_stats: list[dict[str, Any]] | None = None

    @property
    def ranks(self) -> dict[int, int]:
        return dict(sorted(Counter(m.rank for m in self.modules).items()))

    @property
    def component_modules(self) -> dict[str, int]:
        return {c: sum(1 for m in self.modules if m.component == c) for c in self.components}

    def counts(self, attr: str) -> dict[str, int]:
        return dict(Counter(str(getattr(m, attr)) for m in self.modules).most_common())

    def to_json(self) -> dict[str, Any]:
        """The stable ``--json`` contract."""
        ranks = [m.rank for m in self.modules]
        return {
            "path": self.path,
            "format": self.format,
            "dialect": self.dialect,
            "size_bytes": self.size_bytes,
            "files": self.files,
            "family": self.family,
            "variant": self.variant,
            "widths": self.widths,
            "family_evidence": self.family_evidence,
            "trigger_phrases": self.trigger_phrases,
            "base_model": self.base_model,
            "components": self.components,
            "component_modules": self.component_modules,
            "module_count": len(self.modules),
            "kinds": self.counts("kind"),
            "layers": self.counts("layer"),
            "ranks": {
                "min": min(ranks) if ranks else None,
                "max": max(ranks) if ranks else None,
                "histogram": {str(k): v for k, v in self.ranks.items()},
            },
            "alphas": self.counts("alpha"),
            "scales": self.counts("scale"),
            "dtypes": self.counts("dtype"),
            "dora_modules": sum(m.dora for m in self.modules),
            "extras": self.extras,
            "metadata": self.metadata,
            "training": self.training,
            "modelspec": self.modelspec,
            "tags": [{"tag": t, "count": c} for t, c in self.tags],
            "warnings": self.warnings,
            "header_only": self.header_only,
            "with_stats": self.stats,
            "block_stats": self.block_stats,
            "modules": [_module_json(m) for m in self.modules],
        }


def _module_json(m: ModuleInfo) -> dict[str, Any]:
    # asdict's deep copy walks every value of every module (a third of `info --json` on a large LoRA); the
    # fields are scalars but ``shape`` (copied) and ``stats`` (a dataclass of scalars)
    out = {name: getattr(m, name) for name in _MODULE_FIELDS}
    out["shape"] = list(m.shape)
    if m.stats is None:
        out.pop("stats")
    else:
        out["stats"] = asdict(m.stats)
    return out


_MODULE_FIELDS = tuple(f.name for f in fields(ModuleInfo))


# ---------------------------------------------------------------- base checkpoints

@dataclass
class CheckpointReport:
    """What ``info`` says about a base model (not an adapter)."""

    path: str
    kind: str  # file | sharded | component | pipeline
    family: str | None
    architecture: str | None
    size_bytes: int
    files: list[str]
    components: dict[str, int]  # component -> tensors (canonical components for single files)
    tensor_count: int
    parameter_count: int
    dtypes: dict[str, int]  # dtype -> tensors
    metadata: dict[str, str]
    mapped: int | None = None  # single files: canonical parameters the family's key map finds
    unmapped: list[str] = field(default_factory=list)  # single files: stored keys with no canonical name
    warnings: list[str] = field(default_factory=list)
    header_only: bool = True
    format: str = "checkpoint"
    # quantized / low-precision weights: "<who writes it>: <kind>" -> number of weights (io.codecs)
    quantization: dict[str, int] = field(default_factory=dict)
    container: str = "safetensors"  # or "gguf"
    variant: str | None = None  # DiT families: the variant the shapes tell (Wan "I2V 14B"...)

    def to_json(self) -> dict[str, Any]:
        """The stable ``--json`` contract for base checkpoints (``format: "checkpoint"``)."""
        return {
            "path": self.path,
            "format": self.format,
            "kind": self.kind,
            "family": self.family,
            "variant": self.variant,
            "architecture": self.architecture,
            "size_bytes": self.size_bytes,
            "files": self.files,
            "components": list(self.components),
            "component_tensors": self.components,
            "tensor_count": self.tensor_count,
            "parameter_count": self.parameter_count,
            "dtypes": self.dtypes,
            "mapped": self.mapped,
            "unmapped_count": len(self.unmapped),
            "unmapped": self.unmapped[:20],
            "metadata": self.metadata,
            "warnings": self.warnings,
            "header_only": self.header_only,
            "container": self.container,
            "quantization": self.quantization,
        }


def _is_gguf_base(path: Path) -> bool:
    """A GGUF model file; llama.cpp LoRA adapters (``general.type = "adapter"``) are adapters."""
    from loratool.io.gguf_file import is_gguf, read_gguf_header

    if not (path.is_file() and is_gguf(path)):
        return False
    return read_gguf_header(path).fields.get("general.type") != "adapter"


def is_base_folder(folder: Path) -> bool:
    """A diffusers pipeline folder or a sharded model folder (no adapter files in it)."""
    if not folder.is_dir() or any((folder / n).is_file() for n in ("adapter_config.json", "adapter_model.safetensors",
                                                                    "adapter_model.bin")):
        return False
    from loratool.io.checkpoint import pipeline_index

    return pipeline_index(folder) is not None or any(folder.glob("*.safetensors.index.json"))


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointReport:
    """Describe a base model from its safetensors / GGUF headers (tensor data is read only for the
    small JSON markers of quantized layouts: bitsandbytes quant states, ComfyUI ``comfy_quant``)."""
    from loratool.io.checkpoint import guess_component, open_checkpoint
    from loratool.io.codecs import layout_of
    from loratool.io.gguf_file import GGUFFile
    from loratool.ops.family_check import base_family_of

    ckpt = open_checkpoint(path)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: Counter[str] = Counter()
    components: Counter[str] = Counter()
    metadata: dict[str, str] = {}
    parameters = 0
    mapped: int | None = None
    unmapped: list[str] = []
    quantization: dict[str, int] = {}
    container = "safetensors"
    for group in ckpt.groups:
        used: set[str] = set()
        if group.targets is not None:
            mapped = (mapped or 0) + len(group.targets)
            for (comp, _), target in group.targets.items():
                components[comp] += 1
                used.add(target[0])
        for part in group.parts:
            metadata.update(part.file.metadata)
            layout = layout_of(part.file)
            for label, n in layout.groups().items():
                quantization[label] = quantization.get(label, 0) + n
            if isinstance(part.file, GGUFFile):
                container = "gguf"
                metadata.update({k: str(v) for k, v in part.file.fields.items() if isinstance(v, (str, int, float))})
            for key in part.file.keys():
                info = part.file.info(key)
                dtypes[dtype_label(info.dtype_name)] += 1
                if layout.hidden(key):
                    continue  # scales, block maxima, markers: stored beside a weight, not parameters
                entry = layout.entries.get(key)
                shape = tuple(info.shape) if entry is None or entry.shape is None else tuple(entry.shape)
                shapes[key] = shape
                parameters += math.prod(shape)
        if group.targets is not None:
            unmapped += sorted(k for k, part in group.key_to_part.items()
                               if k not in used and not layout_of(part.file).hidden(k))
        else:
            components[group.component or guess_component(group.key_to_part)] += sum(
                not layout_of(part.file).hidden(k) for k, part in group.key_to_part.items())
    family, architecture = base_family_of(ckpt, shapes)
    files = sorted(str(f) for f in ckpt.weight_files())
    variant = _base_variant(family, ckpt, shapes)
    warnings = []
    if unmapped:
        warnings.append(f"{len(unmapped)} stored tensor(s) have no {family} key map entry (VAE, buffers, ...): "
                        "merge and extract leave them as they are")
    return CheckpointReport(
        path=str(path), kind=ckpt.kind, family=family, architecture=architecture,
        size_bytes=sum(Path(f).stat().st_size for f in files), files=files,
        components=dict(sorted(components.items())), tensor_count=sum(dtypes.values()), parameter_count=parameters,
        dtypes=dict(dtypes.most_common()), metadata=metadata, mapped=mapped, unmapped=unmapped, warnings=warnings,
        quantization=quantization, container=container, variant=variant,
    )


def dtype_label(code: str) -> str:
    """A stored dtype by its torch name (``float16``), or its ggml type name (``Q4_K``) for GGUF blocks."""
    from loratool.io.safetensors_file import _TORCH_NAMES

    return _TORCH_NAMES.get(code, code)


def _base_variant(family: str | None, ckpt, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """A DiT family's variant from the canonical parameter shapes (single files: through the key map)."""
    from loratool.arch import dit_checkpoints

    canonical: dict[str, tuple[int, ...]] = {}
    for group in ckpt.groups:
        if group.targets is not None:
            for (_, param), target in group.targets.items():
                shape = shapes.get(target[0])
                rows = target[1]
                if shape is not None:
                    canonical[param] = (rows[1] - rows[0], *shape[1:]) if rows else shape
        else:
            canonical.update({k: shapes[k] for k in group.key_to_part if k in shapes})
    return dit_checkpoints.base_variant(family, canonical) if family else None


# ---------------------------------------------------------------- header-only reading


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------- stats


def singular_values(module: LoraModule) -> tuple[torch.Tensor, tuple[int, int]]:
    """(σ₁ ≥ σ₂ ≥ … of ΔW in float64, from the factors, and ΔW's matrix shape [out, in·k·k])."""
    from loratool.ops.factor_form import singular_values as form_singular_values
    from loratool.ops.factor_form import to_factor_form

    form = to_factor_form(module, dtype=torch.float64)
    return form_singular_values(form, dtype=torch.float64).clamp(min=0), form.shape


def module_stats(module: LoraModule) -> ModuleStats:
    """σ-based description of ΔW from the factors (see the module docstring for definitions)."""
    s, shape = singular_values(module)
    total = float(s.sum())
    smax = float(s[0]) if s.numel() else 0.0
    if total == 0.0:
        return ModuleStats(norm=0.0, effective_rank=0.0, numerical_rank=0, sigma_max=0.0)
    p = s[s > 0] / total
    erank = math.exp(float(-(p * p.log()).sum()))
    tol = smax * max(shape) * torch.finfo(torch.float64).eps
    return ModuleStats(
        norm=float(s.pow(2).sum().sqrt()),
        effective_rank=erank,
        numerical_rank=int((s > tol).sum()),
        sigma_max=smax,
    )


# ---------------------------------------------------------------- metadata


def adapter_family(src: Source, adapter: Adapter | None, metadata: dict[str, str], given: str | None) -> str | None:
    if given or (adapter is not None and adapter.family):  # read_source set it from names, shapes and metadata
        return given or adapter.family
    try:
        from loratool import arch
        from loratool.shapes import module_shapes

        fam = arch.detect(src.keys, metadata, module_shapes(src.shapes()))
        if fam is not None:
            return fam.name
    except ImportError:  # naming tables not installed: metadata alone decides
        pass
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(key, "").lower()
        for prefix, name in _FAMILY_HINTS:
            if value.startswith(prefix):
                return name
    return None


def base_model_hints(src: Source, adapter: Adapter | None, metadata: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in ("ss_base_model_version", "ss_sd_model_name", "modelspec.architecture", "modelspec.title"):
        if metadata.get(key):
            out[key] = metadata[key]
    configs = [src.config or {}, *(adapter.config.values() if adapter is not None else ())]
    for cfg in configs:
        name = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
        if isinstance(name, str) and name:
            out.setdefault("base_model_name_or_path", name)
    return out


# ---------------------------------------------------------------- the report


def module_info(m: LoraModule) -> ModuleInfo:
    rank = m.rank
    alpha = m.alpha if m.alpha not in (None, 0) else (float(rank) if rank else None)
    return ModuleInfo(
        path=m.path,
        component=m.component,
        kind=m.kind,
        layer=m.layer,
        rank=delta_rank(m),
        factor_rank=rank,
        alpha=None if alpha is None else _num(alpha),
        scale=_num(m.scale),
        shape=[int(x) for x in m.weight_shape],
        dtype=dtype_name(m.dtype),
        dora=m.magnitude is not None,
        rslora=m.rslora,
        fan_in_fan_out=m.fan_in_fan_out,
        alpha_assumed=bool(m.hints.get("alpha_assumed")),
    )


def _files(src: Source) -> list[str]:
    return [str(f) for f in src.files]


def inspect(
    path: str | os.PathLike,
    format: str | None = None,
    *,
    base: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    family: str | None = None,
    stats: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
) -> InfoReport | CheckpointReport | ScanReport:
    """Describe an adapter; reads tensor data only for ``stats``.

    A base model instead of an adapter gives a :class:`CheckpointReport` (see the module docstring);
    a folder of adapters a :class:`~loratool.ops.scan.ScanReport` (one header-only summary per file).
    """
    if format is None and not hub.is_hub_ref(path):
        p = Path(path)
        if is_base_folder(p) or p.name.endswith(".safetensors.index.json") or _is_gguf_base(p):
            return inspect_checkpoint(path)
        from loratool.ops.scan import is_library_folder, scan

        if not stats and is_library_folder(p):
            return scan(p, family=family, progress=progress)
    src = open_source(path, config=config)
    view = None if stats else header_view(src)  # names and shapes without torch or tensor data
    name = format
    if name is None:
        try:
            name = formats.detect(view or src)
        except FormatError:
            if src._safetensors is not None and looks_like_base(src.keys):
                return inspect_checkpoint(path)
            raise
    opts = formats.ReadOptions(vocabulary=base_vocabulary(base) if base is not None else None, family=family)
    if stats:
        from loratool.ops.device import single_threaded

        with single_threaded():  # a reader's splits and casts: no thread team for those
            adapter, header_only = read_source(src, name, opts, path), False
    else:
        adapter, header_only = read_header_only(src, name, opts, path, view=view)
    metadata = dict(adapter.metadata or src.metadata)
    warnings: list[str] = []
    modules = [module_info(m) for m in adapter]
    if stats:
        # NaN/Inf factors have no SVD: name those modules instead of computing stats for them.
        broken = set(nonfinite_modules(adapter))
        if broken:
            warnings.append(f"{len(broken)} module(s) hold NaN or Inf, no stats for them: {', '.join(sorted(broken))}")
        from loratool.delta import BASE_DEPENDENT
        from loratool.ops.device import ThreadPolicy
        from loratool.ops.factor_form import svd_flops

        dependent = {f"{m.component}:{m.path}" for m in adapter if m.kind in BASE_DEPENDENT}
        if dependent:
            warnings.append(f"{len(dependent)} OFT / GLoRA / set module(s) change W by a function of W: no ΔW "
                            f"without the base, no stats for them")
        broken |= dependent
        todo = [(info, m) for info, m in zip(modules, adapter) if f"{m.component}:{m.path}" not in broken]
        if progress:
            progress("stats", 0, len(todo))
        policy = ThreadPolicy(threads, "cpu")
        for i, stat in enumerate(policy.map(module_stats, [m for _, m in todo], cost=svd_flops), start=1):
            todo[i - 1][0].stats = stat
            if progress:
                progress("stats", i, len(todo))
    assumed = sum(m.alpha_assumed for m in modules)
    if name == "loralib" and src.config is None:
        warnings.append(
            "no loralib sidecar JSON (<file>.json or --config): assumed alpha = r (scale 1), no fan_in_fan_out, "
            "embeddings recognised by name"
        )
    elif assumed:
        warnings.append(f"{assumed} module(s) store no alpha: assumed alpha = r (scale 1)")
    if stats and any(m.dora for m in modules):
        warnings.append("stats describe ΔW of DoRA modules without the magnitude re-normalisation")
    extras = [
        {"component": c, "name": n, "shape": [int(x) for x in t.shape], "dtype": dtype_name(t.dtype)}
        for (c, n), t in adapter.extras.items()
    ]
    family_name = adapter_family(view or src, adapter, metadata, family)
    identity = arch.identity_of(adapter)
    block_stats = None
    if stats:
        from loratool.ops.blocks import block_summary

        block_stats = block_summary(modules)
    return InfoReport(
        variant=identity.variant,
        widths=identity.widths,
        family_evidence=identity.why or None,
        block_stats=block_stats,
        path=str(path),
        format=adapter.source_format or name,
        size_bytes=sum(Path(f).stat().st_size for f in _files(src)),
        files=_files(src),
        family=family_name,
        base_model=base_model_hints(src, adapter, metadata),
        components=adapter.components,
        modules=modules,
        extras=extras,
        metadata=metadata,
        training={k: v for k, v in metadata.items() if k.startswith("ss_") and k not in BULKY_KEYS},
        modelspec={k: v for k, v in metadata.items() if k.startswith("modelspec.") and k not in BULKY_KEYS},
        tags=top_tags(metadata, warnings),
        trigger_phrases=trigger_phrases(metadata),
        dialect=adapter.dialect,
        warnings=warnings,
        header_only=header_only,
        stats=stats,
    )
