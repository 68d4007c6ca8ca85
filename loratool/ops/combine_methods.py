"""TIES, DARE and magnitude pruning on each module's ΔW, as mergekit defines them on dense deltas.

A small registry of methods (:data:`METHODS`), each a set of parameters of mergekit's
``GeneralizedTaskArithmeticMerge`` (mergekit 0.1.5, ``merge_methods/generalized_task_arithmetic.py``
and ``sparsify.py``; ``magnitude_prune`` is PEFT's name for the same class with magnitude pruning
and no sign election). For one module with inputs i = 1..n (ΔWᵢ = 0 for an input without the
module), weights wᵢ, density d:

1. sparsify each ΔWᵢ (``ties``, ``magnitude_prune``: keep the k = max(1, ⌊d·N⌋) entries of largest
   |ΔWᵢ|; ``dare_*``: keep each entry with probability d, mask ~ Bernoulli(d)); with rescale,
   multiply the kept entries by ‖ΔWᵢ‖₁ / ‖maskᵢ ⊙ ΔWᵢ‖₁ (skipped when either norm is < 1e-7);
2. Tᵢ = wᵢ · sparse(ΔWᵢ);
3. sign election (``ties``, ``dare_ties``): the majority sign per entry, σ = +1 where
   Σᵢ Tᵢ ≥ 0 (``--majority-sign total``) or Σᵢ sign(Tᵢ) ≥ 0 (``frequency``), else −1;
   Mᵢ = [sign(Tᵢ) = σ]; R = Σᵢ Mᵢ ⊙ Tᵢ and D = Σᵢ wᵢ Mᵢ (D = 1 where it is 0);
   otherwise R = Σᵢ Tᵢ, D = Σᵢ wᵢ (1 where |D| < 1e-8);
4. with normalize, R ← R / D.

Defaults as mergekit registers them: ``ties`` normalize, no rescale; ``dare_ties`` and
``dare_linear`` rescale, no normalize; ``magnitude_prune`` neither. The result R is then factored
to the best rank-N LoRA (:mod:`loratool.ops.lowrank_fit`), with its Frobenius error reported.

Randomness (DARE): one ``torch.Generator`` seeded with ``--seed`` (on the CPU, whatever the
device) is consumed module by module in output order and, within a module, input by input (then
the bias deltas, if any), each mask drawn as ``torch.bernoulli(torch.full(shape, d,
dtype=float32))`` on the weight's stored shape. That is the stream mergekit consumes after
``torch.manual_seed(seed)`` when it merges the same tensors in the same order on the CPU, so its
masks are reproduced. (mergekit's CPU path also rounds the DARE result to float32; loratool keeps
float64.) The magnitude order is mergekit's: ``argsort`` of |ΔW| in float32, descending.

``factor_space`` reproduces PEFT's ``add_weighted_adapter`` (``combination_type`` ties,
dare_linear, dare_ties, magnitude_prune; ``peft.utils.merge_utils``) instead: the method runs on
the A (down) and B (up) factors separately with weights cᵢ = √|wᵢsᵢ|·sign(wᵢsᵢ) on A and
√|wᵢsᵢ| on B (sᵢ the module's scale), PEFT's pruning (top-k by ``torch.topk`` with k = ⌊d·N⌋;
DARE divides by d) and PEFT's TIES (sign elected on the unweighted pruned factors, the sum
divided by the count of kept entries); the output keeps the rank with alpha = r. All inputs
holding a module must share its rank, as PEFT requires. It approximates ΔW poorly (cross terms);
it is there so results can be compared with PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from loratool.adapter import LoraModule
from loratool.delta import delta_bias, delta_weight
from loratool.errors import MatchError, UsageError
from loratool.ops.factor_form import transposed
from loratool.ops.lowrank_fit import Fit, fit_dense
from loratool.ops.rank_rules import RankRule
from loratool.ops.stack import ModuleStack


@dataclass(frozen=True)
class Method:
    """One entry of the registry: mergekit's generalized task-arithmetic parameters."""

    name: str
    sparsify: str | None  # "magnitude" | "random" | None
    consensus: bool  # sign election (TIES)
    normalize: bool  # default of mergekit's ``normalize``
    rescale: bool  # default of mergekit's ``rescale`` (L1 norm)


METHODS: dict[str, Method] = {
    "ties": Method("ties", "magnitude", True, normalize=True, rescale=False),
    "dare_ties": Method("dare_ties", "random", True, normalize=False, rescale=True),
    "dare_linear": Method("dare_linear", "random", False, normalize=False, rescale=True),
    "magnitude_prune": Method("magnitude_prune", "magnitude", False, normalize=False, rescale=False),
}
# --majority-sign (PEFT's names) -> mergekit's ConsensusMethod
MAJORITY = {"total": "sum", "frequency": "count"}
RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


@dataclass
class CombineOptions:
    density: float = 1.0  # mergekit's default: nothing pruned
    majority_sign: str = "total"
    seed: int = 0
    normalize: bool | None = None  # None: the method's default
    rescale: bool | None = None
    factor_space: bool = False  # PEFT add_weighted_adapter's convention
    rule: RankRule | None = None  # dynamic rank rule for the factorization

    def check(self, method: str) -> None:
        if method not in METHODS:
            raise UsageError(f"--method {method}: combination methods are {', '.join(METHODS)}")
        if not (0.0 <= self.density <= 1.0) or math.isnan(self.density):
            raise UsageError(f"--density {self.density}: must be in [0, 1]")
        if self.majority_sign not in MAJORITY:
            raise UsageError(f"--majority-sign {self.majority_sign}: choose total or frequency")
        if self.factor_space and (self.normalize is not None or self.rescale is not None or self.rule is not None):
            raise UsageError("--factor-space follows PEFT exactly: it takes no --normalize, --rescale or --dynamic")


# ------------------------------------------------------------------ mergekit semantics (dense ΔW)
def _rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def bernoulli_mask(shape: tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    """The DARE keep-mask, drawn on the CPU in float32 (see the module docstring)."""
    return torch.bernoulli(torch.full(tuple(shape), float(density), dtype=torch.float32), generator=generator)


def sparsify(tensor: torch.Tensor, density: float, kind: str, rescale: bool,
             generator: torch.Generator) -> torch.Tensor:
    """mergekit's ``sparsify`` (magnitude / random) in ``tensor``'s dtype."""
    if density >= 1:
        return tensor
    if kind == "magnitude":
        if density <= 0 or tensor.numel() == 0:
            return torch.zeros_like(tensor)
        k = max(1, int(density * tensor.numel()))
        order = torch.argsort(tensor.abs().reshape(-1).float().cpu(), descending=True)[:k]
        mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
        mask[order] = 1
        return _rescaled(tensor, mask.to(tensor.device).reshape(tensor.shape), rescale)
    mask = bernoulli_mask(tuple(tensor.shape), density, generator)
    return _rescaled(tensor, mask.to(device=tensor.device, dtype=tensor.dtype), rescale)


def merge_deltas(deltas: list[torch.Tensor], weights: list[float], method: Method, density: float,
                 majority: str, normalize: bool, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """mergekit's ``merge_group`` on deltas (base = 0): the combined ΔW."""
    stacked = torch.stack([
        sparsify(d, density, method.sparsify, rescale, generator) if method.sparsify else d for d in deltas
    ])
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * (stacked.dim() - 1)))
    stacked = stacked * w
    if method.consensus:
        sign = stacked.sign()
        votes = stacked.sum(dim=0) if MAJORITY[majority] == "sum" else sign.sum(dim=0)
        majority_sign = (votes >= 0).to(stacked.dtype) * 2 - 1
        mask = sign == majority_sign
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed


# ------------------------------------------------------------------ PEFT semantics (factors)
def _peft_prune(tensor: torch.Tensor, density: float, kind: str, generator: torch.Generator) -> torch.Tensor:
    """``peft.utils.merge_utils.prune`` (rescale for random, as PEFT's DARE asks)."""
    if density >= 1:
        return tensor
    if kind == "magnitude":
        mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
        mask[top[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = bernoulli_mask(tuple(tensor.shape), density, generator).to(device=tensor.device, dtype=tensor.dtype)
    return tensor * mask / density


def peft_merge(tensors: list[torch.Tensor], weights: list[float], method: Method, density: float,
               majority: str, generator: torch.Generator) -> torch.Tensor:
    """``peft.utils.merge_utils`` ties / dare_linear / dare_ties / magnitude_prune on one factor list."""
    stacked = torch.stack([_peft_prune(t, density, method.sparsify, generator) for t in tensors])
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
    if not method.consensus:
        return (stacked * w).sum(dim=0)
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if majority == "total" else sign.sum(dim=0)
    mask = sign == torch.where(votes >= 0, 1, -1)
    weighted = stacked * w
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


# ------------------------------------------------------------------ per module, inside stack
@dataclass
class CombinedModule(ModuleStack):
    """A stack report with the factorization's numbers (``rank_out`` is the kept rank)."""

    norm: float = 0.0  # ‖R‖_F of the combined ΔW
    error: float = 0.0  # ‖R − up @ down‖_F of the written factors
    solver: str = "exact"

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(norm=self.norm, error=self.error, rel_error=self.error / self.norm if self.norm else 0.0,
                   solver=self.solver)
        return out


@dataclass
class Combiner:
    """Builds each output module of ``stack --method ties|dare_*|magnitude_prune``."""

    method: Method
    options: CombineOptions
    rank: int | None
    n_inputs: int
    labels: list[str]
    device: torch.device
    generator: torch.Generator = field(init=False)  # DARE masks
    svd_generator: torch.Generator = field(init=False)  # randomized SVD sketches (kept apart from the masks)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(int(self.options.seed))
        self.svd_generator = torch.Generator().manual_seed(int(self.options.seed))

    @property
    def normalize(self) -> bool:
        return self.method.normalize if self.options.normalize is None else bool(self.options.normalize)

    @property
    def rescale(self) -> bool:
        return self.method.rescale if self.options.rescale is None else bool(self.options.rescale)

    def describe(self) -> dict[str, Any]:
        o = self.options
        out: dict[str, Any] = {"density": o.density, "seed": o.seed, "factor_space": o.factor_space}
        if self.method.consensus:
            out["majority_sign"] = o.majority_sign
        if not o.factor_space:
            out.update(normalize=self.normalize, rescale=self.rescale,
                       dynamic=o.rule.describe() if o.rule is not None else None)
        return out

    def threads(self):
        """The CPU thread policy for per-module maths (one place: ``merge_tensors.compute_threads``)."""
        from loratool.ops.merge_tensors import compute_threads

        return compute_threads(self.device)

    def _check(self, key: tuple[str, str], entries: list[tuple[int, LoraModule]]) -> None:
        dora = [self.labels[i] for i, m in entries if m.magnitude is not None]
        if dora:
            raise UsageError(f"{key[0]}:{key[1]}: DoRA module in {', '.join(dora)}; a DoRA magnitude is absolute, "
                             f"not a delta, and cannot be pruned or sign-elected")
        # LyCORIS stores conv LoHa / LoKr products flattened: [out, in·k·k] matches a conv [out, in, k, k]
        i0, m0 = entries[0]
        for i, m in entries[1:]:
            a, b = tuple(m.weight_shape), tuple(m0.weight_shape)
            same = transposed(m) == transposed(m0) and a[0] == b[0] and math.prod(a) == math.prod(b)
            if not same or (len(a) == len(b) and a != b):
                raise MatchError(
                    f"{key[0]}:{key[1]}: {self.labels[i0]} adapts a {m0.layer} weight of shape "
                    f"{tuple(m0.weight_shape)}, {self.labels[i]} a {m.layer} weight of shape "
                    f"{tuple(m.weight_shape)}; they cannot be combined")

    def module(self, key: tuple[str, str], entries: list[tuple[int, LoraModule]],
               weights: list[float]) -> tuple[LoraModule, CombinedModule]:
        self._check(key, entries)
        if self.options.factor_space:
            return self._factor_space(key, entries, weights)
        return self._dense(key, entries, weights)

    def _dense(self, key, entries, weights) -> tuple[LoraModule, CombinedModule]:
        from loratool.ops.factor_form import to_module
        from loratool.ops.linalg import compute_dtype

        template = max((m for _, m in entries), key=lambda m: len(m.weight_shape))  # the kernel, if any knows it
        wshape = tuple(int(s) for s in template.weight_shape)
        work = compute_dtype(self.device, 0)
        held = dict(entries)
        deltas = [delta_weight(held[i], dtype=work, device=self.device, shape=wshape) if i in held
                  else torch.zeros(wshape, dtype=work, device=self.device) for i in range(self.n_inputs)]
        o = self.options
        combined = merge_deltas(deltas, weights, self.method, o.density, o.majority_sign, self.normalize,
                                self.rescale, self.generator)
        del deltas
        matrix = combined.T if transposed(template) else combined.reshape(combined.shape[0], -1)
        fit: Fit = fit_dense(matrix, self.rank, o.rule, out_dtype=template.dtype, generator=self.svd_generator)
        out = to_module(template, wshape, fit.up, fit.down, scale=1.0, rslora=False, dtype=template.dtype)
        biases = [delta_bias(held[i], dtype=work, device=self.device) if i in held else None
                  for i in range(self.n_inputs)]
        if any(b is not None for b in biases):
            n_out = int(matrix.shape[0])
            biases = [b if b is not None else torch.zeros(n_out, dtype=work, device=self.device) for b in biases]
            bias = merge_deltas(biases, weights, self.method, o.density, o.majority_sign, self.normalize,
                                self.rescale, self.generator)
            out.tensors["bias"] = bias.to("cpu", template.dtype)
        report = CombinedModule(key[0], key[1], [i for i, _ in entries], fit.rank, _kept(fit),
                                norm=fit.norm, error=fit.error, solver=fit.solver)
        return out, report

    def _factor_space(self, key, entries, weights) -> tuple[LoraModule, CombinedModule]:
        ranks = {m.rank for _, m in entries}
        if len(ranks) != 1 or any("mid" in m.tensors or m.kind != "lora" for _, m in entries):
            raise UsageError(
                f"{key[0]}:{key[1]}: --factor-space (PEFT add_weighted_adapter) needs plain LoRA modules of one "
                f"rank; ranks here: {sorted(ranks)}")
        wa, wb = [], []
        for i, m in entries:
            ws = weights[i] * m.scale
            root = math.sqrt(abs(ws))
            wa.append(root if ws >= 0 else -root)
            wb.append(root)
        o = self.options
        work = torch.float64
        downs = [m.tensors["down"].to(device=self.device, dtype=work) for _, m in entries]
        ups = [m.tensors["up"].to(device=self.device, dtype=work) for _, m in entries]
        down = peft_merge(downs, wa, self.method, o.density, o.majority_sign, self.generator)
        up = peft_merge(ups, wb, self.method, o.density, o.majority_sign, self.generator)
        template = entries[0][1]
        r = template.rank
        out = LoraModule(template.component, template.path, "lora", template.layer,
                         {"down": down.to("cpu", template.dtype), "up": up.to("cpu", template.dtype)},
                         alpha=float(r), fan_in_fan_out=template.fan_in_fan_out,
                         hints={k: v for k, v in template.hints.items() if k == "weight_shape"})
        report = CombinedModule(key[0], key[1], [i for i, _ in entries], r, 1.0, solver="factor-space")
        return out, report


def _kept(fit: Fit) -> float:
    """‖up @ down‖ / ‖R‖ = √(1 − (error/‖R‖)²) (Pythagoras: the residual is orthogonal to the kept part)."""
    if fit.norm == 0:
        return 1.0
    return math.sqrt(max(0.0, 1.0 - fit.rel_error ** 2))


def combiner(method: str, rank: int | None, options: CombineOptions | None, n_inputs: int,
             labels: list[str], device: torch.device) -> Combiner:
    options = options or CombineOptions()
    options.check(method)
    if not options.factor_space and rank is None and options.rule is None:
        raise UsageError(f"--method {method} needs --rank N or --dynamic RULE --param P (the combined ΔW is "
                         f"factored to the best rank-N LoRA)")
    if options.factor_space and rank is not None:
        raise UsageError("--factor-space keeps the inputs' rank (PEFT's convention); drop --rank")
    if rank is not None and int(rank) < 1:
        raise UsageError(f"--rank {rank}: must be at least 1")
    return Combiner(METHODS[method], options, int(rank) if rank is not None else None, n_inputs, labels, device)
