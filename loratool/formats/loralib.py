"""microsoft/LoRA (``loralib``): ``torch.save(lora.lora_state_dict(model))``.

Keys are ``<path>.lora_A`` / ``<path>.lora_B`` with no ``.weight``; nothing about rank, alpha
or layer class is stored, so an optional sidecar JSON carries it (``<file>.json``, found by
:func:`~loratool.formats.source.open_source`, or ``--config``)::

    {"r": 4, "lora_alpha": 16, "fan_in_fan_out": false,
     "modules": {"h.0.attn.c_attn": {"enable_lora": [true, false, true], "fan_in_fan_out": true,
                                     "r": 4, "lora_alpha": 16, "layer": "linear"}}}

Top-level ``r`` / ``lora_alpha`` / ``fan_in_fan_out`` are defaults for every module; per-module
entries override them. ``layer`` is ``linear`` or ``embedding``. Without a sidecar alpha = r
(scale 1) is assumed and every module is marked ``hints["alpha_assumed"] = True`` so ``info``
can say so.

The three loralib classes, with A = ``lora_A``, B = ``lora_B``, s = lora_alpha / r:

* ``Linear``: A [r, in], B [out, r], ΔW = s · B @ A (transposed with ``fan_in_fan_out``).
* ``Embedding``: A [r, num], B [dim, r], ΔW = s · (B @ A)ᵀ. The shapes look exactly like a
  ``Linear``; the rule: the sidecar's ``"layer"`` wins, otherwise a module whose last name is a
  known embedding name (``wte``, ``embed_tokens``, ... see ``EMBEDDING_NAMES``) is an embedding.
* ``MergedLinear`` (fused qkv, ``enable_lora`` = [True, False, True], G = number of True):
  A [r·G, in], B [out/len·G, r], merged as a grouped conv1d: group g gives
  B[g·out_g:(g+1)·out_g] @ A[g·r:(g+1)·r], written into the g-th enabled row block of the
  [out, in] weight. Read as ONE canonical LoRA of rank r·G with ``down`` = A and a
  block-diagonal ``up`` [out, r·G] (zeros elsewhere); canonical alpha = lora_alpha·G so that
  alpha / (r·G) = lora_alpha / r. ``hints["enable_lora"]`` lets the writer give back the
  exact original A and B. A module whose A has more rows than B has columns is a MergedLinear;
  its ``enable_lora`` must come from the sidecar.

``ConvLoRA`` (loralib's Conv1d/2d/3d) factorises the weight reshaped as [out·k, in·k], which is
no canonical conv LoRA; a sidecar ``"layer": "conv"`` is refused with a clear error.

Writing: ``.pt`` / ``.pth`` / ``.bin`` is a ``torch.save`` of plain tensors, ``.safetensors``
a safetensors file; the sidecar ``<out>.json`` is always written with per-module entries.
Adapters with one component other than ``model`` record ``"component"``; several components
are written with ``<component>.`` key prefixes and recorded as ``"components"``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError, OutputError
from loratool.formats.outputs import check_target
from loratool.io.atomic import atomic_path, check_output

NAME = "loralib"
SUFFIX_A = ".lora_A"
SUFFIX_B = ".lora_B"
PICKLE_OUT = (".pt", ".pth", ".bin")
SIDECAR_LAYERS = ("linear", "embedding", "conv")
EMBEDDING_NAMES = frozenset({
    "wte", "wpe", "embed_tokens", "embed_positions", "embed_in", "tok_embeddings", "word_embeddings",
    "position_embeddings", "token_type_embeddings", "token_embedding", "position_embedding", "embedding",
    "shared", "emb",
})


def detect(src) -> bool:
    keys = src.keys
    return any(k.endswith(SUFFIX_A) for k in keys) and any(k.endswith(SUFFIX_B) for k in keys) and not any(
        k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight")) for k in keys
    )


# ---------------------------------------------------------------- sidecar


class _Sidecar:
    """A validated loralib sidecar: defaults plus per-module entries."""

    def __init__(self, cfg: dict[str, Any] | None, where: str):
        self.present = cfg is not None
        cfg = cfg or {}
        self.where = where
        self.defaults = self._entry(cfg, "top level")
        modules = cfg.get("modules", {})
        if not isinstance(modules, dict):
            raise FormatError(f"{where}: \"modules\" must be an object of module path -> settings")
        self.modules = {}
        for path, entry in modules.items():
            if not isinstance(entry, dict):
                raise FormatError(f"{where}: modules[{path!r}] must be an object")
            self.modules[path] = self._entry(entry, f"modules[{path!r}]")
        comps = cfg.get("components")
        if comps is not None and (not isinstance(comps, list) or not all(isinstance(c, str) for c in comps)):
            raise FormatError(f"{where}: \"components\" must be a list of component names")
        self.components: list[str] | None = comps
        comp = cfg.get("component", "model")
        if not isinstance(comp, str) or not comp:
            raise FormatError(f"{where}: \"component\" must be a component name")
        self.component = comp
        meta = cfg.get("metadata", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{where}: \"metadata\" must map strings to strings")
        self.metadata: dict[str, str] = dict(meta)

    def _entry(self, obj: dict[str, Any], what: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        r = obj.get("r")
        if r is not None:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise FormatError(f"{self.where}: {what}: \"r\" must be a positive integer, got {r!r}")
            out["r"] = r
        alpha = obj.get("lora_alpha")
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
                # 0 is loralib's scaling = 0 / r (what a PEFT lora_alpha=0 module converts to)
                raise FormatError(f"{self.where}: {what}: \"lora_alpha\" must be a number ≥ 0, got {alpha!r}")
            out["lora_alpha"] = alpha
        fifo = obj.get("fan_in_fan_out")
        if fifo is not None:
            if not isinstance(fifo, bool):
                raise FormatError(f"{self.where}: {what}: \"fan_in_fan_out\" must be true or false")
            out["fan_in_fan_out"] = fifo
        enable = obj.get("enable_lora")
        if enable is not None:
            if not isinstance(enable, list) or not enable or not all(isinstance(e, bool) for e in enable):
                raise FormatError(f"{self.where}: {what}: \"enable_lora\" must be a list of true/false")
            if not any(enable):
                raise FormatError(f"{self.where}: {what}: \"enable_lora\" enables no group")
            out["enable_lora"] = enable
        layer = obj.get("layer")
        if layer is not None:
            if layer not in SIDECAR_LAYERS:
                raise FormatError(
                    f"{self.where}: {what}: \"layer\" must be one of {', '.join(SIDECAR_LAYERS)}, got {layer!r}"
                )
            out["layer"] = layer
        return out

    def settings(self, path: str) -> dict[str, Any]:
        merged = {k: v for k, v in self.defaults.items() if k != "enable_lora"}
        merged.update(self.modules.get(path, {}))
        return merged


# ---------------------------------------------------------------- read


def _group_keys(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    pairs: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key in keys:
        if key.endswith(SUFFIX_A):
            pairs.setdefault(key[: -len(SUFFIX_A)], {})["A"] = key
        elif key.endswith(SUFFIX_B):
            pairs.setdefault(key[: -len(SUFFIX_B)], {})["B"] = key
        else:
            other.append(key)
    return pairs, other


def _split_component(key_path: str, side: _Sidecar) -> tuple[str, str]:
    if side.components:
        head, _, rest = key_path.partition(".")
        if head in side.components and rest:
            return head, rest
        raise FormatError(
            f"{side.where}: key {key_path!r} does not start with one of the components "
            f"{', '.join(side.components)} listed in the sidecar"
        )
    return side.component, key_path


def _layer_for(path: str, settings: dict[str, Any]) -> str:
    if "layer" in settings:
        return settings["layer"]
    return "embedding" if path.rsplit(".", 1)[-1] in EMBEDDING_NAMES else "linear"


def _merged_up(b: torch.Tensor, enable: list[bool], r: int) -> torch.Tensor:
    """Block-diagonal [out, r·G] from loralib's [out_g·G, r]: block j goes to the j-th enabled rows."""
    groups = sum(enable)
    out_g = b.shape[0] // groups
    up = torch.zeros((out_g * len(enable), r * groups), dtype=b.dtype, device=b.device)
    j = 0
    for block, on in enumerate(enable):
        if on:
            up[block * out_g:(block + 1) * out_g, j * r:(j + 1) * r] = b[j * out_g:(j + 1) * out_g]
            j += 1
    return up


def _read_module(
    where: str, key_path: str, component: str, path: str, a: torch.Tensor, b: torch.Tensor, side: _Sidecar
) -> LoraModule:
    settings = side.settings(key_path)
    name = f"{where}: module {key_path!r}"
    if a.dim() != 2 or b.dim() != 2:
        raise FormatError(
            f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} must be matrices "
            f"(loralib ConvLoRA is not supported)"
        )
    layer = _layer_for(path, settings)
    if layer == "conv":
        raise FormatError(
            f"{name}: loralib ConvLoRA factorises the weight reshaped as [out·k, in·k], which has no "
            f"canonical conv LoRA form; not supported"
        )
    enable = settings.get("enable_lora")
    r_file = int(b.shape[1])
    if enable is None and a.shape[0] != r_file:
        if r_file and a.shape[0] % r_file == 0:
            raise FormatError(
                f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} is a loralib MergedLinear with "
                f"{a.shape[0] // r_file} LoRA groups; say which groups are enabled with \"enable_lora\" "
                f"for this module in the sidecar JSON (--config)"
            )
        raise FormatError(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank")
    groups = sum(enable) if enable else 1
    if enable is not None:
        if layer != "linear":
            raise FormatError(f"{name}: \"enable_lora\" only applies to linear layers (MergedLinear)")
        if a.shape[0] != r_file * groups or b.shape[0] % groups:
            raise FormatError(
                f"{name}: enable_lora {enable} ({groups} groups) does not fit lora_A {tuple(a.shape)} / "
                f"lora_B {tuple(b.shape)}: expected A [r·{groups}, in] and B [out/{len(enable)}·{groups}, r]"
            )
    r = r_file
    if "r" in settings and settings["r"] != r:
        raise FormatError(f"{name}: the sidecar says r = {settings['r']} but the tensors have rank {r}")
    lora_alpha = settings.get("lora_alpha")
    hints: dict[str, Any] = {}
    if lora_alpha is None:
        hints["alpha_assumed"] = True
    if enable is not None:
        up = _merged_up(b, enable, r)
        hints["enable_lora"] = list(enable)
        if lora_alpha is not None:
            hints["lora_alpha"] = lora_alpha
    else:
        up = b
    alpha = None if lora_alpha is None else float(lora_alpha) * groups
    return LoraModule(
        component=component,
        path=path,
        kind="lora",
        layer=layer,
        tensors={"down": a, "up": up},
        alpha=alpha,
        fan_in_fan_out=bool(settings.get("fan_in_fan_out", False)) and layer == "linear",
        hints=hints,
    )


def read(src, opts=None) -> Adapter:
    where = str(src.path)
    side = _Sidecar(src.config, str(src.config_path or where))
    tensors = src.tensors
    pairs, other = _group_keys(list(tensors))
    unknown = sorted(set(side.modules) - set(pairs))
    if unknown:
        raise FormatError(
            f"{side.where}: the sidecar describes modules the file does not hold: {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else "")
        )
    adapter = Adapter(source_format=NAME, metadata={**side.metadata, **src.metadata})
    for key_path, pair in pairs.items():
        if "A" not in pair or "B" not in pair:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FormatError(f"{where}: module {key_path!r} has no {missing}")
        component, path = _split_component(key_path, side)
        adapter.add(_read_module(where, key_path, component, path, tensors[pair["A"]], tensors[pair["B"]], side))
    for key in other:
        # lora_state_dict(bias="all" | "lora_only") also saves biases: whole tensors, kept as extras.
        component, name = _split_component(key, side)
        adapter.extras[(component, name)] = tensors[key]
    return adapter


# ---------------------------------------------------------------- write


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _merged_factors(module: LoraModule, where: str) -> tuple[torch.Tensor, list[bool], int] | None:
    """loralib's B [out_g·G, r] from a block-diagonal up, or None when up is not that shape."""
    enable = module.hints.get("enable_lora")
    if not enable or module.layer != "linear" or "mid" in module.tensors:
        return None
    up = module.tensors["up"]
    groups = sum(enable)
    rank, out = up.shape[1], up.shape[0]
    if up.dim() != 2 or rank % groups or out % len(enable):
        return None
    r, out_g = rank // groups, out // len(enable)
    blocks = []
    mask = torch.ones_like(up, dtype=torch.bool)
    j = 0
    for block, on in enumerate(enable):
        if on:
            rows, cols = slice(block * out_g, (block + 1) * out_g), slice(j * r, (j + 1) * r)
            blocks.append(up[rows, cols])
            mask[rows, cols] = False
            j += 1
    if torch.count_nonzero(up[mask]):
        return None  # no longer block diagonal (e.g. after a resize): write a plain Linear
    return torch.cat(blocks, 0), list(enable), r


def _check_writable(module: LoraModule, where: str) -> None:
    name = f"{where}: module {module.component}:{module.path}"
    if module.kind != "lora":
        raise FormatError(f"{name}: loralib stores plain LoRA only, not {module.kind}")
    if module.layer == "conv":
        raise FormatError(f"{name}: loralib has no layout for a conv LoRA (its ConvLoRA factorises differently)")
    if "mid" in module.tensors or "bias" in module.tensors:
        raise FormatError(f"{name}: loralib cannot store a Tucker core or a LoRA bias")
    if module.magnitude is not None:
        raise FormatError(f"{name}: loralib cannot store DoRA (magnitude vector)")


def _plain(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage; contiguous copies keep the file to the tensor.
    return t.detach().contiguous().clone()


def write(adapter: Adapter, out: Path, opts) -> list[Path]:
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in PICKLE_OUT and suffix != ".safetensors":
        raise OutputError(f"{out}: a loralib file ends in .pt, .pth, .bin or .safetensors")
    sidecar = out.with_name(out.name + ".json")
    inputs = tuple(getattr(opts, "inputs", ()) or ())
    force = bool(getattr(opts, "force", False))
    check_target(NAME, out, inputs, force)
    check_output(sidecar, inputs, force, folder=False)
    comps = adapter.components
    prefixed = len(comps) > 1

    def key_of(component: str, name: str) -> str:
        return f"{component}.{name}" if prefixed else name

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for module in adapter:
        _check_writable(module, str(out))
        key = key_of(module.component, module.path)
        merged = _merged_factors(module, str(out))
        entry: dict[str, Any] = {}
        if merged is not None:
            b, enable, r = merged
            groups = sum(enable)
            if module.alpha is not None and not module.rslora and module.alpha != 0:
                lora_alpha = module.alpha / groups
            else:
                lora_alpha = module.scale * r
            entry["enable_lora"] = enable
        else:
            b, r = module.tensors["up"], module.rank
            plain_alpha = module.alpha is not None and module.alpha != 0 and not module.rslora
            lora_alpha = module.alpha if plain_alpha else module.scale * r
        entry.update({"r": r, "lora_alpha": _number(lora_alpha), "fan_in_fan_out": module.fan_in_fan_out,
                      "layer": module.layer})
        tensors[key + SUFFIX_A] = _plain(module.tensors["down"])
        tensors[key + SUFFIX_B] = _plain(b)
        entries[key] = entry
    for (component, name), tensor in adapter.extras.items():
        tensors[key_of(component, name)] = _plain(tensor)

    cfg: dict[str, Any] = {}
    if entries:
        cfg["r"] = Counter(e["r"] for e in entries.values()).most_common(1)[0][0]
        cfg["lora_alpha"] = Counter(e["lora_alpha"] for e in entries.values()).most_common(1)[0][0]
    if prefixed:
        cfg["components"] = comps
    elif comps and comps[0] != "model":
        cfg["component"] = comps[0]
    cfg["modules"] = entries
    metadata = dict(adapter.metadata)
    if suffix in PICKLE_OUT and metadata:
        cfg["metadata"] = metadata  # a pickle has no header to keep it in

    with atomic_path(out) as tmp, atomic_path(sidecar) as tmp_json:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
        else:
            torch.save(tensors, tmp)
        tmp_json.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return [out, sidecar]
