"""Extract a LoRA from a fine-tuned model minus its base (``loratool extract``).

For every weight both checkpoints hold, ΔW = W_ft − W_base (in the compute dtype, on the device)
and its best rank-k approximation by the truncated SVD ΔW ≈ U_k Σ_k V_kᵀ (Eckart–Young)
becomes one LoRA module with alpha = k (scale 1) and the singular values split evenly::

    up = U_k · Σ_k^½      down = Σ_k^½ · V_kᵀ       ΔW_k = up @ down

Either side may be quantized (fp8, scaled fp8, bitsandbytes, GGUF): each weight is first decoded
to float32 by its codec (:mod:`loratool.io.codecs`), so ΔW is the difference of what the two models
compute with; scales, block maxima and markers are no weights and are not compared.

* Linear [out, in]: the matrix is ΔW itself. GPT-2 ``Conv1D`` stores [in, out]
  (``fan_in_fan_out``): the matrix is ΔWᵀ.
* Conv [out, in, kh, kw] (1×1 or k×k): the matrix is ΔW.reshape(out, in·kh·kw); down is reshaped
  to [k, in, kh, kw] and up to [out, k, 1, 1] (kohya / PEFT conv LoRA).
* Embedding [num, dim] (only with ``embeddings=True``): ΔW = (up @ down)ᵀ, so the matrix is ΔWᵀ,
  up [dim, k], down [k, num] (PEFT ``lora_embedding_B`` / ``_A``).

The captured share of a module is ‖ΔW_k‖_F / ‖ΔW‖_F = √(Σ_{i≤k} σᵢ² / ‖ΔW‖²_F) and its relative
error ‖ΔW − up @ down‖_F / ‖ΔW‖_F is measured on the factors as written (after clamping and the
cast to the output dtype). Tensors whose max |ΔW| ≤ ``min_diff`` are skipped and counted;
changed tensors a LoRA cannot hold (norms, biases, scalars, embeddings without ``embeddings``,
integer buffers, mismatched shapes) are listed in the result, never dropped silently.

``clamp_quantile`` Q (off by default; it breaks exactness): like kohya's
``extract_lora_from_models.py``, every entry of up and down is clamped to ±h with h the
Q-quantile of the absolute values of both factors together (kohya takes the quantile of the
signed values; the absolute value makes the clamp symmetric whatever the sign balance).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.arch.clip import canonical_clip_path
from loratool.errors import MatchError, UsageError
from loratool.io.codecs import layout_of
from loratool.ops import Progress
from loratool.ops.argument_order import check_extract_order
from loratool.ops.device import pick_device
from loratool.ops.extract_defaults import DEFAULT_RANK
from loratool.ops.randomized_svd import TruncatedSVD, exact_svd, frobenius_sq, truncated_svd

DYNAMIC_RULES = ("sv_ratio", "sv_fro", "sv_cumulative")

# Last module-path segments of embedding tables (2-D weights that are looked up, not multiplied).
_EMBEDDING_NAME = re.compile(
    r"(^|\.)(embed_tokens|embed_positions|wte|wpe|shared|word_embeddings|position_embeddings|"
    r"token_type_embeddings|token_embedding|position_embedding)$"
)
# GPT-2 family Conv1D modules: the weight is stored [in, out].
_CONV1D_NAME = re.compile(r"(^|\.)(attn|crossattention|mlp)\.(c_attn|c_proj|c_fc|q_attn)$")


# ------------------------------------------------------------------------------- results
@dataclass
class ModuleReport:
    component: str
    path: str
    layer: str  # linear | conv | embedding
    shape: tuple[int, ...]
    rank: int
    solver: str  # randomized | exact
    power_iters: int
    delta_norm: float  # ‖ΔW‖_F
    captured: float  # ‖ΔW_k‖_F / ‖ΔW‖_F from the singular values
    rel_error: float  # ‖ΔW − up @ down‖_F / ‖ΔW‖_F of the factors as written

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component, "path": self.path, "layer": self.layer, "shape": list(self.shape),
            "rank": self.rank, "solver": self.solver, "power_iters": self.power_iters,
            "delta_norm": self.delta_norm, "captured": self.captured, "rel_error": self.rel_error,
        }


@dataclass
class Skipped:
    """A changed (or unpaired) tensor that did not become a module, and why."""

    component: str
    name: str
    reason: str
    shape: tuple[int, ...] = ()
    max_abs_diff: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "name": self.name, "reason": self.reason,
                "shape": list(self.shape), "max_abs_diff": self.max_abs_diff}


@dataclass
class ExtractResult:
    adapter: Adapter
    modules: list[ModuleReport] = field(default_factory=list)
    not_extracted: list[Skipped] = field(default_factory=list)
    unchanged: int = 0
    filtered: int = 0  # left out by include / exclude
    compared: int = 0
    device: str = "cpu"
    solver: str = "randomized"
    output: Path | None = None  # what was asked for (a file, or a PEFT folder)
    files: list[Path] = field(default_factory=list)  # what was written
    format: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def worst_captured(self) -> float | None:
        return min((m.captured for m in self.modules), default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output is not None else None,
            "files": [str(p) for p in self.files],
            "format": self.format,
            "device": self.device,
            "solver": self.solver,
            "compared": self.compared,
            "extracted": len(self.modules),
            "unchanged": self.unchanged,
            "filtered": self.filtered,
            "not_extracted": [s.to_json() for s in self.not_extracted],
            "worst_captured": self.worst_captured,
            "modules": [m.to_json() for m in self.modules],
            "warnings": list(self.warnings),
        }


# ------------------------------------------------------------------------------- reading pairs
class _Weights:
    """A checkpoint as {(component, canonical parameter): where it is stored}, read one tensor at a time."""

    def __init__(self, ref: str | os.PathLike):
        from loratool.io.checkpoint import open_checkpoint

        self.ref = ref
        self.ckpt = open_checkpoint(ref)
        # (component, param) -> (file, stored key, row slice, arch Target when stored transposed /
        # with swapped halves, else None)
        self.params: dict[tuple[str, str], tuple[Any, str, tuple[int, int] | None, Any]] = {}
        self.unmapped: list[str] = []  # stored keys no canonical parameter reads
        for group in self.ckpt.groups:
            used: set[str] = set()
            for comp, names in group.params().items():
                for name in names:
                    hit = group.lookup(comp, name) if group.targets is not None else None
                    if group.targets is None:
                        part = group.key_to_part[name]
                        self.params[(comp, name)] = (part.file, name, None, None)
                    elif hit is not None:
                        part, key, rows = hit
                        transformed = getattr(hit, "transform", None) is not None
                        self.params[(comp, name)] = (part.file, key, rows, hit.target if transformed else None)
                        used.add(key)
            if group.targets is not None:
                self.unmapped += [k for k, part in group.key_to_part.items()
                                  if k not in used and not layout_of(part.file).hidden(k)]

    def shape_dtype(self, key: tuple[str, str]) -> tuple[tuple[int, ...], torch.dtype]:
        file, stored, rows, target = self.params[key]
        entry = layout_of(file).entries.get(stored)
        if entry is not None and entry.shape is None:
            raise UsageError(f"{file.path}: {stored} is stored as {entry.label}, which loratool cannot read")
        shape = tuple(entry.shape) if entry is not None else tuple(file.info(stored).shape)
        dtype = torch.float32 if entry is not None else file.info(stored).dtype
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        if target is not None and target.transform == "transpose":
            shape = shape[::-1]
        return shape, dtype

    def read(self, key: tuple[str, str]) -> torch.Tensor:
        from loratool.io.checkpoint import Checkpoint

        file, stored, rows, target = self.params[key]
        tensor = Checkpoint.read_weight(file, stored)  # quantized kinds decoded to float32
        if rows is not None:
            tensor = tensor[rows[0]:rows[1]]
        if target is not None:
            from loratool.arch.checkpoints import to_stored

            # the canonical orientation (to_stored is its own inverse); a copy, so ΔW may be formed in place
            tensor = to_stored(tensor, target).contiguous()
        return tensor


# ------------------------------------------------------------------------------- maths per module
def _classify(param: str, ndim: int, embeddings: bool) -> tuple[str | None, str]:
    """(layer, why-not): the LoRA layer kind this weight becomes, or None and the reason."""
    if not param.endswith(".weight"):
        return None, "not a layer weight (parameter without .weight)"
    path = param[: -len(".weight")]
    if ndim <= 1:
        return None, "1-D tensor (norm scale or bias): a LoRA cannot express it"
    if ndim == 2:
        if _EMBEDDING_NAME.search(path):
            return ("embedding", "") if embeddings else (None, "embedding table (pass --embeddings to extract it)")
        return "linear", ""
    return "conv", ""


def _clamp(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors to ±(Q-quantile of |entries of up and down|)."""
    values = torch.cat([up.flatten(), down.flatten()]).abs().float().cpu()
    k = min(values.numel(), max(1, math.ceil(quantile * values.numel())))
    hi = float(torch.kthvalue(values, k).values)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _spectrum_for_rule(svd: TruncatedSVD, method: str) -> torch.Tensor:
    """Singular values to hand a rank rule. sv_fro only needs Σσ² = ‖ΔW‖²_F, so the unseen tail
    is folded into one trailing value (it sits past the rank cap and only fills the denominator)."""
    s = svd.S.detach().double().cpu()
    if method == "sv_fro" and svd.solver == "randomized":
        tail = max(svd.total_energy - float(s.square().sum()), 0.0)
        s = torch.cat([s, torch.tensor([math.sqrt(tail)], dtype=torch.float64)])
    return s


@dataclass
class _Settings:
    rank: int
    conv_rank: int
    rule: Any  # rank_rules.RankRule | None
    exact: bool
    clamp_quantile: float | None
    embeddings: bool
    device: torch.device
    dtype: torch.dtype
    out_dtype: torch.dtype
    generator: torch.Generator


def _factor(delta: torch.Tensor, layer: str, fan_in_fan_out: bool, s: _Settings):
    """(up, down, TruncatedSVD, k, matrix) for one ΔW; see the module docstring for shapes."""
    if layer == "conv":
        matrix = delta.reshape(delta.shape[0], -1)
    elif layer == "embedding" or fan_in_fan_out:
        matrix = delta.T
    else:
        matrix = delta
    max_rank = max(1, min(s.conv_rank if layer == "conv" else s.rank, *matrix.shape))
    method = getattr(s.rule, "method", None)
    total = frobenius_sq(matrix)
    if method == "sv_cumulative":  # needs Σσ over the whole spectrum: only a full SVD has it
        svd = exact_svd(matrix, min(matrix.shape), total)
    else:
        svd = truncated_svd(matrix, max_rank, exact=s.exact, generator=s.generator, total_energy=total)
    k = max_rank
    if method is not None:
        from loratool.ops.rank_rules import select_rank

        k = select_rank(_spectrum_for_rule(svd, method), max_rank, s.rule)
    k = min(k, svd.S.numel())
    root = svd.S[:k].clamp(min=0).sqrt()
    up = svd.U[:, :k] * root
    down = root[:, None] * svd.Vh[:k]
    if s.clamp_quantile is not None:
        up, down = _clamp(up, down, s.clamp_quantile)
    return up, down, svd, k, matrix


def _make_module(component: str, path: str, layer: str, fan_in_fan_out: bool, shape, up, down, k) -> LoraModule:
    if layer == "conv":
        down = down.reshape(k, *shape[1:])
        up = up.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    module = LoraModule(
        component=component, path=canonical_clip_path(component, path), kind="lora", layer=layer,
        tensors={"down": down.contiguous(), "up": up.contiguous()},
        alpha=float(k), fan_in_fan_out=fan_in_fan_out,
    )
    if module.path != path:
        # A flattened CLIP (transformers 5) base: canonical names keep text_model., PEFT output keeps the base's.
        module.hints["file_path"] = path
    return module


# ------------------------------------------------------------------------------- the op
def _compile(patterns: str | list[str] | None, flag: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    out = []
    for p in [patterns] if isinstance(patterns, str) else patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise UsageError(f"{flag} {p!r}: not a valid regular expression ({exc})") from None
    return out


def _rule(dynamic: str | None, param: float | None):
    if dynamic is None and param is None:
        return None
    from loratool.ops.rank_rules import RankRule

    return RankRule(dynamic, param)


def extract(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    *,
    rank: int = DEFAULT_RANK,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    exact: bool = False,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    min_diff: float = 0.0,
    clamp_quantile: float | None = None,
    embeddings: bool = False,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    progress: Progress | None = None,
) -> ExtractResult:
    """Build the LoRA adapter that best approximates ``finetuned − base`` at ``rank``.

    ``include`` / ``exclude`` are regular expressions searched in ``component.parameter``
    (e.g. ``unet.down_blocks.0.attentions.0.proj_in.weight``); a tensor is kept when it matches
    some include (or none is given) and no exclude. ``dtype`` is the compute dtype (float32 on
    devices; tests use float64), ``out_dtype`` the dtype of the written factors.
    """
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UsageError(f"--rank {rank} / --conv-rank {conv_rank}: ranks must be at least 1")
    if min_diff < 0:
        raise UsageError(f"--min-diff {min_diff}: must be ≥ 0")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise UsageError(f"--clamp-quantile {clamp_quantile}: must be in (0, 1]")
    rule = _rule(dynamic, param)
    order_warnings = check_extract_order(finetuned, base)
    includes, excludes = _compile(include, "--include"), _compile(exclude, "--exclude")
    dev = pick_device(device)
    if dev.type == "mps" and dtype == torch.float64:
        raise UsageError("float64 is not available on MPS")
    settings = _Settings(
        rank=rank, conv_rank=conv_rank or rank, rule=rule, exact=exact, clamp_quantile=clamp_quantile,
        embeddings=embeddings, device=dev, dtype=dtype, out_dtype=out_dtype,
        generator=torch.Generator().manual_seed(seed),
    )

    ft, bs = _Weights(finetuned), _Weights(base)
    common = [key for key in ft.params if key in bs.params]
    if not common:
        raise MatchError(
            f"{finetuned} and {base} share no weights (fine-tune components "
            f"{sorted({c for c, _ in ft.params})}, base components {sorted({c for c, _ in bs.params})}); "
            f"are they the same architecture?"
        )
    adapter = Adapter(source_format=None, family=_base_family(bs))
    result = ExtractResult(adapter=adapter, device=str(dev), solver="exact" if exact else "randomized",
                           warnings=order_warnings)
    for comp, name in ft.params:
        if (comp, name) not in bs.params:
            result.not_extracted.append(Skipped(comp, name, "only in the fine-tune", ft.shape_dtype((comp, name))[0]))
    for comp, name in bs.params:
        if (comp, name) not in ft.params:
            result.not_extracted.append(Skipped(comp, name, "only in the base", bs.shape_dtype((comp, name))[0]))
    for label, w in (("fine-tune", ft), ("base", bs)):
        for key in w.unmapped:
            result.not_extracted.append(Skipped("?", key, f"stored key of the {label} with no canonical name"))

    total = len(common)
    for i, (comp, name) in enumerate(common):
        if progress:
            progress("extract", i, total)
        target = f"{comp}.{name}"
        if (includes and not any(p.search(target) for p in includes)) or any(p.search(target) for p in excludes):
            result.filtered += 1
            continue
        result.compared += 1
        shape_f, shape_b = ft.shape_dtype((comp, name))[0], bs.shape_dtype((comp, name))[0]
        if shape_f != shape_b:
            result.not_extracted.append(
                Skipped(comp, name, f"shape differs (fine-tune {list(shape_f)}, base {list(shape_b)})", shape_f))
            continue
        a, b = ft.read((comp, name)), bs.read((comp, name))
        if not (a.is_floating_point() and b.is_floating_point()):
            if not torch.equal(a, b):
                result.not_extracted.append(Skipped(comp, name, "non-float tensor differs", shape_f))
            else:
                result.unchanged += 1
            continue
        # In place: `a` is a buffer of our own (Checkpoint.read_weight), never the file's memory.
        delta = a.to(device=dev, dtype=dtype).sub_(b.to(device=dev, dtype=dtype))
        del a, b
        max_abs = float(torch.linalg.vector_norm(delta, float("inf"))) if delta.numel() else 0.0
        if not math.isfinite(max_abs):
            from loratool.errors import NonFiniteError

            raise NonFiniteError(f"{finetuned} / {base}: {comp}:{name} differs by NaN or Inf")
        if max_abs <= min_diff:
            result.unchanged += 1
            continue
        layer, why = _classify(name, delta.dim(), embeddings)
        if layer is None:
            result.not_extracted.append(Skipped(comp, name, why, shape_f, max_abs))
            continue
        path = name[: -len(".weight")]
        fan_in_fan_out = layer == "linear" and comp == "model" and bool(_CONV1D_NAME.search(path))
        up, down, svd, k, matrix = _factor(delta, layer, fan_in_fan_out, settings)
        up, down = up.to(out_dtype), down.to(out_dtype)
        norm = math.sqrt(svd.total_energy)
        # ‖ΔW − up·down‖ of the factors as written; the residual overwrites the product (one buffer).
        residual = (up.to(dtype) @ down.to(dtype)).sub_(matrix)
        err = math.sqrt(frobenius_sq(residual))
        captured = math.sqrt(min(1.0, float(svd.S[:k].double().square().sum()) / svd.total_energy)) \
            if svd.total_energy > 0 else 1.0
        del delta, matrix, residual
        adapter.add(_make_module(comp, path, layer, fan_in_fan_out, shape_f, up.cpu(), down.cpu(), k))
        result.modules.append(ModuleReport(
            comp, path, layer, shape_f, k, svd.solver, svd.power_iters, norm, captured,
            err / norm if norm > 0 else 0.0,
        ))
    if progress:
        progress("extract", total, total)
    adapter.metadata.update(_metadata(finetuned, base, settings, dynamic, param))
    return result


def model_name(ref: str | os.PathLike) -> str:
    """How an output's metadata names an input: a hub reference as given, a local path by its last
    part only (a full path would carry the user's folders into a shared file)."""
    text = str(ref)
    return text if text.startswith("hf://") else Path(text.rstrip("/\\")).name or text
def _base_family(w: _Weights) -> str | None:
    """The arch family of the base (so writers name the modules natively)."""
    from loratool import arch
    from loratool.ops.family_check import base_family_of

    family, _ = base_family_of(w.ckpt)
    return family if family in arch.families() else None


def _metadata(finetuned, base, s: _Settings, dynamic, param) -> dict[str, str]:
    finetuned, base = model_name(finetuned), model_name(base)
    return {
        "loratool.extract.finetuned": finetuned,
        "loratool.extract.base": base,
        "loratool.extract.rank": str(s.rank),
        "loratool.extract.conv_rank": str(s.conv_rank),
        "loratool.extract.solver": "exact" if s.exact else "randomized",
        "loratool.extract.dynamic": f"{dynamic}={param}" if dynamic else "none",
        "loratool.extract.clamp_quantile": "none" if s.clamp_quantile is None else str(s.clamp_quantile),
        "ss_training_comment": f"extracted by loratool: {finetuned} minus {base}",
    }


def default_format(adapter: Adapter) -> str:
    """PEFT for a plain transformers model (component ``model``), kohya for SD / Flux parts."""
    comps = set(adapter.components)
    return "peft" if comps <= {"model"} else "kohya"


def extract_to_file(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str | None = None,
    force: bool = False,
    **kwargs: Any,
) -> ExtractResult:
    """:func:`extract`, then write the adapter to ``out`` in layout ``to`` (default: what fits the base)."""
    from loratool.api import save
    from loratool.io.atomic import check_output

    check_output(out, (finetuned, base), force)  # fail before the long work, not after
    result = extract(finetuned, base, **kwargs)
    if not len(result.adapter):
        raise MatchError(
            f"{finetuned} minus {base}: no weight changed by more than --min-diff that a LoRA can express; "
            f"nothing to write ({result.unchanged} unchanged, {len(result.not_extracted)} not extractable)"
        )
    fmt = to or default_format(result.adapter)
    result.format = fmt
    result.files = save(result.adapter, out, fmt, force=force, inputs=(finetuned, base))
    result.output = Path(out)
    return result
