"""MLX-LM adapters: a folder with ``adapters.safetensors`` and ``adapter_config.json``.

What ml-explore/mlx-lm writes (``mlx_lm/tuner/trainer.py``: ``tree_flatten(model.trainable_parameters())``;
``mlx_lm/tuner/lora.py`` / ``dora.py``): keys ``<module path>.lora_a`` [in, r], ``<module path>.lora_b``
[r, out] and, for DoRA (``fine_tune_type: "dora"``), ``<module path>.m`` [out]; the config's
``lora_parameters`` holds ``rank``, ``scale`` and ``dropout`` (and optionally ``keys``), ``num_layers``
how many of the last layers were adapted. Module paths are the HF ones (``model.layers.0.self_attn.q_proj``).

Maths (``LoRALinear.fuse``): W' = W + scale · lora_bᵀ @ lora_aᵀ, so down = lora_aᵀ, up = lora_bᵀ and
alpha = scale · r. Embeddings (``LoRAEmbedding.fuse``: W' = W + scale · lora_a @ lora_b, lora_a
[num, r]) take the same transposes as canonical embedding factors; a module is an embedding when its
last path part names one (``embed_tokens``, ``wte``, ``tok_embeddings``). DoRA (``DoRALinear.fuse``):
W' = m / ‖W + ΔW‖_row ⊙ (W + ΔW), PEFT's form.

Writing: one rank and one scale serve every module in MLX, so lower ranks are zero-padded (exact) and
differing scales are folded into lora_b; ``num_layers`` is -1 (mlx-lm: every layer) and ``keys`` lists
each adapted module's path inside its layer, so mlx-lm rebuilds exactly these modules (layers without
tensors in the file keep lora_b = 0: no change).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError
from loratool.formats.outputs import check_target
from loratool.formats.peft import serialise
from loratool.io.atomic import atomic_path

if TYPE_CHECKING:  # torch stays unimported for header-only info
    import torch

NAME = "mlx"
DIALECT = "mlx-lm"
WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
SUFFIXES = {".lora_a": "down", ".lora_b": "up", ".m": "magnitude"}
EMBEDDINGS = ("embed_tokens", "wte", "tok_embeddings", "embeddings", "word_embeddings")
_LAYER = re.compile(r"^(.*?\blayers)\.(\d+)\.(.+)$")


def detect(src) -> bool:
    cfg = src.config or {}
    if isinstance(cfg.get("lora_parameters"), dict):
        return True
    keys = src.keys
    return bool(keys) and all(k.endswith(tuple(SUFFIXES)) for k in keys) and any(k.endswith(".lora_a") for k in keys)


def _parameters(src, where: str) -> tuple[int, float, str]:
    cfg = src.config
    if cfg is None:
        raise FormatError(f"{where}: MLX adapters keep their rank and scale in {CONFIG_NAME}; none found beside "
                          f"the weights (pass --config)")
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict):
        raise FormatError(f"{where}: {CONFIG_NAME} has no lora_parameters object")
    try:
        rank, scale = int(params.get("rank", 8)), float(params.get("scale", 20.0))
    except (TypeError, ValueError):
        raise FormatError(f"{where}: lora_parameters rank / scale are not numbers") from None
    kind = str(cfg.get("fine_tune_type", "lora"))
    if kind not in ("lora", "dora"):
        raise FormatError(f"{where}: fine_tune_type {kind!r} holds no LoRA factors (lora and dora do)")
    return rank, scale, kind


def read(src, opts=None) -> Adapter:
    where = str(src.folder or src.path)
    rank, scale, kind = _parameters(src, where)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in src.tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise FormatError(f"{where}: key {key!r} is not an MLX adapter tensor (lora_a, lora_b, m)")
        groups.setdefault(key[: -len(suffix)], {})[SUFFIXES[suffix]] = tensor
    adapter = Adapter(source_format=NAME, dialect=DIALECT, family="llm")
    for path, g in groups.items():
        if "down" not in g or "up" not in g:
            raise FormatError(f"{where}: module {path!r} lacks its {'lora_a' if 'down' not in g else 'lora_b'}")
        down, up = g["down"], g["up"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != up.shape[0]:
            raise FormatError(f"{where}: module {path!r}: lora_a {tuple(down.shape)} and lora_b {tuple(up.shape)} "
                              f"are not [in, r] and [r, out]")
        if down.shape[1] != rank:
            raise FormatError(f"{where}: module {path!r} has rank {down.shape[1]} but lora_parameters.rank is {rank}")
        if ("magnitude" in g) != (kind == "dora"):
            what = "a DoRA magnitude 'm' without" if kind != "dora" else "no DoRA magnitude 'm' under"
            raise FormatError(f"{where}: module {path!r} has {what} fine_tune_type dora")
        layer = "embedding" if path.rsplit(".", 1)[-1] in EMBEDDINGS else "linear"
        adapter.add(LoraModule(component="model", path=path, kind="lora", layer=layer,
                               tensors={"down": down.T.contiguous(), "up": up.T.contiguous()},
                               alpha=scale * rank, magnitude=g.get("magnitude")))
    adapter.config["model"] = dict(src.config)
    adapter.metadata = {k: v for k, v in src.metadata.items() if k != "format"}
    return adapter


def _key_of(path: str) -> str:
    """The ``keys`` entry mlx-lm matches a module by: its path inside its layer, or the whole path."""
    m = _LAYER.match(path)
    return m.group(3) if m else path


def payload(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch
    modules = list(adapter)
    if not modules:
        raise FormatError("nothing to write: the adapter has no modules")
    if adapter.extras or set(adapter.components) != {"model"}:
        raise FormatError(f"MLX adapters hold LoRA modules of one language model (components: "
                          f"{', '.join(adapter.components)}; whole tensors: {len(adapter.extras)})")
    for m in modules:
        if m.kind != "lora" or "mid" in m.tensors or "bias" in m.tensors or m.fan_in_fan_out or m.layer == "conv":
            raise FormatError(f"{m.component}:{m.path}: MLX holds plain linear / embedding LoRA modules only")
    dora = {m.magnitude is not None for m in modules}
    if len(dora) > 1:
        raise FormatError("some modules are DoRA and some not; MLX's fine_tune_type applies to all")
    rank = max(m.rank for m in modules)
    scale = Counter(m.scale for m in modules).most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        down, up = m.tensors["down"], m.tensors["up"]
        if m.scale != scale:  # one scale for all: the rest folds into lora_b
            up = (up.to(torch.float64) * (m.scale / scale)).to(up.dtype)
        if m.rank < rank:  # one rank for all: zero rows / columns change nothing
            down = torch.cat([down, down.new_zeros(rank - m.rank, down.shape[1])])
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - m.rank)], dim=1)
        tensors[f"{m.path}.lora_a"] = down.T.contiguous()
        tensors[f"{m.path}.lora_b"] = up.T.contiguous()
        if m.magnitude is not None:
            tensors[f"{m.path}.m"] = m.magnitude.reshape(-1).contiguous()
    original = dict(adapter.config.get("model") or {}) if adapter.source_format == NAME else {}
    params = dict(original.get("lora_parameters") or {})
    params.update(rank=int(rank), scale=float(scale), keys=sorted({_key_of(m.path) for m in modules}))
    params.setdefault("dropout", 0.0)
    config = {**original, "fine_tune_type": "dora" if dora.pop() else "lora", "num_layers": -1,
              "lora_parameters": params}
    return tensors, config


def write(adapter: Adapter, out: Path, opts) -> list[Path]:
    out = Path(out)
    check_target(NAME, out, opts.inputs, opts.force)
    tensors, config = payload(adapter)
    with atomic_path(out, folder=True) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(serialise(tensors, {"format": "mlx"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [out / WEIGHTS_NAME, out / CONFIG_NAME]
