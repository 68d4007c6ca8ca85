"""PEFT LoRA folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Keys (``P`` = ``base_model.model.`` for a ``PeftModel``, empty for a model given adapters
directly, as diffusers does), with A = down [r, in(, k, k)], B = up [out, r(, 1, 1)]:

* ``P<path>.lora_A.weight`` / ``P<path>.lora_B.weight`` — Linear, Conv (A is a conv with the
  base kernel, B is 1×1);
* ``P<path>.lora_B.bias`` — ``lora_bias``: Δb = scale · bias;
* ``P<path>.lora_embedding_A`` [r, num] / ``P<path>.lora_embedding_B`` [dim, r] — embeddings,
  ΔW = scale · (B @ A)ᵀ;
* ``P<path>.lora_magnitude_vector`` — DoRA magnitude ([out], conv [1, out, 1, 1]);
* any other key — a whole weight saved beside the adapter (``modules_to_save``, embeddings
  saved with ``save_embedding_layers``): kept in ``Adapter.extras`` and written back unchanged.

Scale per module: see :mod:`loratool.formats.peft_config` (``rank_pattern`` /
``alpha_pattern`` / ``use_rslora`` resolved as PEFT does). ``fan_in_fan_out`` is per module, as
PEFT decides it on load from the layer's class (``Conv1D`` or ``nn.Linear``): the config's flag
only holds the last module's value (:func:`loratool.formats.peft_config.fan_in_fan_out`). The
writer records the transposed modules in the header key ``loratool.fan_in_fan_out`` (JSON list),
which this reader trusts first.

Component: ``model`` unless the header key ``loratool.component`` (written by this module), the
last part of ``base_model_name_or_path`` or the folder's name is a component name (``unet``,
``transformer``, ``text_encoder``...).

Writing: one folder per component (``OUT/`` for one, ``OUT/<component>/`` for several) with
``adapter_config.json`` and ``adapter_model.safetensors`` (header ``{"format": "pt"}``, plus
``loratool.component`` when the component is not ``model``); keys always carry the
``base_model.model.`` prefix so ``PeftModel.from_pretrained`` loads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.arch.clip import canonical_clip_path
from loratool.components import COMPONENTS
from loratool.errors import FormatError
from loratool.formats import ReadOptions, WriteOptions, peft_lycoris
from loratool.formats import peft_config as pc
from loratool.formats.outputs import check_target
from loratool.header_only import torch
from loratool.io.atomic import atomic_path

NAME = "peft"
PREFIX = "base_model.model."
COMPONENT_KEY = "loratool.component"
# Header: JSON list of the module paths whose base weight is stored [in, out] (PEFT's config has one
# flag for all; PEFT itself decides per layer on load, loratool reads it back from here).
FIFO_KEY = "loratool.fan_in_fan_out"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"

# key suffix -> (tensor slot, layer override)
SUFFIXES: dict[str, tuple[str, str | None]] = {
    ".lora_A.weight": ("down", None),
    ".lora_B.weight": ("up", None),
    ".lora_B.bias": ("bias", None),
    ".lora_embedding_A": ("down", "embedding"),
    ".lora_embedding_B": ("up", "embedding"),
    ".lora_magnitude_vector": ("magnitude", None),
    ".lora_magnitude_vector.weight": ("magnitude", None),  # PEFT < 0.12 DoRA checkpoints
}


def split_key(key: str) -> tuple[str, str, str | None] | None:
    """``<path><suffix>`` -> (path, slot, layer override), or None for a non-LoRA key."""
    for suffix, (slot, layer) in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], slot, layer
    return None


def is_lora_like(key: str) -> bool:
    """Keys that look like adapter factors of some kind (so must not pass as whole weights)."""
    last = key.rsplit(".", 2)
    return any(part.startswith(("lora_", "hada_", "lokr_", "oft_", "boft_", "ia3_")) for part in last)


def detect(src) -> bool:
    if src.config is not None and src.folder is not None and (src.folder / CONFIG_NAME).is_file():
        return True
    if src.config is not None and "peft_type" in src.config:
        return True
    keys = src.keys
    return any(k.startswith(PREFIX) and (".lora_A" in k or ".lora_embedding_A" in k) for k in keys)


# ---------------------------------------------------------------- reading


def _component(src, config: dict[str, Any]) -> str:
    comp = src.metadata.get(COMPONENT_KEY)
    if comp in COMPONENTS:
        return comp
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base.strip("/"):
        last = base.rstrip("/").rsplit("/", 1)[-1]
        if last in COMPONENTS:
            return last
    if src.folder is not None and src.folder.name in COMPONENTS:
        return src.folder.name
    return "model"


def group_tensors(tensors: dict[str, torch.Tensor], where: str) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Split PEFT-style keys into {path: {slot: tensor, "layer": ...}} and whole tensors."""
    groups: dict[str, dict[str, Any]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        parsed = split_key(key)
        if parsed is None:
            if is_lora_like(key):
                raise FormatError(f"{where}: key {key!r} is not a PEFT LoRA tensor this tool understands")
            whole[key] = tensor
            continue
        path, slot, layer = parsed
        g = groups.setdefault(path, {})
        if slot in g:
            raise FormatError(f"{where}: module {path!r} has its {slot} tensor twice")
        g[slot] = tensor
        if layer is not None:
            g["layer"] = layer
    return groups, whole


def build_module(component: str, path: str, group: dict[str, Any], where: str) -> LoraModule:
    """A canonical module from one PEFT key group (alpha is set by the caller)."""
    missing = [s for s in ("down", "up") if s not in group]
    if missing:
        have = ", ".join(sorted(k for k in group if k != "layer"))
        raise FormatError(f"{where}: module {path!r} lacks its {' and '.join(missing)} factor (has {have})")
    down, up = group["down"], group["up"]
    layer = group.get("layer") or ("conv" if down.dim() >= 3 else "linear")
    if down.shape[0] != up.shape[1]:
        raise FormatError(
            f"{where}: module {path!r}: lora_A has rank {down.shape[0]} but lora_B has {up.shape[1]} columns"
        )
    tensors = {"down": down, "up": up}
    if "bias" in group:
        tensors["bias"] = group["bias"]
    return LoraModule(component=component, path=path, kind="lora", layer=layer, tensors=tensors,
                      magnitude=group.get("magnitude"))


def apply_config(module: LoraModule, config: dict[str, Any], name: str, where: str,
                 fan_in_fan_out: bool | None = None) -> None:
    """Set alpha / rslora / fan_in_fan_out from a LoraConfig dict, checking the rank.

    ``fan_in_fan_out``: the module's own value (:func:`peft_config.fan_in_fan_out`); None takes the
    config's flag (diffusers components hold no ``Conv1D``)."""
    r, alpha, rslora = pc.resolve(config, name, where)
    if r != module.rank:
        raise FormatError(
            f"{where}: module {name!r} has rank {module.rank} but the config gives r={r} "
            f"(r / rank_pattern do not match the tensors)"
        )
    module.alpha = alpha
    module.rslora = rslora
    flag = bool(config.get("fan_in_fan_out", False)) if fan_in_fan_out is None else fan_in_fan_out
    module.fan_in_fan_out = module.layer == "linear" and flag


def _written_fan_in_fan_out(metadata: dict[str, str], where: str) -> set[str] | None:
    """The module paths this tool recorded as stored [in, out] (header ``loratool.fan_in_fan_out``)."""
    text = metadata.get(FIFO_KEY)
    if text is None:
        return None
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FormatError(f"{where}: header {FIFO_KEY} must be a JSON list of module paths")
    return set(names)


def read(src, opts: ReadOptions | None = None) -> Adapter:
    from loratool.formats import dialects

    dialect = dialects.detect(src)
    if dialect is not None:  # a trainer's variant of this layout (formats.dialects)
        from loratool.formats import dialect_read

        return dialect_read.read(src, opts, dialect)
    where = str(src.folder or src.path)
    config = dict(src.config or {})
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type == "ADALORA":
        from loratool.formats import peft_adalora

        return peft_adalora.read(src, opts)
    if peft_type not in ("LORA", *peft_lycoris.TYPES):
        raise FormatError(f"{where}: PEFT adapter type {peft_type} is not supported (LORA, ADALORA, LOHA, LOKR are)")
    component = _component(src, config)
    tensors = src.tensors
    keys = list(tensors)
    prefixed = bool(keys) and all(k.startswith(PREFIX) for k in keys)
    if not prefixed and any(k.startswith(PREFIX) for k in keys):
        odd = next(k for k in keys if not k.startswith(PREFIX))
        raise FormatError(f"{where}: key {odd!r} lacks the {PREFIX!r} prefix the other keys carry")
    if prefixed:
        tensors = {k[len(PREFIX):]: v for k, v in tensors.items()}
    if peft_type in peft_lycoris.TYPES:
        adapter = peft_lycoris.read(src, component, config, tensors, where)
        adapter.metadata = {k: v for k, v in src.metadata.items() if k not in ("format", COMPONENT_KEY)}
        return adapter
    groups, whole = group_tensors(tensors, where)
    adapter = Adapter(source_format=NAME)
    transposed = _written_fan_in_fan_out(src.metadata, where)
    if transposed is None and config:
        decided = pc.fan_in_fan_out(config, list(groups))
        transposed = {name for name, flag in decided.items() if flag}
    for fpath, group in groups.items():
        path = canonical_clip_path(component, fpath)
        module = build_module(component, path, group, where)
        if path != fpath:
            module.hints["file_path"] = fpath
        if config:
            apply_config(module, config, fpath, where, fpath in (transposed or ()))
        else:
            module.hints["alpha_assumed"] = True  # no adapter_config.json: alpha = r
        adapter.add(module)
    for name, tensor in whole.items():
        adapter.extras[(component, name)] = tensor
    if config:
        adapter.config[component] = config
    adapter.metadata = {k: v for k, v in src.metadata.items() if k not in ("format", COMPONENT_KEY, FIFO_KEY)}
    return adapter


# ---------------------------------------------------------------- writing


def check_writable(module: LoraModule, layout: str) -> None:
    if module.kind != "lora":
        raise FormatError(
            f"{module.component}:{module.path} is a LyCORIS {module.kind} module; the {layout} layout "
            f"holds only plain LoRA (down/up) modules"
        )
    if "mid" in module.tensors:
        raise FormatError(
            f"{module.component}:{module.path} has a Tucker mid core (LoCon); the {layout} layout "
            f"cannot hold it"
        )
    if module.layer == "conv" and module.tensors["down"].dim() < 3:
        raise FormatError(f"{module.component}:{module.path}: conv module with 2-D factors cannot be written")


def file_path(module: LoraModule) -> str:
    """The module path as its source file spelled it (diffusers' flattened CLIP names)."""
    return module.hints.get("file_path", module.path)


def magnitude_for_peft(module: LoraModule) -> torch.Tensor:
    """PEFT stores a conv DoRA magnitude as [1, out, 1, ...], others as [out]."""
    mag = module.magnitude
    assert mag is not None
    if module.layer == "conv":
        shape = (1, mag.numel(), *([1] * (module.tensors["down"].dim() - 2)))
    else:
        shape = (mag.numel(),)
    return mag if tuple(mag.shape) == shape else mag.reshape(shape)


def module_tensors(module: LoraModule, name: str, with_bias: bool) -> dict[str, torch.Tensor]:
    """PEFT keys (no prefix) for one module; a zero lora_B.bias when ``with_bias`` and none is held."""
    t = module.tensors
    out: dict[str, torch.Tensor] = {}
    if module.layer == "embedding":
        out[f"{name}.lora_embedding_A"] = t["down"]
        out[f"{name}.lora_embedding_B"] = t["up"]
    else:
        out[f"{name}.lora_A.weight"] = t["down"]
        out[f"{name}.lora_B.weight"] = t["up"]
    if with_bias and module.layer != "embedding":
        bias = t.get("bias")
        out[f"{name}.lora_B.bias"] = bias if bias is not None else torch.zeros(t["up"].shape[0], dtype=t["up"].dtype)
    elif "bias" in t:
        raise FormatError(f"{module.component}:{module.path}: PEFT has no lora_B.bias for embeddings")
    if module.magnitude is not None:
        out[f"{name}.lora_magnitude_vector"] = magnitude_for_peft(module)
    return out


def check_dora(modules: list[LoraModule], layout: str) -> None:
    dora = [m for m in modules if m.magnitude is not None]
    per_input = next((m for m in dora if m.hints.get("dora_axis") == "in"), None)
    if per_input is not None:
        raise FormatError(
            f"{per_input.component}:{per_input.path}: its DoRA norm is taken per input column (LyCORIS "
            f"wd_on_output=False); {layout} DoRA normalises per output feature only, so it cannot hold this module"
        )
    if dora and len(dora) != len(modules):
        plain = next(m for m in modules if m.magnitude is None)
        raise FormatError(
            f"{plain.component}:{plain.path} is plain LoRA while other modules are DoRA; one {layout} "
            f"config cannot mix them (use_dora applies to every module)"
        )


def component_payload(adapter: Adapter, component: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors without prefix, adapter_config dict) for one component."""
    if peft_lycoris.holds(adapter, component):  # LoHa / LoKr: peft_type LOHA / LOKR
        return peft_lycoris.component_payload(adapter, component, component)
    modules = adapter.by_component(component)
    for m in modules:
        check_writable(m, "PEFT")
    check_dora(modules, "PEFT")
    names = [file_path(m) for m in modules]
    original = adapter.config.get(component) if adapter.source_format in (NAME, "diffusers") else None
    config = pc.build_config(modules, names, original) if modules else {**pc.DEFAULT_CONFIG, **(original or {})}
    tensors: dict[str, torch.Tensor] = {}
    for m, name in zip(modules, names):
        tensors.update(module_tensors(m, name, bool(config.get("lora_bias"))))
    for (comp, name), tensor in adapter.extras.items():
        if comp != component:
            continue
        if name in tensors:
            raise FormatError(f"{component}: extra tensor {name!r} collides with a LoRA key")
        tensors[name] = tensor
    return tensors, config


def serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes; tensors sharing storage (one factor used by two modules) are copied,
    since safetensors refuses shared memory."""
    from safetensors.torch import save as save_safetensors

    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return save_safetensors(out, metadata=metadata)


def write(adapter: Adapter, out: Path, opts: WriteOptions) -> list[Path]:
    from loratool.formats.lora_diffusion import refuse_embeddings
    from loratool.formats.set_modules import as_whole_weights

    adapter = as_whole_weights(adapter)  # a replaced weight is a modules_to_save tensor
    refuse_embeddings(adapter, "PEFT")
    out = Path(out)
    check_target(NAME, out, opts.inputs, opts.force)
    components = adapter.components
    if not components:
        raise FormatError("nothing to write: the adapter has no modules")
    payloads = {c: component_payload(adapter, c) for c in components}
    written: list[Path] = []
    with atomic_path(out, folder=True) as tmp:
        for comp, (tensors, config) in payloads.items():
            folder = tmp if len(components) == 1 else tmp / comp
            folder.mkdir(exist_ok=True)
            # PEFT reads only "format"; the rest keeps provenance (kohya ss_*, extract/resize records).
            metadata = {k: v for k, v in adapter.metadata.items() if isinstance(v, str) and k != COMPONENT_KEY}
            metadata["format"] = "pt"
            if comp != "model":
                metadata[COMPONENT_KEY] = comp
            metadata.pop(FIFO_KEY, None)
            transposed = sorted(file_path(m) for m in adapter.by_component(comp) if m.fan_in_fan_out)
            if transposed:
                metadata[FIFO_KEY] = json.dumps(transposed)
            (folder / WEIGHTS_NAME).write_bytes(serialise({PREFIX + k: v for k, v in tensors.items()}, metadata))
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            final = out if len(components) == 1 else out / comp
            written += [final / WEIGHTS_NAME, final / CONFIG_NAME]
    return written
