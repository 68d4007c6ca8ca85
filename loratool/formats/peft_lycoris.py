"""PEFT LoHa and LoKr adapters (``peft_type: LOHA`` / ``LOKR``), read and written.

Files: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys ``base_model.model.<path>.<name>``,
``name`` one of LyCORIS' (``hada_w1_a`` … ``hada_t2``, ``lokr_w1`` … ``lokr_t2``; PEFT copied LyCORIS'
layouts, ``peft/tuners/{loha,lokr}/layer.py``), so modules are built by the kohya / LyCORIS builder.
diffusers 0.42 holds LoKr adapters too (``load_lora_adapter``: ``_create_lokr_config`` takes a LoKrConfig
from the ``lora_adapter_metadata`` header), not LoHa.

Scale, as PEFT sets it (``update_layer``): ``scaling = alpha / r`` with ``r`` / ``alpha`` from
``rank_pattern`` / ``alpha_pattern`` (first key k with ``re.match(rf"(.*\\.)?({k})$", name)``) or the
config's ``r`` / ``alpha``. Unlike LyCORIS, a LoKr with both Kronecker factors whole still scales by
alpha / r: such modules carry ``declared_rank`` = r.

Writing re-expresses every module's scale as r / alpha (+ patterns) and chooses the config fields under
which PEFT creates exactly the stored tensors:

* LoHa: ``use_effective_conv2d`` iff the conv modules carry Tucker cores (``hada_t1`` / ``hada_t2``).
* LoKr: PEFT derives the factor shapes from ``factorization(dim, decompose_factor)`` and chooses whole or
  factorised factors from r: ``use_w1 = not (decompose_both and r < max(out_l, in_m) / 2)``,
  ``use_w2 = r >= max(out_k, in_n) / 2``. So ``decompose_factor`` is the first of the stored left
  dimensions (then -1) that reproduces every module's factorisation, ``decompose_both`` is set when some
  w1 is factorised, and each module's r is its factor rank (or, with both factors whole, the smallest r
  PEFT keeps whole, with alpha = scale · r). A module PEFT cannot rebuild that way is refused.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter, LoraModule
from loratool.arch.clip import canonical_clip_path
from loratool.errors import FormatError
from loratool.formats import kohya
from loratool.formats import peft_config as pc

if TYPE_CHECKING:  # torch stays unimported for header-only info
    import torch

TYPES = {"LOHA": "loha", "LOKR": "lokr"}
PEFT_TYPE = {v: k for k, v in TYPES.items()}
SUFFIXES = {s for s, (kind, _) in kohya.SUFFIXES.items() if kind in ("loha", "lokr")}
DEFAULTS = {"LOHA": {"r": 8, "alpha": 8, "use_effective_conv2d": False, "rank_dropout": 0.0, "module_dropout": 0.0,
                     "init_weights": True},
            "LOKR": {"r": 8, "alpha": 8, "use_effective_conv2d": False, "decompose_both": False,
                     "decompose_factor": -1, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True,
                     "rank_dropout_scale": False}}
SHARED = {"peft_type": None, "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
          "target_modules": None, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
          "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m ≤ n, m·n = dimension: LyCORIS' / PEFT's ``factorization`` (``peft.tuners.lokr.layer``)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


# ---------------------------------------------------------------- reading


def resolve(config: dict[str, Any], name: str, where: str) -> tuple[int, float]:
    """(r, alpha) PEFT gives the module ``name`` (``LycorisTuner._create_and_replace``)."""
    try:
        r, alpha = config.get("r", 8), config.get("alpha", 8)
        k = pc.pattern_key(config.get("rank_pattern") or {}, name)
        if k is not None:
            r = config["rank_pattern"][k]
        k = pc.pattern_key(config.get("alpha_pattern") or {}, name)
        if k is not None:
            alpha = config["alpha_pattern"][k]
        r, alpha = int(r), float(alpha)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise FormatError(f"{where}: invalid r / alpha / pattern in the adapter config ({exc})") from None
    if r <= 0:
        raise FormatError(f"{where}: module {name!r} gets r={r}; PEFT needs r > 0")
    return r, alpha


def read(src, component: str, config: dict[str, Any] | None, tensors: dict[str, torch.Tensor], where: str,
         kind: str | None = None) -> Adapter:
    """A PEFT LoHa / LoKr adapter (keys already without the ``base_model.model.`` prefix); ``config`` None:
    none stored, alpha = r (scale 1)."""
    kind = kind or TYPES[str(config.get("peft_type")).upper()]
    from loratool.formats.peft import is_lora_like

    groups: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        path, dot, suffix = key.rpartition(".")
        if dot and suffix in SUFFIXES and kohya.SUFFIXES[suffix][0] == kind:
            groups.setdefault(path, {})[suffix] = tensor
        elif is_lora_like(key):
            raise FormatError(f"{where}: key {key!r} is not a tensor of a PEFT {PEFT_TYPE[kind]} adapter")
        else:
            whole[key] = tensor  # modules_to_save
    adapter = Adapter(source_format="peft")
    for name, tensor in whole.items():
        adapter.extras[(component, name)] = tensor
    for fpath, parts in groups.items():
        module = kohya.build_module(f"{where}: {fpath}", component, canonical_clip_path(component, fpath), parts)
        if config is None:
            module.alpha = float(module.rank) if module.rank else None
            module.hints["alpha_assumed"] = True
        else:
            r, alpha = resolve(config, fpath, where)
            if module.rank == 0:  # LoKr, both factors whole: PEFT still scales by alpha / r
                module.declared_rank = r
            elif module.rank != r:
                raise FormatError(f"{where}: module {fpath!r} has rank {module.rank} but the config gives r={r}")
            module.alpha = alpha
        if module.path != fpath:
            module.hints["file_path"] = fpath
        adapter.add(module)
    if config is not None:
        adapter.config[component] = dict(config)
    return adapter


def read_diffusers(src, where: str) -> Adapter | None:
    """A diffusers file holding LoKr modules (``<component>.<path>.lokr_w1``…, LoKrConfig per component in
    ``lora_adapter_metadata``), or None when it holds none. Without a config diffusers takes alpha = r
    (``_create_lokr_config``: the checkpoint's alpha is expected baked into the factors): so does this."""
    from loratool.formats import diffusers

    keys = src.keys
    if not any(".lokr_" in k for k in keys):
        return None
    by_comp: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in src.tensors.items():
        comp, dot, rest = key.partition(".")
        if not dot or comp not in diffusers.PREFIXES:
            raise FormatError(f"{where}: key {key!r} has no diffusers component prefix")
        by_comp.setdefault(comp, {})[rest] = tensor
    configs = diffusers.parse_metadata(src.metadata, list(by_comp), where)
    adapter = Adapter(source_format="diffusers")
    for comp, tensors in by_comp.items():
        part = read(src, comp, configs.get(comp), tensors, where, kind="lokr")
        for m in part:
            adapter.add(m)
        adapter.config.update(part.config)
    adapter.metadata = {k: v for k, v in src.metadata.items() if k not in (diffusers.METADATA_KEY, "format")}
    return adapter


# ---------------------------------------------------------------- writing


# Kernel areas a flattened conv factor may hide (w2b [r, in_n·k·k] does not say k): 1×1 … 7×7.
KERNEL_AREAS = (1, 9, 25, 49, 4, 16, 36)


def _dims(m: LoraModule) -> list[tuple[int, int, int, int]]:
    """The (out_l, in_m, out_k, in_n) a LoKr module's Kronecker factors may stand for (one, unless a flattened
    conv factor leaves its kernel open)."""
    t = m.tensors
    out_l, in_m = t["w1"].shape[:2] if "w1" in t else (t["w1a"].shape[0], t["w1b"].shape[1])
    if "w2" in t:
        out_k, flat = t["w2"].shape[0], [int(t["w2"].shape[1])]
    elif "t2" in t:
        out_k, flat = t["w2a"].shape[0], [int(t["w2b"].shape[1])]
    else:
        out_k, width = t["w2a"].shape[0], int(t["w2b"].shape[1])
        flat = [width // a for a in KERNEL_AREAS if width % a == 0]
    return [(int(out_l), int(in_m), int(out_k), n) for n in flat]


def _lokr_rank(m: LoraModule, dims, decompose_both: bool, where: str) -> int:
    out_l, in_m, out_k, in_n = dims
    t = m.tensors
    ranks = {int(t[b].shape[0]) for b in ("w1b", "w2b") if b in t}
    if len(ranks) > 1:
        raise FormatError(f"{where}: Kronecker factors of ranks {sorted(ranks)}; PEFT gives both one r")
    w1_cap, w2_cap = max(out_l, in_m) / 2, max(out_k, in_n) / 2
    if ranks:
        r = ranks.pop()
    else:  # both whole: the smallest r PEFT keeps whole (or the one the config declared)
        r = m.declared_rank or math.ceil(max(w2_cap, w1_cap if decompose_both else 0, 1))
    fits = (("w2" in t) == (r >= w2_cap)) and (("w1" in t) == (not (decompose_both and r < w1_cap)))
    if not fits:
        raise FormatError(f"{where}: PEFT would build this LoKr's factors differently at r={r} "
                          f"(w1 {'whole' if 'w1' in t else 'factorised'}, w2 {'whole' if 'w2' in t else 'factorised'})")
    return r


def _factored_as(dims: tuple[int, int, int, int], f: int) -> bool:
    ol, im, ok, inn = dims
    return factorization(ol * ok, f) == (ol, ok) and factorization(im * inn, f) == (im, inn)


def _decompose_factor(options: list[list[tuple[int, int, int, int]]], where: str) -> tuple[int, list]:
    """(decompose_factor, each module's dims under it): the first stored left dimension (then -1) under which
    PEFT's factorization gives every module its stored factor shapes."""
    for f in [*sorted({d[0] for opts in options for d in opts}), -1]:
        chosen = [next((d for d in opts if _factored_as(d, f)), None) for opts in options]
        if all(c is not None for c in chosen):
            return f, chosen
    raise FormatError(f"{where}: no decompose_factor makes PEFT factor these LoKr modules as stored")


def config_for(modules: list[LoraModule], names: list[str], original: dict[str, Any] | None, where: str):
    """The PEFT config (dict) under which PEFT rebuilds ``modules`` (LoHa or LoKr, one kind) exactly."""
    kinds = {m.kind for m in modules}
    if len(kinds) != 1:
        raise FormatError(f"{where}: one PEFT adapter holds one kind; these modules are {', '.join(sorted(kinds))}")
    kind = kinds.pop()
    peft_type = PEFT_TYPE[kind]
    for m in modules:
        if m.magnitude is not None or m.rslora:
            raise FormatError(f"{where}: {m.component}:{m.path}: PEFT {peft_type} has no DoRA / rsLoRA")
    core = "t1" if kind == "loha" else "t2"
    tucker = {core in m.tensors for m in modules if m.layer == "conv" and _kernel(m) != 1}
    if len(tucker) > 1:
        raise FormatError(f"{where}: some conv modules have Tucker cores and some not; PEFT's "
                          f"use_effective_conv2d applies to all")
    cfg: dict[str, Any] = {**SHARED, **DEFAULTS[peft_type], **{k: v for k, v in (original or {}).items()
                                                              if k not in ("r", "alpha")}}
    cfg["peft_type"] = peft_type
    cfg["use_effective_conv2d"] = bool(tucker and tucker.pop())
    if kind == "loha":
        ranks = [m.rank for m in modules]
    else:
        cfg["decompose_both"] = any("w1a" in m.tensors for m in modules)
        cfg["decompose_factor"], dims = _decompose_factor([_dims(m) for m in modules], where)
        ranks = [_lokr_rank(m, d, cfg["decompose_both"], f"{where}: {m.component}:{m.path}")
                 for m, d in zip(modules, dims)]
    alphas = [pc.number(m.scale * r) for m, r in zip(modules, ranks)]
    r = Counter(ranks).most_common(1)[0][0]
    alpha = Counter(alphas).most_common(1)[0][0]
    cfg.update(r=int(r), alpha=alpha, target_modules=sorted(set(names)),
               rank_pattern={f"^{n}": int(k) for n, k in zip(names, ranks) if k != r},
               alpha_pattern={f"^{n}": a for n, a in zip(names, alphas) if a != alpha})
    return cfg


def _kernel(m: LoraModule) -> int:
    return math.prod(m.weight_shape[2:]) if len(m.weight_shape) > 2 else 1


def module_tensors(m: LoraModule, name: str) -> dict[str, torch.Tensor]:
    """PEFT keys (no prefix) of one LoHa / LoKr module: LyCORIS' names, Tucker ``a`` factors as PEFT stores them."""
    return {f"{name}.{suffix}": t for suffix, t in kohya.module_tensors(_unscaled(m), name).items()
            if suffix != "alpha"}


def _unscaled(m: LoraModule) -> LoraModule:
    """The module without alpha / magnitude: PEFT keeps the scale in its config, not beside the tensors."""
    from dataclasses import replace

    return replace(m, alpha=None, magnitude=None, declared_rank=None, hints={})


def component_payload(adapter: Adapter, component: str, where: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors without prefix, adapter_config dict) of one component's LoHa / LoKr modules."""
    modules = adapter.by_component(component)
    names = [m.hints.get("file_path", m.path) for m in modules]
    original = adapter.config.get(component) if adapter.source_format in ("peft", "diffusers") else None
    config = config_for(modules, names, original, where)
    tensors: dict[str, torch.Tensor] = {}
    for m, name in zip(modules, names):
        tensors.update(module_tensors(m, name))
    for (comp, name), tensor in adapter.extras.items():
        if comp == component:
            tensors[name] = tensor
    return tensors, config


def holds(adapter: Adapter, component: str) -> bool:
    """Whether a component's modules are LoHa / LoKr (written by this module)."""
    return any(m.kind in PEFT_TYPE for m in adapter.by_component(component))
