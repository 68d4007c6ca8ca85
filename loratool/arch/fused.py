"""Fused native weights: the exact split / fuse maths and the naming driver Flux (BFL names) and
SD3 (MMDiT names) share.

Native checkpoints keep in one weight what diffusers keeps apart, stacked by rows
(W = [W_1; …; W_G]: q/k/v, BFL's q/k/v/MLP), and some store a weight's row halves swapped
([shift; scale] where diffusers holds [scale; shift]).

Split (native -> diffusers). A LoRA on a fused weight, ΔW = s · up @ down, splits exactly into one
LoRA per part with the down shared: ΔW_g = s · up[rows_g] @ down. Files trained with ``split_qkv``
store down = [down_1; …; down_G] (rank G·r') and a block-diagonal up; those split into
(down_g, up[rows_g, cols_g]) at rank r' with alpha' = s · r' (s · √r' for rsLoRA): the same scale.
Factors that cannot be row-split (LoHa, LoKr, Tucker cores) become their dense ΔW (kind ``full``).
Whether ``up`` is block-diagonal is a property of its values, so it is decided only when they are
read: a header-only read (``info`` without ``--stats``: ``meta`` tensors) splits with the shared down,
which is exact for every ``up``, and reports each part at the fused module's rank.

Fuse (diffusers -> native). Parts that share one down, one scale and one rank fuse to
(down, cat(up_g)). Otherwise down = cat(down_g) and up = blockdiag(up_g) at rank R = Σ r_g, with
alpha = s · R (s · √R) when every part has scale s, else each part's scale folded into its up block
and alpha = R (√R): scale 1. A part not adapted is zero rows. Never a lossy refit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property, partial

from loratool.adapter import LoraModule
from loratool.errors import FormatError, MatchError
from loratool.header_only import torch

Rows = list[tuple[int, int]]

# diffusers names both Flux and SD3 share (family evidence: the structure, not the family)
DOUBLE_STREAM = re.compile(r"^transformer_blocks\.\d+\.(attn\.|ff\.|ff_context\.|norm1)")
# the attention projections of a double-stream block: their input width is the model's hidden width
INNER = re.compile(r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)$")
# the pooled-text embedder: its input width is the pooled text width (Flux.1 CLIP-L 768, SD3 CLIP-L+G 2048)
POOLED = re.compile(r"^time_text_embed\.text_embedder\.linear_1$")


def dit_evidence(ev, widths: dict[int, str], pooled: int, text_encoder_2: re.Pattern[str], what: str
                 ) -> tuple[int, str]:
    """The evidence Flux and SD3 weigh alike (:mod:`loratool.arch.evidence` scale): the hidden width of a
    published model (``widths``: width -> model), the pooled text width, ``text_encoder_2`` names
    (``what`` they are), MMDiT-style double-stream blocks."""
    from loratool.arch.evidence import STRUCTURE, WIDTHS

    hidden = ev.in_features("transformer", INNER)
    if len(hidden) == 1 and hidden <= set(widths):
        w = hidden.pop()
        return WIDTHS, f"hidden width {w} ({widths[w]})"
    if ev.in_features("transformer", POOLED) == {pooled}:
        return WIDTHS, f"pooled text width {pooled}"
    if "transformer" in ev.components and ev.any_path("text_encoder_2", text_encoder_2):
        return STRUCTURE + 20, f"a {what} text_encoder_2 beside the transformer"
    if ev.any_path("transformer", DOUBLE_STREAM):
        return STRUCTURE, "MMDiT-style transformer blocks"
    return 0, ""


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along dim 0 (native shift/scale <-> diffusers scale/shift; its own inverse)."""
    from loratool.header_only import ShapeTensor

    if isinstance(t, ShapeTensor):  # header-only: the same shape, no values to move
        return t.clone()
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def qkv_rows(native: str, out_rows: int, in_features: int) -> Rows:
    """Row ranges of the parts of ``native``: thirds (q, k, v) of a fused ``*.qkv`` weight, else the
    whole weight."""
    if native.endswith(".qkv"):
        if out_rows % 3:
            raise MatchError(f"{native}: {out_rows} rows do not split into q, k, v")
        d = out_rows // 3
        return [(0, d), (d, 2 * d), (2 * d, 3 * d)]
    return [(0, out_rows)]


def equal_widths(native: str, in_features: int, parts: int) -> list[int]:
    """Nominal rows of each part of ``native``: ``in_features`` each (square q, k, v)."""
    return [in_features] * parts


def module_shape(m: LoraModule) -> tuple[int, int]:
    """(output rows, input features) of the weight ``m`` adapts."""
    if m.kind == "full":
        return int(m.tensors["diff"].shape[0]), int(m.tensors["diff"].shape[1])
    shape = m.weight_shape
    return int(shape[0]), int(shape[1])


def derived(module: LoraModule, path: str, tensors: dict[str, torch.Tensor], *, kind: str | None = None,
            alpha: float | None = None, magnitude: torch.Tensor | None = None,
            hints: dict | None = None) -> LoraModule:
    """A module at ``path`` holding ``tensors``, with ``module``'s layer and flags (hints minus the
    ``weight_shape`` the new tensors no longer have, unless given)."""
    return LoraModule(
        component=module.component, path=path, kind=kind or module.kind, layer=module.layer, tensors=tensors,
        alpha=alpha, rslora=module.rslora, magnitude=magnitude, fan_in_fan_out=module.fan_in_fan_out,
        hints=hints if hints is not None else {k: v for k, v in module.hints.items() if k != "weight_shape"},
    )


def renamed(module: LoraModule, path: str) -> LoraModule:
    """The same module under another path (tensors and hints in new dicts: the input stays untouched)."""
    return replace(module, path=path, tensors=dict(module.tensors), hints=dict(module.hints))


def block_diagonal(up: torch.Tensor, rows: Rows) -> bool:
    """True when ``up`` [out, G·r'] is zero outside the diagonal blocks (rows_g × cols_g); False for a
    tensor without values (a header-only stand-in, ``meta``): the shared-down split is exact either way."""
    from loratool.header_only import ShapeTensor

    g = len(rows)
    if isinstance(up, ShapeTensor) or up.is_meta or up.shape[1] % g:
        return False
    rr = up.shape[1] // g
    # block by block (no mask the size of up): rows_j × cols_k for every j ≠ k, and rows no block covers
    ends = [0] + [b for _, b in sorted(rows)]
    starts = [a for a, _ in sorted(rows)] + [up.shape[0]]
    gaps = [(end, start) for end, start in zip(ends, starts) if start > end]
    for k in range(g):
        cols = slice(k * rr, (k + 1) * rr)
        for j, (a, b) in enumerate(rows):
            if j != k and bool(up[a:b, cols].any()):
                return False
        if any(bool(up[a:b, cols].any()) for a, b in gaps):
            return False
    return True


def as_full(module: LoraModule) -> LoraModule:
    """A module whose factors cannot be row-split (LoHa/LoKr/Tucker) as its exact dense ΔW."""
    from loratool.delta import delta_weight

    diff = delta_weight(module, dtype=torch.float32).to(module.dtype)
    return derived(module, module.path, {"diff": diff}, kind="full", magnitude=module.magnitude)


def split(module: LoraModule, targets: tuple[str, ...], split_rows: Callable[[int, int], Rows],
          swapped: bool) -> list[LoraModule]:
    """One fused native module -> one module per diffusers part in ``targets``, exactly.

    ``split_rows(out_rows, in_features)`` gives each part's rows; ``swapped``: the row halves are
    stored swapped (restored before slicing)."""
    if module.kind not in ("lora", "full") or "mid" in module.tensors:
        module = as_full(module)
    per_input = module.magnitude is not None and module.hints.get("dora_axis") == "in"
    if per_input and len(targets) > 1:
        raise FormatError(f"{module.component}:{module.path}: DoRA normalised per input column over the fused "
                          f"weight cannot be split into {', '.join(targets)} (each part's norm differs)")
    t = module.tensors
    if module.kind == "full":
        out_rows, in_features = t["diff"].shape[0], t["diff"].shape[1]
    else:
        out_rows, in_features = t["up"].shape[0], t["down"].shape[1]
    rows = split_rows(int(out_rows), int(in_features))

    def rowwise(x: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
        if x is None:
            return None
        return (swap_halves(x) if swapped else x)[a:b].clone()

    def magnitude(a: int, b: int) -> torch.Tensor | None:
        # one entry per input column: the rows' order does not touch it
        return module.magnitude.clone() if per_input else rowwise(module.magnitude, a, b)

    out = []
    if module.kind == "full":
        for path, (a, b) in zip(targets, rows):
            tensors = {"diff": rowwise(t["diff"], a, b)}
            if "diff_b" in t:
                tensors["diff_b"] = rowwise(t["diff_b"], a, b)
            out.append(derived(module, path, tensors, alpha=module.alpha, magnitude=magnitude(a, b)))
        return _mark_parts(out, module)
    down, up = t["down"], t["up"]
    r = down.shape[0]
    diagonal = len(rows) > 1 and block_diagonal(up, rows)
    for g, (path, (a, b)) in enumerate(zip(targets, rows)):
        if diagonal:
            rr = r // len(rows)
            tensors = {"down": down[g * rr:(g + 1) * rr].clone(), "up": up[a:b, g * rr:(g + 1) * rr].clone()}
            # keep scale = alpha/r (or alpha/√r) unchanged at the smaller rank
            base = module.scale
            alpha = base * math.sqrt(rr) if module.rslora else base * rr
        else:
            tensors = {"down": down.clone(), "up": rowwise(up, a, b)}
            alpha = module.alpha
        if "bias" in t:
            tensors["bias"] = rowwise(t["bias"], a, b)
        out.append(derived(module, path, tensors, alpha=alpha, magnitude=magnitude(a, b)))
    return _mark_parts(out, module)


def _mark_parts(parts: list[LoraModule], native: LoraModule) -> list[LoraModule]:
    """``hints["fused"] = (native path, part index, part count)``: the parts of one fused native
    module, in row order, so an op that must work in the file's own space (resize to the rank of
    the module in the file) can put them back together."""
    for g, part in enumerate(parts):
        part.hints["fused"] = (native.path, g, len(parts))
    return parts


def fuse(native: str, parts: list[LoraModule | None], targets: tuple[str, ...], swapped: bool,
         nominal_widths: Callable[[int, int], list[int]]) -> LoraModule:
    """Diffusers part modules (None = part not adapted) -> one fused native module, exactly.

    ``swapped``: store the row halves swapped; ``nominal_widths(in_features, len(parts))`` gives each
    part's rows when some part is absent (its rows are then zero)."""
    present = [p for p in parts if p is not None]
    first = present[0]
    if any(p.magnitude is not None for p in present) and (
        any(p is None or p.magnitude is None for p in parts)
    ):
        raise FormatError(f"{first.component}:{native}: DoRA on only some of {', '.join(targets)} cannot be fused "
                          "(the other rows' magnitudes are unknown)")
    in_features = module_shape(first)[1]
    widths = [int(p.weight_shape[0]) if p is not None else None for p in parts]
    if None in widths:
        guess = nominal_widths(in_features, len(parts))
        widths = [w if w is not None else guess[i] for i, w in enumerate(widths)]

    def cat_rows(xs: list[torch.Tensor]) -> torch.Tensor:
        y = torch.cat(xs, dim=0)
        return swap_halves(y) if swapped else y

    per_input = first.magnitude is not None and first.hints.get("dora_axis") == "in"
    if per_input and len(parts) > 1:
        raise FormatError(f"{first.component}:{native}: DoRA normalised per input column of each of "
                          f"{', '.join(targets)} cannot be fused (the fused weight has one norm per column)")
    if first.magnitude is None:
        magnitude = None
    else:
        magnitude = first.magnitude if per_input else cat_rows([p.magnitude for p in parts])
    # the DoRA axis and strength semantics are maths, not naming: they stay with the fused module
    hints = {k: first.hints[k] for k in ("dora_axis", "dora_strength") if k in first.hints}
    dtype = first.dtype
    if any(p.kind != "lora" or "mid" in p.tensors for p in present):
        from loratool.delta import delta_weight

        diffs = [delta_weight(p, dtype=torch.float32) if p is not None else torch.zeros(w, in_features)
                 for p, w in zip(parts, widths)]
        tensors = {"diff": cat_rows(diffs).to(dtype)}
        return derived(first, native, tensors, kind="full", magnitude=magnitude, hints=hints)
    downs = [p.tensors["down"] for p in present]
    same = (len(present) == len(parts) and all(torch.equal(d, downs[0]) for d in downs)
            and len({(p.scale, p.rank) for p in present}) == 1 and not any("bias" in p.tensors for p in present))
    if same and len(parts) > 1:
        up = cat_rows([p.tensors["up"] for p in parts])
        return derived(first, native, {"down": downs[0].clone(), "up": up}, alpha=first.alpha, magnitude=magnitude,
                       hints=hints)
    scales = {p.scale for p in present}
    rank = sum(p.rank for p in present)
    if len(scales) == 1:
        # one shared scale: keep the factors untouched, choose alpha so alpha/R (or /√R) gives it
        s = scales.pop()
        fold = [1.0] * len(parts)
        alpha = s * math.sqrt(rank) if first.rslora else s * rank
    else:
        # scales differ: fold each part's scale into its up block, scale 1 overall
        fold = [p.scale if p is not None else 1.0 for p in parts]
        alpha = math.sqrt(rank) if first.rslora else float(rank)
    down = torch.cat(downs, dim=0)
    work = torch.promote_types(dtype, torch.float32)  # fold in at least float32, never below the input
    up = torch.zeros(sum(widths), rank, dtype=work)
    row = col = 0
    for p, w, f in zip(parts, widths, fold):
        if p is not None:
            up[row:row + w, col:col + p.rank] = p.tensors["up"].to(work) * f
            col += p.rank
        row += w
    tensors = {"down": down, "up": (swap_halves(up) if swapped else up).to(dtype)}
    if any("bias" in p.tensors for p in present):
        tensors["bias"] = cat_rows([p.tensors["bias"] if p is not None and "bias" in p.tensors
                                    else torch.zeros(w, dtype=dtype) for p, w in zip(parts, widths)])
    return derived(first, native, tensors, alpha=alpha, magnitude=magnitude, hints=hints)


def _in_block(path: str, block: str) -> tuple[str, str] | None:
    """(index, path inside the block) when ``path`` is ``{block}.{index}.<rest>`` (``block`` may be dotted:
    ``txt_in.individual_token_refiner.blocks``)."""
    if not path.startswith(block + "."):
        return None
    index, _, rest = path[len(block) + 1:].partition(".")
    return (index, rest) if index.isdigit() else None


def _parts(table: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, int]]:
    """The inverse of a naming table (every family's detection asks it of every module path, a dict look-up
    instead of a scan of the table)."""
    out: dict[str, tuple[str, int]] = {}
    for native, targets in table.items():
        for target in targets:
            out.setdefault(target, (native, targets.index(target)))
    return out


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@dataclass(frozen=True)
class Block:
    """Indexed blocks: ``{native}.{i}.<key>`` holds what ``{diffusers}.{i}.<each of table[key]>`` hold."""

    native: str  # "double_blocks"
    diffusers: str  # "transformer_blocks"
    table: dict[str, tuple[str, ...]]  # native module inside a block -> diffusers modules, in row order

    @cached_property
    def parts(self) -> dict[str, tuple[str, int]]:
        """diffusers module inside a block -> (native module, part index), the first native listing it."""
        return _parts(self.table)


@dataclass(frozen=True)
class FusedNaming:
    """A family's native transformer naming, as :func:`to_canonical` / :func:`from_canonical` need it.

    Only single-target modules can be stored with their halves swapped (``swapped(native, module)``
    decides; it may look at the module's shape). ``split_rows(native, out_rows, in_features)`` places
    the parts of a fused module; ``part_widths(native, in_features, parts)`` sizes absent parts."""

    what: str  # "a Flux transformer module": what an unknown path is not
    blocks: tuple[Block, ...]
    top: dict[str, tuple[str, ...]]  # native module outside the blocks -> diffusers modules
    swapped: Callable[[str, LoraModule], bool]
    split_rows: Callable[[str, int, int], Rows] = qkv_rows
    part_widths: Callable[[str, int, int], list[int]] = equal_widths
    component: str = "transformer"

    @cached_property
    def top_parts(self) -> dict[str, tuple[str, int]]:
        return _parts(self.top)

    def native_of(self, path: str) -> tuple[str, int] | None:
        """(native module, part index) of a diffusers module path."""
        for block in self.blocks:
            hit = _in_block(path, block.diffusers)
            if hit is None:
                continue
            index, rest = hit
            part = block.parts.get(rest)
            return None if part is None else (join(block.native, index, part[0]), part[1])
        return self.top_parts.get(path)

    def diffusers_of(self, native: str) -> tuple[str, ...] | None:
        """Diffusers module paths (in row order) of a native module path."""
        for block in self.blocks:
            hit = _in_block(native, block.native)
            if hit is not None:
                index, rest = hit
                targets = block.table.get(rest)
                return None if targets is None else tuple(join(block.diffusers, index, t) for t in targets)
        return self.top.get(native)

    def unknown(self, path: str) -> MatchError:
        return MatchError(f"{self.component}:{path}: not {self.what}")


def to_canonical(modules: list[LoraModule], naming: FusedNaming) -> list[LoraModule]:
    """Native paths -> diffusers paths: renamed, or split exactly (fused rows, swapped halves).
    Other components and paths already in diffusers naming pass through."""
    out: list[LoraModule] = []
    for m in modules:
        if m.component != naming.component:
            out.append(m)
            continue
        targets = naming.diffusers_of(m.path)
        if targets is None:
            if naming.native_of(m.path) is not None:  # already a diffusers name
                out.append(m)
                continue
            raise naming.unknown(m.path)
        swapped = len(targets) == 1 and naming.swapped(m.path, m)
        if len(targets) == 1 and not swapped:
            out.append(renamed(m, targets[0]))
        else:
            out.extend(split(m, targets, partial(naming.split_rows, m.path), swapped))
    return out


def from_canonical(modules: list[LoraModule], naming: FusedNaming) -> list[LoraModule]:
    """Diffusers paths -> native paths: renamed, or the parts of each fused module fused exactly.
    One module per native module, where its first part stood. Paths already native pass through."""
    out: list[LoraModule | str] = []  # a str is a fused native module, filled in from ``groups`` below
    groups: dict[str, dict[int, LoraModule]] = {}
    for m in modules:
        if m.component != naming.component:
            out.append(m)
            continue
        hit = naming.native_of(m.path)
        if hit is None:
            if naming.diffusers_of(m.path) is not None:  # already native
                out.append(m)
                continue
            raise naming.unknown(m.path)
        native, idx = hit
        targets = naming.diffusers_of(native)
        if len(targets) == 1:
            if naming.swapped(native, m):
                out.append(fuse(native, [m], targets, True, partial(naming.part_widths, native)))
            else:
                out.append(renamed(m, native))
            continue
        if native not in groups:
            groups[native] = {}
            out.append(native)
        groups[native][idx] = m

    def fuse_group(native: str) -> LoraModule:
        targets = naming.diffusers_of(native)
        parts = [groups[native].get(i) for i in range(len(targets))]
        return fuse(native, parts, targets, False, partial(naming.part_widths, native))

    return [fuse_group(x) if isinstance(x, str) else x for x in out]
