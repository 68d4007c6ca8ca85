"""``convert --as-lora``: every module as a plain LoRA (down / up), exact where the rank allows.

Per module kind (ΔM the output-major ΔW of :mod:`loratool.ops.factor_form`):

* plain LoRA: unchanged (resizing is ``loratool resize``);
* LoCon Tucker (``mid``): down'[p, (i, h, w)] = Σ_q mid[p, q, h, w] · down[q, i], up unchanged, the
  scale kept: exact at rank r;
* LoHa: (A₁B₁) ⊙ (A₂B₂) = (A₁ • A₂)(B₁ ⊙ᶜ B₂), rank ≤ r₁·r₂; LoKr: kron(U₁V₁, U₂V₂) =
  kron(U₁, U₂) kron(V₁, V₂), rank ≤ rank(W₁)·rank(W₂) (the factor forms of
  :mod:`loratool.ops.factor_form`); the SVD of those factors gives the exact LoRA at the product's
  numerical rank, or the best rank-N one;
* full ``diff``: the SVD of the dense diff (numerical rank: exact; or the best rank N); ``diff_b``
  becomes the LoRA bias (PEFT ``lora_bias``);
* DoRA (any kind with a magnitude; needs the base weight W): ΔW' = m ⊙ (W + ΔW)/‖W + ΔW‖ − W (the
  merge of :func:`loratool.delta.merge_weight`), generally full rank, so it is fitted at the
  module's own rank unless ``--rank`` / ``--dynamic`` says otherwise; the magnitude is dropped.

``rank`` caps every converted module (and ``rule`` chooses below the cap, see
:mod:`loratool.ops.rank_rules`); the Frobenius error ‖ΔM − up @ down‖ of the factors as written is
reported per module (:mod:`loratool.ops.lowrank_fit`). Converted modules get scale 1 (alpha = k)
except Tucker ones, which keep their alpha.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.delta import delta_bias, merge_weight
from loratool.errors import MatchError, UsageError
from loratool.ops import Progress
from loratool.ops.device import pick_device
from loratool.ops.factor_form import to_factor_form, to_module, transposed
from loratool.ops.lowrank_fit import Fit, factored_norm, fit_dense, fit_factors
from loratool.ops.rank_rules import RankRule

# Hints a converted module keeps (how its source file spelled the name and the alpha tensor).
NAMING_HINTS = ("file_path", "alpha_dtype", "alpha_shape")


@dataclass
class ModuleConversion:
    component: str
    path: str
    kind: str  # the input kind: lora (Tucker), loha, lokr, full, dora
    rank_in: int
    rank_out: int
    norm: float  # ‖ΔW‖_F of the input module
    error: float  # ‖ΔW − ΔW_lora‖_F of the written factors
    method: str  # exact | factor | exact-svd | randomized

    @property
    def rel_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "path": self.path, "kind": self.kind, "rank_in": self.rank_in,
                "rank_out": self.rank_out, "norm": self.norm, "error": self.error, "rel_error": self.rel_error,
                "method": self.method}


@dataclass
class AsLoraResult:
    adapter: Adapter
    modules: list[ModuleConversion] = field(default_factory=list)
    unchanged: int = 0

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"modules": [m.to_json() for m in self.modules], "unchanged": self.unchanged,
                "max_rel_error": self.max_rel_error}


def needs_conversion(module: LoraModule) -> bool:
    return module.kind != "lora" or "mid" in module.tensors or module.magnitude is not None


def shapeless(module: LoraModule) -> bool:
    """A LoHa / LoKr product stored flattened, whose kernel size the file does not tell.

    LyCORIS stores a conv LoHa's ``w1b`` as [r, in·kh·kw]; only the base weight says whether it is a
    conv. Of the supported families only U-Nets hold conv layers, so only their modules ask for it.
    """
    return (module.kind in ("loha", "lokr") and module.component == "unet"
            and "weight_shape" not in module.hints and len(module.weight_shape) == 2)


def _from_base(modules: list[LoraModule], base: str | os.PathLike, read: set[tuple[str, str]],
               ) -> tuple[dict[tuple[str, str], tuple[int, ...]], dict[tuple[str, str], torch.Tensor]]:
    """(base weight shape, base weight W for the keys in ``read``) of each module, found as merge finds it."""
    from loratool.arch.fused import swap_halves
    from loratool.io.checkpoint import Checkpoint, open_checkpoint
    from loratool.ops.matching import match

    wanted = Adapter(modules={m.key: m for m in modules})
    ckpt = open_checkpoint(base)
    plan = match([wanted], [1.0], ckpt)
    files = {part.path: part.file for group in ckpt.groups for part in group.parts}
    shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    weights: dict[tuple[str, str], torch.Tensor] = {}
    for (path, key), apps in plan.applications.items():
        for app in apps:
            if app.bias:
                continue
            info = files[path].info(key)
            shape = tuple(info.shape) if app.rows is None else (app.rows[1] - app.rows[0], *info.shape[1:])
            shapes[app.module.key] = shape[::-1] if app.transform == "transpose" else shape
            if app.module.key not in read:
                continue
            w = Checkpoint.read_tensor(files[path], key)
            if app.rows is not None:
                w = w[app.rows[0]:app.rows[1]]
            if app.transform == "transpose":
                w = w.T
            elif app.transform == "swap_halves":
                w = swap_halves(w)
            weights[app.module.key] = w
    missing = [f"{c}:{p}" for (c, p) in wanted.modules if (c, p) not in shapes]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MatchError(f"{base}: no base weight for {', '.join(missing[:5])}{more}; is this the right base model?")
    return shapes, weights


def _matrix(delta: torch.Tensor, module: LoraModule) -> torch.Tensor:
    return delta.T if transposed(module) else delta.reshape(delta.shape[0], -1)


def convert_module(module: LoraModule, rank: int | None, rule: RankRule | None, device: torch.device,
                   weight: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[LoraModule, ModuleConversion]:
    """One module as a plain LoRA (see the module docstring)."""
    from loratool.ops.linalg import compute_dtype

    out_dtype = module.dtype
    wshape = tuple(int(s) for s in module.weight_shape)
    kind = "dora" if module.magnitude is not None else module.kind
    work = compute_dtype(device, 0)
    fit: Fit
    if module.magnitude is not None:
        if weight is None:
            raise UsageError(f"{module.component}:{module.path} is a DoRA module: its plain-LoRA form needs the "
                             f"base weight (pass --base MODEL)")
        w = weight.to(device=device, dtype=work)
        delta = merge_weight(w, module, 1.0, dtype=work) - w
        cap = rank if rank is not None or rule is not None else module.rank or None
        fit = fit_dense(_matrix(delta, module), cap, rule, out_dtype=out_dtype, generator=generator)
        del delta, w
    else:
        form = to_factor_form(module, dtype=work, device=device)
        exact_tucker = module.kind == "lora" and rank is None and rule is None
        if exact_tucker:  # LoCon Tucker: the factor form is the LoRA; keep its scale
            up, down = form.up.to(out_dtype), form.down.to(out_dtype)
            out = _keep_naming(to_module(module, wshape, up, down, scale=form.scale, rslora=False, dtype=out_dtype),
                               module)
            out.alpha, out.rslora = module.alpha, module.rslora
            p = torch.cat([form.up.double(), -up.double()], dim=1) * form.scale
            q = torch.cat([form.down.double(), down.double()], dim=0)
            norm = factored_norm(form.up.double() * form.scale, form.down.double())
            return out, ModuleConversion(module.component, module.path, kind, module.rank, module.rank,
                                         norm, factored_norm(p, q), "exact")
        if form.is_dense:
            fit = fit_dense(form.dense, rank, rule, out_dtype=out_dtype, generator=generator)
        else:
            fit = fit_factors(form.up, form.down, form.scale, rank, rule, out_dtype=out_dtype)
    clean = replace(module, magnitude=None)
    out = _keep_naming(to_module(clean, wshape, fit.up, fit.down, scale=1.0, rslora=False, dtype=out_dtype), module)
    bias = delta_bias(module, dtype=torch.float64)
    if bias is not None:
        out.tensors["bias"] = bias.to(out_dtype)
    method = fit.solver if not (rank is None and rule is None and module.magnitude is None) else \
        f"exact ({fit.solver})"
    return out, ModuleConversion(module.component, module.path, kind, module.rank, fit.rank, fit.norm, fit.error,
                                 method)


def _keep_naming(out: LoraModule, source: LoraModule) -> LoraModule:
    """Carry the hints writers use to spell the module's name and alpha as the source file did."""
    for key, value in source.hints.items():
        if key in NAMING_HINTS or key.startswith("kohya_"):
            out.hints.setdefault(key, value)
    return out


def as_lora(
    adapter: Adapter,
    *,
    rank: int | None = None,
    rule: RankRule | None = None,
    base: str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: Progress | None = None,
) -> AsLoraResult:
    """A copy of ``adapter`` with every non-plain module as plain LoRA (see the module docstring)."""
    if rank is not None and int(rank) < 1:
        raise UsageError(f"--rank {rank}: must be at least 1")
    dev = pick_device(device)
    todo = [m for m in adapter if needs_conversion(m)]
    from_base = [m for m in todo if m.magnitude is not None or shapeless(m)]
    shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    weights: dict[tuple[str, str], torch.Tensor] = {}
    if from_base and base is not None:
        shapes, weights = _from_base(from_base, base, {m.key for m in from_base if m.magnitude is not None})
    elif any(shapeless(m) for m in from_base):
        names = [f"{m.component}:{m.path}" for m in from_base if shapeless(m)]
        raise UsageError(f"{len(names)} LoHa / LoKr U-Net modules ({', '.join(names[:3])}…) store their factors "
                         f"flattened, so whether they adapt a conv (and its kernel) is only in the base model: pass "
                         f"--base MODEL (only its tensor shapes are read)")
    out = Adapter(metadata=dict(adapter.metadata), source_format=adapter.source_format, family=adapter.family,
                  dialect=adapter.dialect, config={k: dict(v) for k, v in adapter.config.items()},
                  extras=dict(adapter.extras))
    result = AsLoraResult(out)
    generator = torch.Generator().manual_seed(int(seed))
    from loratool.ops.merge_tensors import compute_threads  # the one CPU thread policy (small per-module maths)

    with compute_threads(dev):
        for done, module in enumerate(adapter, start=1):
            if not needs_conversion(module):
                out.add(module)
                result.unchanged += 1
                continue
            if module.key in shapes and len(shapes[module.key]) != len(module.weight_shape):
                module = replace(module, layer="conv", hints={**module.hints, "weight_shape": shapes[module.key]})
            new, report = convert_module(module, rank, rule, dev, weights.get(module.key), generator)
            out.add(new)
            result.modules.append(report)
            if progress is not None:
                progress("to plain LoRA", done, len(adapter))
    _metadata(out, result)
    return result


def _metadata(out: Adapter, result: AsLoraResult) -> None:
    from loratool.ops.resize import STALE_KEYS, network_metadata

    for key in STALE_KEYS:
        out.metadata.pop(key, None)
    network_metadata(out)
    if result.modules:
        kinds = sorted({m.kind for m in result.modules})
        out.metadata["loratool_as_lora"] = (
            f"{len(result.modules)} modules ({', '.join(kinds)}) converted to plain LoRA; "
            f"max relative error {result.max_rel_error:.3g}")


def as_lora_file(
    path: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    rule: RankRule | None = None,
    from_format: str | None = None,
    base: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    family: str | None = None,
    force: bool = False,
    device: str = "auto",
    progress: Progress | None = None,
) -> tuple[AsLoraResult, list[Path]]:
    """load → :func:`as_lora` → save as ``to``."""
    from loratool import api
    from loratool.io.atomic import check_output

    check_output(out, inputs=(path,), force=force)
    adapter = api.load(path, from_format, base=base, config=config, family=family)
    result = as_lora(adapter, rank=rank, rule=rule, base=base, device=device, progress=progress)
    files = api.save(result.adapter, out, to, force=force, inputs=(path,), family=family)
    return result, files
