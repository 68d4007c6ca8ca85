"""Flux.1: the BFL naming (kohya Flux LoRAs, BFL / ComfyUI single files) and its map to
diffusers' ``FluxTransformer2DModel``.

BFL fuses projections that diffusers keeps apart:

* ``double_blocks.i.img_attn.qkv`` = rows [to_q; to_k; to_v] (D rows each),
  ``double_blocks.i.txt_attn.qkv`` = [add_q_proj; add_k_proj; add_v_proj];
* ``single_blocks.i.linear1`` = [to_q; to_k; to_v; proj_mlp] (D, D, D, M rows, D = in-features);
* ``final_layer.adaLN_modulation.1`` = [shift; scale] where diffusers' ``norm_out.linear`` is
  [scale; shift] (row halves swapped).

A LoRA on a fused weight, ΔW = s · up @ down, splits exactly into one LoRA per part:
ΔW_g = s · up[rows_g] @ down (shared down). Files trained with ``split_qkv`` store
down = [down_q; down_k; down_v] (rank G·r') and a block-diagonal up; those split into
(down_g, up[rows_g, cols_g]) with rank r' and alpha' = alpha · r'/r (same scale). The reverse
fuses with down = cat(down_g) and up = blockdiag(up_g) (scales folded so one alpha serves), or
with a shared down when every part shares it — never a lossy refit.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import torch

from loratool.adapter import LoraModule
from loratool.arch.sdxl import Family
from loratool.errors import FormatError, MatchError

DATA = Path(__file__).parent

# native module (``{i}`` = block index) -> diffusers module(s); several = row-fused, in row order.
DOUBLE_BLOCK = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
SINGLE_BLOCK = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
# RMSNorm scales: parameters, not LoRA targets (checkpoint maps only).
DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
# Native modules whose row halves are stored swapped relative to diffusers.
SWAPPED = {"final_layer.adaLN_modulation.1"}
MLP_RATIO = 4  # Flux.1: proj_mlp has 4·D rows


def module_table(num_double: int, num_single: int) -> dict[str, tuple[str, ...]]:
    """{native module path: diffusers module paths} for a Flux model of this depth."""
    out: dict[str, tuple[str, ...]] = {}
    for i in range(num_double):
        for k, v in DOUBLE_BLOCK.items():
            out[f"double_blocks.{i}.{k}"] = tuple(f"transformer_blocks.{i}.{x}" for x in v)
    for i in range(num_single):
        for k, v in SINGLE_BLOCK.items():
            out[f"single_blocks.{i}.{k}"] = tuple(f"single_transformer_blocks.{i}.{x}" for x in v)
    out.update(TOP)
    return out


def norm_table(num_double: int, num_single: int) -> dict[str, str]:
    """{native RMSNorm scale parameter: diffusers parameter}."""
    out = {}
    for i in range(num_double):
        out.update({f"double_blocks.{i}.{k}": f"transformer_blocks.{i}.{v}" for k, v in DOUBLE_NORMS.items()})
    for i in range(num_single):
        out.update({f"single_blocks.{i}.{k}": f"single_transformer_blocks.{i}.{v}" for k, v in SINGLE_NORMS.items()})
    return out


def split_rows(native: str, out_rows: int, in_features: int) -> list[tuple[int, int]]:
    """Row ranges of each diffusers part inside the fused native weight."""
    if native.endswith(".linear1"):
        d = in_features
        if out_rows <= 3 * d:
            raise MatchError(f"{native}: {out_rows} rows cannot hold q, k, v of width {d} and an MLP")
        return [(0, d), (d, 2 * d), (2 * d, 3 * d), (3 * d, out_rows)]
    if native.endswith(".qkv"):
        if out_rows % 3:
            raise MatchError(f"{native}: {out_rows} rows do not split into q, k, v")
        d = out_rows // 3
        return [(0, d), (d, 2 * d), (2 * d, 3 * d)]
    return [(0, out_rows)]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along dim 0 (BFL shift/scale <-> diffusers scale/shift; its own inverse)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# --- shipped vocabularies (scripts/gen_arch_tables.py, Flux.1-dev config) ---


@cache
def _data() -> dict:
    return json.loads((DATA / "flux_modules.json").read_text())


def native_paths(component: str) -> set[str]:
    data = _data()
    if component == "transformer":
        return set(module_table(data["num_layers"], data["num_single_layers"]))
    if component in ("text_encoder", "text_encoder_2"):
        return set(data[component])
    return set()


def _native_of(path: str) -> tuple[str, int] | None:
    """(native module, part index) of a diffusers transformer module path."""
    parts = path.split(".")
    if len(parts) > 2 and parts[0] in ("transformer_blocks", "single_transformer_blocks") and parts[1].isdigit():
        i, rest = parts[1], ".".join(parts[2:])
        table, prefix = (DOUBLE_BLOCK, "double_blocks") if parts[0] == "transformer_blocks" else \
            (SINGLE_BLOCK, "single_blocks")
        for native, targets in table.items():
            if rest in targets:
                return f"{prefix}.{i}.{native}", targets.index(rest)
        return None
    for native, targets in TOP.items():
        if path in targets:
            return native, targets.index(path)
    return None


def _diffusers_of(native: str) -> tuple[str, ...] | None:
    parts = native.split(".")
    if len(parts) > 2 and parts[0] in ("double_blocks", "single_blocks") and parts[1].isdigit():
        i, rest = parts[1], ".".join(parts[2:])
        table, prefix = (DOUBLE_BLOCK, "transformer_blocks") if parts[0] == "double_blocks" else \
            (SINGLE_BLOCK, "single_transformer_blocks")
        targets = table.get(rest)
        return None if targets is None else tuple(f"{prefix}.{i}.{t}" for t in targets)
    return TOP.get(native)


def _copy(module: LoraModule, path: str, tensors: dict[str, torch.Tensor], *, kind: str | None = None,
          alpha: float | None = None, magnitude: torch.Tensor | None = None, hints: dict | None = None) -> LoraModule:
    return LoraModule(
        component=module.component, path=path, kind=kind or module.kind, layer=module.layer, tensors=tensors,
        alpha=alpha, rslora=module.rslora, magnitude=magnitude, fan_in_fan_out=module.fan_in_fan_out,
        hints=hints if hints is not None else {k: v for k, v in module.hints.items() if k != "weight_shape"},
    )


def _block_diagonal(up: torch.Tensor, rows: list[tuple[int, int]]) -> bool:
    """True when ``up`` [out, G·r'] is zero outside the diagonal blocks (rows_g × cols_g)."""
    g = len(rows)
    if up.shape[1] % g:
        return False
    rr = up.shape[1] // g
    mask = torch.ones_like(up, dtype=torch.bool)
    for k, (a, b) in enumerate(rows):
        mask[a:b, k * rr:(k + 1) * rr] = False
    return not bool(up[mask].any())


def _as_full(module: LoraModule) -> LoraModule:
    """A module whose factors cannot be row-split (LoHa/LoKr/Tucker) as its exact dense ΔW."""
    from loratool.delta import delta_weight

    diff = delta_weight(module, dtype=torch.float32).to(module.dtype)
    return _copy(module, module.path, {"diff": diff}, kind="full", magnitude=module.magnitude)


def _split(module: LoraModule, targets: tuple[str, ...], native: str, swapped: bool | None = None) -> list[LoraModule]:
    """One fused native module -> one module per diffusers part, exactly (``swapped``: row halves
    stored swapped; default: ``native`` is in :data:`SWAPPED`). Shared with :mod:`loratool.arch.sd3`."""
    if module.kind not in ("lora", "full") or "mid" in module.tensors:
        module = _as_full(module)
    t = module.tensors
    if module.kind == "full":
        out_rows, in_features = t["diff"].shape[0], t["diff"].shape[1]
    else:
        out_rows, in_features = t["up"].shape[0], t["down"].shape[1]
    rows = split_rows(native, int(out_rows), int(in_features))
    if swapped is None:
        swapped = native in SWAPPED

    def rowwise(x: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
        if x is None:
            return None
        return (swap_halves(x) if swapped else x)[a:b].clone()

    out = []
    if module.kind == "full":
        for path, (a, b) in zip(targets, rows):
            tensors = {"diff": rowwise(t["diff"], a, b)}
            if "diff_b" in t:
                tensors["diff_b"] = rowwise(t["diff_b"], a, b)
            out.append(_copy(module, path, tensors, alpha=module.alpha, magnitude=rowwise(module.magnitude, a, b)))
        return out
    down, up = t["down"], t["up"]
    r = down.shape[0]
    diagonal = len(rows) > 1 and _block_diagonal(up, rows)
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
        out.append(_copy(module, path, tensors, alpha=alpha, magnitude=rowwise(module.magnitude, a, b)))
    return out


def to_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    """BFL transformer paths -> diffusers paths; fused modules split exactly (see module doc)."""
    out: list[LoraModule] = []
    for m in modules:
        if m.component != "transformer":
            out.append(m)
            continue
        targets = _diffusers_of(m.path)
        if targets is None:
            if _native_of(m.path) is not None:  # already a diffusers name
                out.append(m)
                continue
            raise MatchError(f"transformer:{m.path}: not a Flux transformer module")
        if len(targets) == 1 and m.path not in SWAPPED:
            out.append(_copy(m, targets[0], dict(m.tensors), alpha=m.alpha, magnitude=m.magnitude, hints=m.hints))
        else:
            out.extend(_split(m, targets, m.path))
    return out


def _fuse(native: str, parts: list[LoraModule | None], targets: tuple[str, ...],
          swapped: bool | None = None) -> LoraModule:
    """Several diffusers part modules (None = part not adapted) -> one fused native module."""
    present = [p for p in parts if p is not None]
    first = present[0]
    if swapped is None:
        swapped = native in SWAPPED
    if any(p.magnitude is not None for p in present) and (
        any(p is None or p.magnitude is None for p in parts)
    ):
        raise FormatError(f"transformer:{native}: DoRA on only some of {', '.join(targets)} cannot be fused "
                          "(the other rows' magnitudes are unknown)")
    in_features = _in_features(first)
    widths = [_out_rows(p) if p is not None else None for p in parts]
    if None in widths:
        d = in_features
        guess = [d, d, d, MLP_RATIO * d] if native.endswith(".linear1") else [d] * len(parts)
        widths = [w if w is not None else guess[i] for i, w in enumerate(widths)]

    def cat_rows(xs: list[torch.Tensor]) -> torch.Tensor:
        y = torch.cat(xs, dim=0)
        return swap_halves(y) if swapped else y

    magnitude = cat_rows([p.magnitude for p in parts]) if first.magnitude is not None else None
    if any(p.kind != "lora" or "mid" in p.tensors for p in present):
        from loratool.delta import delta_weight

        dtype = first.dtype
        diffs = [delta_weight(p, dtype=torch.float32) if p is not None else torch.zeros(w, in_features)
                 for p, w in zip(parts, widths)]
        tensors = {"diff": cat_rows(diffs).to(dtype)}
        return _copy(first, native, tensors, kind="full", magnitude=magnitude, hints={})
    dtype = first.dtype
    downs = [p.tensors["down"] for p in present]
    same = (len(present) == len(parts) and all(torch.equal(d, downs[0]) for d in downs)
            and len({(p.scale, p.rank) for p in present}) == 1 and not any("bias" in p.tensors for p in present))
    if same and len(parts) > 1:
        up = cat_rows([p.tensors["up"] for p in parts])
        return _copy(first, native, {"down": downs[0].clone(), "up": up}, alpha=first.alpha, magnitude=magnitude,
                     hints={})
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
    return _copy(first, native, tensors, alpha=alpha, magnitude=magnitude, hints={})


def _in_features(m: LoraModule) -> int:
    return int(m.tensors["diff"].shape[1]) if m.kind == "full" else int(m.weight_shape[1])


def _out_rows(m: LoraModule) -> int:
    return int(m.weight_shape[0])


def from_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    """diffusers transformer paths -> BFL paths; split parts fuse exactly (see module doc)."""
    out: list[LoraModule] = []
    groups: dict[str, dict[int, LoraModule]] = {}
    order: list[str] = []
    for m in modules:
        if m.component != "transformer":
            out.append(m)
            continue
        hit = _native_of(m.path)
        if hit is None:
            if _diffusers_of(m.path) is not None:  # already native
                out.append(m)
                continue
            raise MatchError(f"transformer:{m.path}: not a Flux transformer module")
        native, idx = hit
        targets = _diffusers_of(native)
        if len(targets) == 1 and native not in SWAPPED:
            out.append(_copy(m, native, dict(m.tensors), alpha=m.alpha, magnitude=m.magnitude, hints=m.hints))
            continue
        if native not in groups:
            groups[native] = {}
            order.append(native)
        groups[native][idx] = m
    for native in order:
        targets = _diffusers_of(native)
        parts = [groups[native].get(i) for i in range(len(targets))]
        out.append(_fuse(native, parts, targets))
    return out


def detect(keys: list[str], metadata: dict[str, str]) -> int:
    version = (metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")).lower()
    if "flux" in version:
        return 100
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys):
        return 90
    return 0


FAMILY = Family(
    name="flux",
    kohya_prefixes={"lora_unet": "transformer", "lora_te1": "text_encoder", "lora_te3": "text_encoder_2"},
    native_paths=native_paths,
    to_canonical=to_canonical,
    from_canonical=from_canonical,
    detect=detect,
)
