"""diffusers LoRA files (``pytorch_lora_weights.safetensors``): one file, keys behind a
pipeline-component prefix (``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.``,
``text_encoder_3.``, Anima's ``text_conditioner.``).

Three key styles are read (``C`` = component, A = down, B = up):

* current PEFT style: ``C.<path>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_B.bias``,
  ``.lora_magnitude_vector``, ``.lora_embedding_A`` / ``_B``) — what diffusers writes today;
* diffusers style: ``C.<path>.lora.down.weight`` / ``.lora.up.weight`` (U-Net), text encoders
  ``C.<path>.lora_linear_layer.down.weight`` / ``.up.weight``;
* old attention-processor style: ``unet.<attn>.processor.to_q_lora.down.weight`` ->
  ``<attn>.to_q`` (``to_out_lora`` -> ``to_out.0``); text encoders ``<attn>.to_q_lora`` ->
  ``<attn>.q_proj`` (``to_out_lora`` -> ``out_proj``).

Alpha: the header key ``lora_adapter_metadata`` holds each component's ``LoraConfig`` as JSON
with component-prefixed keys (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``...,
diffusers' ``_pack_dict_with_prefix``); it is resolved per module exactly like a PEFT config
(:mod:`loratool.formats.peft_config`). Without it, ``C.<path>.alpha`` tensors give alpha; with
neither alpha = r (scale 1, ``hints["alpha_assumed"]``), which is what diffusers assumes.

Canonical names: ``to_out`` becomes ``to_out.0``; flattened CLIP text-encoder names
(transformers 5 ``CLIPTextModel``: ``encoder.layers.0...``) get the ``text_model.`` prefix
of the canonical HF naming, with ``hints["file_path"]`` remembering the spelling for writers.

Writing uses the current PEFT style plus a ``lora_adapter_metadata`` header built by
:func:`loratool.formats.peft_config.build_config`, so per-module alphas survive. Text-encoder
names in that config omit ``text_model.`` so they match nested and flattened CLIP models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter
from loratool.arch.clip import CLIP_COMPONENTS, TEXT_MODEL, canonical_clip_path
from loratool.errors import FormatError
from loratool.formats import ReadOptions, WriteOptions, lora_diffusion, peft_lycoris
from loratool.formats import peft as peft_layout
from loratool.formats import peft_config as pc
from loratool.formats.outputs import check_target
from loratool.header_only import torch
from loratool.io.atomic import atomic_path

NAME = "diffusers"
PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "text_conditioner")
METADATA_KEY = "lora_adapter_metadata"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# diffusers-style suffixes (before PEFT's lora_A / lora_B existed in files)
OLD_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}
PROCESSOR_RE = re.compile(r"^(?P<attn>.+?)\.(?:processor\.)?(?P<proj>[A-Za-z0-9_]+)_lora\.(?P<slot>down|up)\.weight$")
TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _component_of(key: str) -> str | None:
    head = key.split(".", 1)[0]
    return head if head in PREFIXES and "." in key else None


def detect(src) -> bool:
    keys = src.keys
    return bool(keys) and all(_component_of(k) is not None for k in keys)


# ---------------------------------------------------------------- reading


def _canonical(component: str, path: str) -> str:
    path = path.replace(".processor.", ".")
    if component not in CLIP_COMPONENTS and (path == "to_out" or path.endswith(".to_out")) \
            and not _linear_to_out(path):
        path += ".0"  # diffusers Attention.to_out is a ModuleList; its Linear is .0
    return canonical_clip_path(component, path)


def _linear_to_out(path: str) -> bool:
    """A ``to_out`` that is itself a Linear (FLUX.2 single blocks, HiDream): a DiT family's module."""
    from loratool.arch import dit

    return dit.diffusers_module(path)


def _parse(component: str, rest: str) -> tuple[str, str, str | None] | None:
    """(file path, slot, layer override) of one key without its component prefix."""
    parsed = peft_layout.split_key(rest)
    if parsed is not None:
        return parsed
    for suffix, slot in OLD_SUFFIXES.items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], slot, None
    m = PROCESSOR_RE.match(rest)
    if m:
        proj = m["proj"]
        if component in CLIP_COMPONENTS:
            proj = TEXT_PROJ.get(proj, proj)
        return f"{m['attn']}.{proj}", m["slot"], None
    return None


def _alpha_stem(component: str, stem: str) -> str:
    """The module path an ``<stem>.alpha`` key belongs to (any of the three styles)."""
    for tail in (".lora_linear_layer", ".lora", ".lora_A", ".lora_A.weight", ".lora.down.weight",
                 ".lora_linear_layer.down.weight"):
        if stem.endswith(tail):
            return stem[: -len(tail)]
    m = re.match(r"^(?P<attn>.+?)\.(?:processor\.)?(?P<proj>[A-Za-z0-9_]+)_lora$", stem)
    if m:
        proj = TEXT_PROJ.get(m["proj"], m["proj"]) if component in CLIP_COMPONENTS else m["proj"]
        return f"{m['attn']}.{proj}"
    return stem


def parse_metadata(metadata: dict[str, str], components: list[str], where: str) -> dict[str, dict[str, Any]]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{where}: header {METADATA_KEY!r} is not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: header {METADATA_KEY!r} is not a JSON object")
    out: dict[str, dict[str, Any]] = {}
    for comp in components:
        sub = {k[len(comp) + 1:]: v for k, v in obj.items() if k.startswith(comp + ".")}
        if sub:
            out[comp] = sub
    if not out and len(components) == 1 and "r" in obj:
        out[components[0]] = dict(obj)  # a model-level save_lora_adapter config, unprefixed
    return out


def read(src, opts: ReadOptions | None = None) -> Adapter:
    from loratool.formats import dialects

    dialect = dialects.detect(src)
    if dialect is not None:  # a trainer's variant of this layout (formats.dialects)
        from loratool.formats import dialect_read

        return dialect_read.read(src, opts, dialect)
    where = str(src.path)
    lokr = peft_lycoris.read_diffusers(src, where)  # LoKr adapters (diffusers loads them through LoKrConfig)
    if lokr is not None:
        return lokr
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    file_names: dict[tuple[str, str], str] = {}
    alphas: dict[tuple[str, str], torch.Tensor] = {}
    adapter = Adapter(source_format=NAME)
    for key, tensor in src.tensors.items():
        comp = _component_of(key)
        if comp is None:
            raise FormatError(f"{where}: key {key!r} has no diffusers component prefix ({', '.join(PREFIXES)})")
        rest = key[len(comp) + 1:]
        if rest.endswith(".alpha"):
            alphas[(comp, _canonical(comp, _alpha_stem(comp, rest[: -len('.alpha')])))] = tensor
            continue
        parsed = _parse(comp, rest)
        if parsed is None:
            if peft_layout.is_lora_like(rest) or ".lora" in rest:
                raise FormatError(f"{where}: key {key!r} is not a LoRA tensor in any diffusers key style")
            adapter.extras[(comp, rest)] = tensor
            continue
        fpath, slot, layer = parsed
        fpath = fpath.replace(".processor.", ".")
        path = _canonical(comp, fpath)
        g = groups.setdefault((comp, path), {})
        if slot in g:
            raise FormatError(f"{where}: module {comp}.{path} has its {slot} tensor twice (mixed key styles?)")
        g[slot] = tensor
        if layer is not None:
            g["layer"] = layer
        file_names[(comp, path)] = fpath
    components = list(dict.fromkeys(c for c, _ in groups))
    configs = parse_metadata(src.metadata, components, where)
    for (comp, path), group in groups.items():
        module = peft_layout.build_module(comp, path, group, where)
        fpath = file_names[(comp, path)]
        if fpath != path and fpath.replace(".to_out", ".to_out.0") != path:
            module.hints["file_path"] = fpath
        if comp in configs and (comp, path) in alphas:
            raise FormatError(f"{where}: {comp}.{path} has both an .alpha tensor and a {METADATA_KEY} config")
        if comp in configs:
            peft_layout.apply_config(module, configs[comp], fpath, f"{where} [{comp}]")
        elif (comp, path) in alphas:
            module.alpha = float(alphas.pop((comp, path)).float().item())
        else:
            module.hints["alpha_assumed"] = True
        adapter.add(module)
    if alphas:
        comp, path = next(iter(alphas))
        raise FormatError(f"{where}: alpha for {comp}.{path} has no LoRA factors beside it")
    adapter.config.update(configs)
    adapter.metadata = {k: v for k, v in src.metadata.items() if k not in (METADATA_KEY, "format")}
    return adapter


# ---------------------------------------------------------------- writing


def _config_name(component: str, name: str) -> str:
    if component in CLIP_COMPONENTS and name.startswith(TEXT_MODEL):
        return name[len(TEXT_MODEL):]
    return name


def _json_ready(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def payload(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(prefixed tensors, header metadata) of the whole adapter."""
    from loratool.formats.set_modules import as_whole_weights

    adapter = as_whole_weights(adapter)  # BFL control norms, as diffusers' converter stores them
    lora_diffusion.refuse_embeddings(adapter, "diffusers LoRA")
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    for comp in adapter.components:
        if comp not in PREFIXES:
            raise FormatError(
                f"component {comp!r} has no diffusers prefix; the diffusers layout holds "
                f"{', '.join(PREFIXES)} (use the PEFT layout for a plain model)"
            )
        modules = adapter.by_component(comp)
        if peft_lycoris.holds(adapter, comp):  # LoKr: a LoKrConfig in the header (diffusers _create_lokr_config)
            part, config = _lokr_payload(adapter, comp)
            tensors.update(part)
            packed.update({f"{comp}.{k}": _json_ready(v) for k, v in config.items()})
            continue
        for m in modules:
            peft_layout.check_writable(m, "diffusers")
        peft_layout.check_dora(modules, "diffusers")
        if modules:
            names = [peft_layout.file_path(m) for m in modules]
            original = adapter.config.get(comp) if adapter.source_format in (NAME, peft_layout.NAME) else None
            config = pc.build_config(modules, names, original, [_config_name(comp, n) for n in names])
            for m, name in zip(modules, names):
                for k, v in peft_layout.module_tensors(m, name, bool(config["lora_bias"])).items():
                    tensors[f"{comp}.{k}"] = v
            packed.update({f"{comp}.{k}": _json_ready(v) for k, v in config.items()})
        for (c, name), tensor in adapter.extras.items():
            if c == comp:
                key = f"{comp}.{name}"
                if key in tensors:
                    raise FormatError(f"extra tensor {key!r} collides with a LoRA key")
                tensors[key] = tensor
    metadata = {k: v for k, v in adapter.metadata.items() if isinstance(v, str)}
    metadata["format"] = "pt"
    if packed:
        metadata[METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    return tensors, metadata


def _lokr_payload(adapter: Adapter, comp: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if any(m.kind == "loha" for m in adapter.by_component(comp)):
        raise FormatError(f"{comp}: diffusers 0.42 loads LoKr adapters but not LoHa ones; write it as peft")
    part, config = peft_lycoris.component_payload(adapter, comp, comp)
    return {f"{comp}.{k}": v for k, v in part.items()}, config


def write(adapter: Adapter, out: Path, opts: WriteOptions) -> list[Path]:
    """``out`` ending in ``.safetensors`` is the file; anything else is a folder that gets
    ``pytorch_lora_weights.safetensors`` (what ``load_lora_weights(folder)`` looks for)."""
    out = Path(out)
    check_target(NAME, out, opts.inputs, opts.force)
    if not adapter.components:
        raise FormatError("nothing to write: the adapter has no modules")
    tensors, metadata = payload(adapter)
    metadata.update(opts.extra_metadata)
    data = peft_layout.serialise(tensors, metadata)
    if out.suffix == ".safetensors":
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
        return [out]
    with atomic_path(out, folder=True) as tmp:
        (tmp / WEIGHT_NAME).write_bytes(data)
    return [out / WEIGHT_NAME]
