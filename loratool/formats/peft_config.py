"""PEFT ``LoraConfig`` semantics shared by the PEFT and diffusers layouts.

Reading: every module gets its own rank check, alpha and rsLoRA flag, resolved exactly as PEFT
does when it builds the model (``peft.tuners.lora.model.LoraModel._create_and_replace``):

* ``r = rank_pattern[k]`` and ``alpha = alpha_pattern[k]`` for the FIRST key ``k`` (dict order)
  with ``re.match(rf"(.*\\.)?({k})$", module_name)`` (``peft.utils.other.get_pattern_key``),
  otherwise the config's ``r`` / ``lora_alpha``;
* ``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``;
* ``fan_in_fan_out`` per module from what the base layer is (:func:`fan_in_fan_out`).

Writing: :func:`build_config` re-expresses the modules' scales as one config: ``r`` and
``lora_alpha`` are the most common values, modules that differ go into ``rank_pattern`` /
``alpha_pattern`` under their full path. ``use_rslora`` is written only when every module is
rsLoRA; otherwise an rsLoRA module's alpha becomes ``alpha·√r / r·r = alpha·√r`` so that
``alpha' / r == alpha / √r``. When the original config (kept in ``Adapter.config``) still gives
every module exactly its rank and alpha, its ``r`` / ``lora_alpha`` / patterns are kept verbatim.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loratool.adapter import LoraModule
from loratool.arch.layer_kinds import conv1d_naming, conv1d_paths, is_conv1d
from loratool.errors import FormatError
from loratool.io.model_config import CONFIG_NAME, model_type

# Fields build_config always recomputes from the modules (the modules are the truth).
DERIVED_FIELDS = (
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias",
    "fan_in_fan_out", "target_modules",
)

DEFAULT_CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "inference_mode": True,
    "init_lora_weights": True,
    "lora_dropout": 0.0,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
}


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first pattern key that PEFT's ``get_pattern_key`` would pick for ``name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def resolve(config: dict[str, Any], name: str, where: str = "") -> tuple[int, float, bool]:
    """(r, alpha, use_rslora) PEFT gives the module ``name`` under ``config``."""
    try:
        r = config.get("r", 8)
        alpha = config.get("lora_alpha", 8)
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        k = pattern_key(rank_pattern, name)
        if k is not None:
            r = rank_pattern[k]
        k = pattern_key(alpha_pattern, name)
        if k is not None:
            alpha = alpha_pattern[k]
        return int(r), float(alpha), bool(config.get("use_rslora", False))
    except (TypeError, ValueError, re.error) as exc:
        raise FormatError(f"{where}: invalid r / lora_alpha / pattern in the LoRA config ({exc})") from None


def _base_model_type(base: Any) -> str | None:
    """transformers ``model_type`` of ``base_model_name_or_path``: its ``config.json`` when it is a local
    folder, or a hub id whose config is in the local Hugging Face cache (never a download)."""
    if not isinstance(base, str) or not base.strip():
        return None
    if Path(base).is_dir():
        return model_type(Path(base))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, CONFIG_NAME)
    except (ImportError, ValueError, OSError):
        return None
    return model_type(Path(cached).parent) if isinstance(cached, str) else None


def fan_in_fan_out(config: dict[str, Any], names: list[str]) -> dict[str, bool]:
    """Per module, whether its base weight is stored [in, out], as PEFT decides it: when it injects a
    layer it sets ``fan_in_fan_out`` from the layer's class (transformers ``Conv1D`` → True,
    ``nn.Linear`` → False; ``peft.tuners.lora.layer.dispatch_default``), overwriting the config's
    flag, so a saved config holds the value of the last module injected, not of each one.

    Decided from what the config says the model is (``auto_mapping.parent_library`` — written when
    ``task_type`` is None —, or ``base_model_name_or_path``'s ``config.json`` when local or cached)
    and its ``Conv1D`` layers (:mod:`loratool.arch.layer_kinds`). Unnamed model with the flag True:
    it has Conv1D layers, which the module names identify (GPT-2 naming); otherwise the flag is all
    there is. A merge settles non-square weights from the base's stored shapes
    (:mod:`loratool.ops.orientation`).
    """
    auto = config.get("auto_mapping")
    library = auto.get("parent_library") if isinstance(auto, dict) else None
    conv1d = conv1d_paths(parent_library=library) if isinstance(library, str) else None
    if conv1d is None:
        base_type = _base_model_type(config.get("base_model_name_or_path"))
        conv1d = conv1d_paths(model_type=base_type) if base_type else None
    flag = bool(config.get("fan_in_fan_out", False))
    if conv1d is None and flag:
        conv1d = conv1d_naming(names) or None
    if conv1d is None:
        return dict.fromkeys(names, flag)
    return {name: is_conv1d(conv1d, name) for name in names}


def targets(target_modules: Any, name: str) -> bool:
    """Whether PEFT's ``target_modules`` selects the module ``name`` (str = full regex match)."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        try:
            return re.fullmatch(target_modules, name) is not None
        except re.error:
            return False
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def number(x: float) -> int | float:
    """JSON-friendly: integral floats become ints (how PEFT configs usually store them)."""
    return int(x) if float(x).is_integer() else float(x)


def peft_alpha(module: LoraModule, rslora: bool) -> float:
    """The ``lora_alpha`` that reproduces ``module.scale`` with PEFT's rule (rsLoRA or not)."""
    r = module.rank
    alpha = float(r) if module.alpha is None else float(module.alpha)
    if module.rslora == rslora:
        return alpha
    if module.rslora:  # alpha/√r == alpha'/r
        return alpha * math.sqrt(r)
    return alpha / math.sqrt(r)  # never reached from build_config (rslora only when all are)


def _pattern_name(path: str, others: list[str]) -> str:
    """A pattern key matching ``path`` and none of ``others`` (anchor with ``^`` when needed)."""
    if any(o != path and o.endswith("." + path) for o in others):
        return "^" + path
    return path


def _most_common(values: list) -> Any:
    # Counter.most_common keeps first-seen order among ties: deterministic.
    return Counter(values).most_common(1)[0][0]


def build_config(
    modules: list[LoraModule],
    names: list[str],
    original: dict[str, Any] | None = None,
    config_names: list[str] | None = None,
) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict for ``modules`` named ``names`` (their paths in the model).

    ``config_names`` (default ``names``) are the names used in ``target_modules`` and pattern
    keys; the diffusers writer passes text-encoder names without ``text_model.`` so they
    match both flattened and nested CLIP models.
    """
    config_names = config_names or names
    original = dict(original or {})
    out: dict[str, Any] = {**DEFAULT_CONFIG, **original}
    rslora = all(m.rslora for m in modules)
    ranks = [m.rank for m in modules]
    alphas = [number(peft_alpha(m, rslora)) for m in modules]

    if _original_fits(original, modules, names, alphas, rslora):
        for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            out[key] = original.get(key, DEFAULT_CONFIG.get(key))
        out["rank_pattern"] = dict(original.get("rank_pattern") or {})
        out["alpha_pattern"] = dict(original.get("alpha_pattern") or {})
    else:
        r = _most_common(ranks)
        alpha = _most_common(alphas)
        out["r"] = int(r)
        out["lora_alpha"] = alpha
        out["rank_pattern"] = {
            _pattern_name(n, config_names): int(k) for n, k in zip(config_names, ranks) if k != r
        }
        out["alpha_pattern"] = {
            _pattern_name(n, config_names): a for n, a in zip(config_names, alphas) if a != alpha
        }
    out["use_rslora"] = rslora
    out["use_dora"] = any(m.magnitude is not None for m in modules)
    out["lora_bias"] = any("bias" in m.tensors for m in modules)
    out["fan_in_fan_out"] = any(m.fan_in_fan_out for m in modules)
    orig_targets = original.get("target_modules")
    if orig_targets and all(targets(orig_targets, n) for n in names):
        out["target_modules"] = orig_targets
    else:
        # Exact paths: the original's layer filters could now exclude some of them.
        out["target_modules"] = sorted(set(config_names))
        out.update(layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    if out.get("peft_type") in (None, ""):
        out["peft_type"] = "LORA"
    return out


def _original_fits(original: dict[str, Any], modules: list[LoraModule], names: list[str], alphas: list,
                   rslora: bool) -> bool:
    if "r" not in original or "lora_alpha" not in original:
        return False
    if bool(original.get("use_rslora", False)) != rslora:
        return False
    try:
        for m, name, alpha in zip(modules, names, alphas):
            r, a, _ = resolve(original, name)
            if r != m.rank or a != float(alpha):
                return False
    except FormatError:
        return False
    return True
