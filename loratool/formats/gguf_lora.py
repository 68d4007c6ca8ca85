"""llama.cpp LoRA adapters (``.gguf``), written as llama.cpp's ``convert_lora_to_gguf.py`` writes them.

What that script (ggml-org/llama.cpp) writes for an HF PEFT LoRA of an LLM, and this module too:

* KV metadata: ``general.architecture`` (the GGUF arch of the base's HF architecture, from its
  ``config.json``), ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``
  (float32, one value for the whole adapter), ``general.name``, ``general.quantization_version``;
* per adapted weight ``W`` of GGUF name ``N`` (gguf-py's tensor name map: ``blk.0.attn_q.weight``…):
  ``N.lora_a`` = A [r, in] then ``N.lora_b`` = B [out, r], float32 (the script's default
  ``--outtype f32``), in the adapter's module order; GGUF stores the dims reversed (ggml ``ne``), so
  ``lora_a`` has ne = [in, r] and ``lora_b`` ne = [r, out];
* llama-family bases (``LlamaModel.modify_tensors``, ``undo_permute``): the rows of ``q_proj`` / ``k_proj``
  are permuted for rotary embeddings, ``W.reshape(h, 2, out/h/2, in).swapaxes(1, 2)`` with h the head
  count (the KV head count for k): on a LoRA only B's rows move;
* token embeddings: ``lora_a`` = Aᵀ (``llm_build_inp_embd`` gathers rows of A);
* norm weights saved beside the adapter (mergekit-extract-lora) are written as the base tensor; PEFT's
  copies of unchanged base weights (``*.base_layer.weight``, saved with embedding LoRAs) are not written
  (the base GGUF holds them; the script skips them too); any other whole tensor is an error.

llama.cpp applies scale = alpha / ne₀(lora_b) = alpha / r per tensor (``llama_adapter_lora_weight::
get_scale``; alpha = 0 means scale 1) with the file's one alpha. PEFT files may give each module its own
rank and alpha (``rank_pattern`` / ``alpha_pattern``, rsLoRA): the writer keeps the config's
``lora_alpha`` as the file's alpha (else the most common alpha) and folds each module's own scale s into
its B: B' = B · s · r / alpha (exactly B wherever the module already has that alpha).

Reading inverts the same table (``arch/llm_gguf.json``) back to HF module names; undoing the q/k
permutation needs the base's head counts: a ``config.json`` given as ``--config`` (or ``<file>.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratool.adapter import Adapter, LoraModule
from loratool.arch import load_table
from loratool.errors import FormatError, InputError
from loratool.formats import ReadOptions, WriteOptions
from loratool.io.atomic import atomic_path, check_output

NAME = "gguf"
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"
KEY_ARCH = "general.architecture"
KEY_TYPE = "general.type"
KEY_NAME = "general.name"
KEY_QUANT = "general.quantization_version"
KEY_ADAPTER = "adapter.type"
KEY_ALPHA = "adapter.lora.alpha"


@cache
def table() -> dict[str, Any]:
    return load_table("llm_gguf")


def _patterns(forward: bool) -> list[tuple[re.Pattern, str]]:
    """(regex over a source name with the block index captured, target template) per table entry."""
    out = []
    for hf, gg in table()["modules"].items():
        src, dst = (hf, gg) if forward else (gg, hf)
        out.append((re.compile("^" + re.escape(src).replace(re.escape("{bid}"), r"(\d+)") + "$"), dst))
    return out


def _rename(name: str, forward: bool) -> str | None:
    for pattern, template in _patterns(forward):
        m = pattern.match(name)
        if m is not None:
            return template.replace("{bid}", m.group(1)) if m.groups() else template
    return None


def gguf_name(hf_module: str) -> str | None:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q`` (None when llama.cpp has no such tensor)."""
    return _rename(hf_module, True)


def hf_name(gguf_module: str) -> str | None:
    return _rename(gguf_module, False)


def load_model_config(base: str | os.PathLike | None) -> dict[str, Any] | None:
    """The base model's HF ``config.json`` (a folder holding it, or the file); None when not given."""
    if base is None:
        return None
    path = Path(base)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}: not a readable config.json") from None


def _architecture(config: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    archs = config.get("architectures") or []
    known = table()["architectures"]
    for arch in archs:
        if arch in known:
            return arch, known[arch]
    raise FormatError(f"{where}: base architecture {archs or 'unknown'} has no llama.cpp LoRA mapping here; "
                      f"supported: {', '.join(known)}")


def _heads(config: dict[str, Any], module: str) -> int:
    n_head = int(config["num_attention_heads"])
    n_kv = config.get("num_key_value_heads")
    if module.endswith("k_proj") and n_kv is not None and int(n_kv) != n_head:
        return int(n_kv)
    return n_head


def _permute_rows(b: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """LlamaModel.permute on the rows of B (or its inverse)."""
    rows = b.shape[0]
    if rows % (2 * heads):
        raise FormatError(f"{rows} rows cannot be split into {heads} rotary heads")
    if not inverse:
        return b.reshape(heads, 2, rows // heads // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)
    return b.reshape(heads, rows // heads // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _permuted(module: str, spec: dict[str, Any]) -> bool:
    return bool(spec.get("permute_qk")) and module.endswith((".self_attn.q_proj", ".self_attn.k_proj"))


# ------------------------------------------------------------------ detection and reading
def is_gguf_lora(metadata: dict[str, str]) -> bool:
    return metadata.get(KEY_TYPE) == "adapter" and metadata.get(KEY_ADAPTER) == "lora"


def detect(src) -> bool:
    return src.path.suffix.lower() == ".gguf" and is_gguf_lora(src.metadata)


def open_gguf(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (as stored, numpy order) and string-valued KV metadata of a GGUF LoRA (gguf-py's reader).

    Other GGUF files (models) give their metadata and no tensors."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise InputError(f"{path}: not a readable GGUF file ({exc.__class__.__name__}: {exc})") from None
    metadata: dict[str, str] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except (ValueError, IndexError, TypeError):
            continue
        metadata[name] = value if isinstance(value, str) else json.dumps(value)
    tensors: dict[str, torch.Tensor] = {}
    if not is_gguf_lora(metadata):
        return tensors, metadata  # a model GGUF: no tensor is read (the mapping stays unread)
    for t in reader.tensors:
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                 gguf.GGMLQuantizationType.BF16):
            raise InputError(f"{path}: tensor {t.name} is {t.tensor_type.name}; only F32 / F16 / BF16 LoRA tensors "
                             f"are read")
        data = np.array(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            tensors[t.name] = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensors[t.name] = torch.from_numpy(data.copy())
    return tensors, metadata


def read(src, opts: ReadOptions | None = None) -> Adapter:
    where = str(src.path)
    meta = src.metadata
    alpha = float(meta.get(KEY_ALPHA, "0"))
    config = src.config or {}
    arch = meta.get(KEY_ARCH)
    permutes = any(v["permute_qk"] for v in table()["architectures"].values() if v["gguf_arch"] == arch)
    tensors = src.tensors
    adapter = Adapter(source_format=NAME, family="llm")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, slot in ((SUFFIX_A, "a"), (SUFFIX_B, "b")):
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[slot] = tensor
                break
        else:
            module = hf_name(key.removesuffix(".weight"))
            if module is None:
                raise FormatError(f"{where}: tensor {key!r} is neither a LoRA pair nor a known norm weight")
            adapter.extras[("model", module + ".weight")] = tensor
    for base_name, pair in pairs.items():
        if set(pair) != {"a", "b"}:
            raise FormatError(f"{where}: {base_name} has only lora_{''.join(pair)}")
        module = hf_name(base_name.removesuffix(".weight"))
        if module is None:
            raise FormatError(f"{where}: no HF module name for the llama.cpp tensor {base_name!r}")
        a, b = pair["a"], pair["b"]
        layer = "linear"
        if base_name.startswith("token_embd"):
            a, layer = a.T.contiguous(), "embedding"
        if permutes and module.endswith((".self_attn.q_proj", ".self_attn.k_proj")):
            if "num_attention_heads" not in config:
                raise FormatError(f"{where}: llama.cpp stores {module} with its rows permuted for rotary heads; pass "
                                  f"the base model's config.json with --config to undo it")
            b = _permute_rows(b, _heads(config, module), inverse=True).contiguous()
        r = int(b.shape[1])
        if int(a.shape[0]) != r:
            raise FormatError(f"{where}: {base_name}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not chain")
        adapter.add(LoraModule("model", module, "lora", layer, {"down": a, "up": b},
                               alpha=alpha if alpha else float(r)))
    adapter.metadata = {k: v for k, v in meta.items()}
    adapter.config["model"] = {"peft_type": "LORA", "lora_alpha": alpha if alpha else None,
                               "base_model_name_or_path": config.get("_name_or_path")}
    return adapter


# ------------------------------------------------------------------ writing
def file_alpha(adapter: Adapter) -> float:
    """The adapter's one alpha: the PEFT config's ``lora_alpha``, else the most common module alpha."""
    for cfg in adapter.config.values():
        value = cfg.get("lora_alpha") if isinstance(cfg, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
    counts = Counter(round(m.effective_alpha, 9) for m in adapter)
    return float(counts.most_common(1)[0][0]) if counts else 0.0


def _check(module: LoraModule) -> None:
    name = f"{module.component}:{module.path}"
    if module.kind != "lora" or "mid" in module.tensors:
        raise FormatError(f"{name} is a {module.kind} module; llama.cpp LoRA adapters hold plain LoRA only "
                          f"(convert --as-lora first)")
    if module.magnitude is not None:
        raise FormatError(f"{name} is DoRA; llama.cpp has no DoRA magnitude (convert --as-lora --base MODEL first)")
    if "bias" in module.tensors:
        raise FormatError(f"{name} changes a bias (lora_bias); llama.cpp LoRA adapters cannot hold it")
    if module.layer == "conv" or module.fan_in_fan_out:
        raise FormatError(f"{name}: llama.cpp LoRA adapters hold Linear and embedding modules only")


def _fold(up: torch.Tensor, module: LoraModule, alpha: float) -> torch.Tensor:
    """B' with (alpha / r) · B' @ A == s · B @ A (llama.cpp's scale; alpha 0 means scale 1)."""
    r = module.rank
    llama_scale = alpha / r if alpha else 1.0
    factor = module.scale / llama_scale
    up32 = up.to(torch.float32)
    return up32 if factor == 1.0 else (up.to(torch.float64) * factor).to(torch.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def tensors_for(adapter: Adapter, config: dict[str, Any],
                where: str) -> tuple[str, float, list[tuple[str, np.ndarray]]]:
    """(GGUF arch, file alpha, [(tensor name, data)]) in the order the script writes them."""
    _, spec = _architecture(config, where)
    tied = bool(config.get("tie_word_embeddings", False))
    alpha = file_alpha(adapter)
    out: list[tuple[str, np.ndarray]] = []
    for module in adapter:
        if module.component != "model":
            raise FormatError(f"{module.component}:{module.path}: llama.cpp LoRA adapters are for LLMs (component "
                              f"'model')")
        _check(module)
        name = gguf_name(module.path)
        if name is None:
            raise FormatError(f"model:{module.path}: llama.cpp has no tensor for this module")
        if module.path == "lm_head" and tied:
            raise FormatError("lm_head is in the adapter but the base ties it to the embeddings (llama.cpp ignores "
                              "it: convert_lora_to_gguf.py refuses such adapters)")
        down, up = module.tensors["down"], _fold(module.tensors["up"], module, alpha)
        if _permuted(module.path, spec):
            up = _permute_rows(up, _heads(config, module.path))
        if module.layer == "embedding":
            down = down.T
        out.append((f"{name}.weight{SUFFIX_A}", _np(down)))
        out.append((f"{name}.weight{SUFFIX_B}", _np(up)))
    for (comp, tname), tensor in adapter.extras.items():
        if tname.endswith(".base_layer.weight"):
            continue  # PEFT's copy of an unchanged base weight (save_embedding_layers): the base GGUF has it
        mapped = gguf_name(tname.removesuffix(".weight")) if tname.endswith(".weight") else None
        if mapped is None or not mapped.endswith("_norm") or tensor.dim() != 1:
            raise FormatError(f"{comp}:{tname}: a whole tensor saved beside the adapter; llama.cpp LoRA adapters "
                              f"hold only LoRA pairs and norm weights")
        out.append((f"{mapped}.weight", _np(tensor)))
    return spec["gguf_arch"], alpha, out


def _config_from_adapter(adapter: Adapter) -> dict[str, Any] | None:
    """The base's config.json from the PEFT config's ``base_model_name_or_path``: a local folder, or the
    Hugging Face cache (never the network), as the script looks it up."""
    for cfg in adapter.config.values():
        ref = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
        if not isinstance(ref, str) or not ref:
            continue
        found = load_model_config(ref)
        if found is not None:
            return found
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref, "config.json")
        except (ImportError, ValueError):
            cached = None
        if isinstance(cached, str):
            return load_model_config(cached)
    return None


def write(adapter: Adapter, out: Path, opts: WriteOptions) -> list[Path]:
    import gguf

    out = Path(out)
    check_output(out, opts.inputs, opts.force)
    config = opts.model_config or _config_from_adapter(adapter)
    if config is None:
        raise FormatError("a llama.cpp LoRA names its tensors after the base model's architecture: pass --base "
                          "with the base model's folder (its config.json is enough)")
    arch, alpha, tensors = tensors_for(adapter, config, str(out))
    name = str(config.get("_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1] or out.stem
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_name(name)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tname, data in tensors:
            writer.add_tensor(tname, data, raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return [out]
