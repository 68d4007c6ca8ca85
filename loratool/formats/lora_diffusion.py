"""cloneofsimo's ``lora_diffusion`` files (``save_safeloras`` / ``save_safeloras_with_embeds``, 2022-23).

Keys ``<component>:<i>:up`` [out, r] and ``<component>:<i>:down`` [r, in] (conv: 4-D), header
``<component>`` = JSON list of the target classes, ``<component>:<i>:rank``; textual-inversion
embeddings as ``<token>`` tensors with header ``<token>`` = ``"<embed>"`` (``lora_diffusion/lora.py``).
The factors are saved with lora_diffusion's ``scale`` folded into ``up`` (``realize_as_lora``): alpha = r.

The file names no module: index ``i`` is the i-th Linear / Conv2d lora_diffusion met walking the model
(:data:`ORDER`, ``arch/lora_diffusion_order.json``, generated from diffusers' UNet and transformers' CLIP
by ``scripts/gen_lora_diffusion_order.py``) inside a target class. diffusers < 0.15 registered a
transformer block's feed-forward before its cross-attention (attn1, ff, attn2; since then attn1, attn2,
ff): both orders are tried and the one every stored shape fits is taken. When no order of SD 1.x / 2.x
fits every shape, the module order cannot be known and the file is refused, naming the first index that
does not fit.

``save_lora_weight`` pickles (``lora_weight.pt``, ``lora_weight.text_encoder.pt``: a list [up₀, down₀, up₁,
…]) are read as lora_diffusion's own ``cli_pt_to_safetensors`` converts them: the component from the file
name, the targets its scripts train (:data:`LIST_TARGETS`, the one whose order fits).

Embeddings become whole tensors ``bundle_emb.<token>.string_to_param.*`` of the text encoder: the name
A1111 and kohya-style files bundle embeddings under, so ``--to kohya`` keeps them.
"""

from __future__ import annotations

import json
import re
from itertools import repeat
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays unimported for header-only info
    import torch

from loratool.adapter import Adapter, LoraModule
from loratool.arch import load_table
from loratool.errors import FormatError

NAME = "lora_diffusion"
DIALECT = "cloneofsimo"
EMBED_FLAG = "<embed>"
_KEY = re.compile(r"^(?P<comp>[A-Za-z_][A-Za-z0-9_]*):(?P<i>\d+):(?P<slot>up|down)$")
COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder"}
# lora_diffusion's target classes -> the class name the order table records ("CrossAttention" was
# diffusers' name for Attention before 0.14).
TARGET_ALIASES = {"CrossAttention": "Attention"}
# ``save_lora_weight`` pickles name no targets: the ones its scripts train, newest first (lora.py
# UNET_DEFAULT_TARGET_REPLACE with GEGLU; the first releases' ["CrossAttention", "Attention"];
# TEXT_ENCODER_DEFAULT_TARGET_REPLACE). The one whose module order fits every stored shape is taken.
LIST_TARGETS = {"unet": ({"Attention", "GEGLU"}, {"Attention"}), "text_encoder": ({"CLIPAttention"},)}
LIST_SUFFIXES = (".pt", ".pth")


def _is_embedding(key: str, metadata: dict[str, str]) -> bool:
    return metadata.get(key) == EMBED_FLAG


def _is_list(src) -> bool:
    """A ``save_lora_weight`` pickle: a list [up₀, down₀, up₁, down₁, …] (read with indices as names)."""
    keys = src.keys
    return (src.path.suffix.lower() in LIST_SUFFIXES and len(keys) >= 2 and len(keys) % 2 == 0
            and keys == [str(i) for i in range(len(keys))])


def detect(src) -> bool:
    keys = src.keys
    # its keys hold a ':' (``unet:0:up``); looked for first, at C speed: every file of a folder scan is asked
    return bool(keys) and (_is_list(src) or any(map(str.__contains__, keys, repeat(":"))) and any(
        _KEY.match(k) for k in keys) and all(_KEY.match(k) or _is_embedding(k, src.metadata) for k in keys))



def list_component(file_name: str) -> str:
    """The model a ``.pt`` list is for, as lora_diffusion's ``cli_pt_to_safetensors.convert`` names it: the
    second-to-last dot part (``lora_weight.text_encoder.pt`` -> text_encoder), else unet."""
    parts = file_name.split(".")
    return parts[-2] if len(parts) > 2 else "unet"


def embedding_name(token: str) -> str:
    return f"bundle_emb.{token}.string_to_param.*"


def _old_block_order(paths: list[list]) -> list[list]:
    """diffusers < 0.15 order: inside each transformer block, ff before attn2."""
    out: list[list] = []
    block: list[list] = []
    current = None

    def flush():
        out.extend([e for e in block if ".attn1." in e[0]] + [e for e in block if ".ff." in e[0]]
                   + [e for e in block if ".attn2." in e[0]])

    for entry in paths:
        m = re.match(r"^(.*\.transformer_blocks\.\d+)\.(attn1|attn2|ff)\.", entry[0])
        key = m.group(1) if m else None
        if key != current:
            flush()
            block = []
            current = key
        if key is None:
            out.append(entry)
        else:
            block.append(entry)
    flush()
    return out


def _orders(family: str, component: str, targets: set[str]) -> list[list[list]]:
    table = load_table("lora_diffusion_order")[family][component]
    order = [e for e in table if e[1] in targets]
    variants = [order]
    if component == "unet":
        old = _old_block_order(order)
        if old != order:
            variants.append(old)
    return variants


def _fits(order: list[list], shapes: list[tuple[int, ...]]) -> int | None:
    """None when every stored (out, in) shape fits the order; else the first index that does not."""
    if len(order) != len(shapes):
        return min(len(order), len(shapes))
    for i, (entry, shape) in enumerate(zip(order, shapes)):
        if tuple(entry[2][:2]) != tuple(shape[:2]):
            return i
    return None


def _place(comp: str, candidates: tuple[set[str], ...], shapes: list[tuple[int, ...]],
           where: str) -> tuple[str, list[str]]:
    """(family, module path of each index) for the first target set of ``candidates`` whose order fits."""
    misses = []
    for targets in candidates:
        for family in ("sd1", "sd2"):
            for order in _orders(family, comp, targets):
                bad = _fits(order, shapes)
                if bad is None:
                    return family, [e[0] for e in order]
                misses.append((family, bad, len(order)))
    family, bad, n = max(misses, key=lambda m: m[1])
    got = shapes[bad] if bad < len(shapes) else "none"
    named = " or ".join(str(sorted(t)) for t in candidates)
    raise FormatError(
        f"{where}: the module order of {comp} cannot be known: lora_diffusion numbers modules by walking the "
        f"model, and no SD 1.x / 2.x order for targets {named} fits the file ({len(shapes)} modules; "
        f"closest {family} with {n}, first misfit at {comp}:{bad}, shape {got})"
    )


def _slots(src, where: str) -> tuple[dict[str, dict[int, dict[str, torch.Tensor]]], dict[str, torch.Tensor],
                                     dict[str, tuple[set[str], ...]]]:
    """(component -> index -> {"up", "down"}, embeddings, component -> candidate target sets)."""
    tensors, meta = src.tensors, src.metadata
    slots: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    if _is_list(src):  # as cli_pt_to_safetensors converts it: even entries up, odd ones down
        comp = list_component(src.path.name)
        for key, tensor in tensors.items():
            slots.setdefault(comp, {}).setdefault(int(key) // 2, {})["down" if int(key) % 2 else "up"] = tensor
        return slots, {}, {comp: LIST_TARGETS.get(comp, ())}
    embeddings = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            embeddings[key] = tensor
            continue
        slots.setdefault(m["comp"], {}).setdefault(int(m["i"]), {})[m["slot"]] = tensor
    targets = {}
    for comp in slots:
        try:
            targets[comp] = ({TARGET_ALIASES.get(t, t) for t in json.loads(meta.get(comp, "null"))},)
        except (TypeError, json.JSONDecodeError):
            raise FormatError(f"{where}: header {comp!r} does not hold lora_diffusion's JSON target list") from None
    return slots, embeddings, targets


def read(src, opts=None) -> Adapter:
    where = str(src.path)
    meta = src.metadata
    adapter = Adapter(source_format=NAME, dialect=DIALECT)
    slots, embeddings, targets = _slots(src, where)
    families = set()
    for comp, items in slots.items():
        if comp not in COMPONENTS:
            raise FormatError(f"{where}: lora_diffusion component {comp!r} is not unet or text_encoder")
        if sorted(items) != list(range(len(items))):
            raise FormatError(f"{where}: {comp} indices are not 0..{len(items) - 1}")
        for i, parts in items.items():
            if set(parts) != {"up", "down"}:
                raise FormatError(f"{where}: {comp}:{i} lacks its {'up' if 'up' not in parts else 'down'} factor")
        shapes = [_shape(items[i], f"{where}: {comp}:{i}") for i in range(len(items))]
        family, paths = _place(comp, targets[comp], shapes, where)
        families.add(family)
        for i, path in enumerate(paths):
            # the factors' shapes give the rank: the header's ``<comp>:<i>:rank`` is what lora_diffusion built
            # the layer with, and cli_pt_to_safetensors writes 4 whatever the rank (the layer's weights replace it)
            up, down = items[i]["up"], items[i]["down"]
            layer = "conv" if down.dim() == 4 else "linear"
            adapter.add(LoraModule(component=COMPONENTS[comp], path=path, layer=layer,
                                   tensors={"down": down, "up": up}, alpha=float(down.shape[0]),
                                   hints={"lora_diffusion_index": f"{comp}:{i}"}))
    for token, tensor in embeddings.items():
        adapter.extras[("text_encoder", embedding_name(token))] = tensor.reshape(-1, tensor.shape[-1])
    if len(families) > 1:
        raise FormatError(f"{where}: the components fit different families ({', '.join(sorted(families))})")
    adapter.family = families.pop() if families else None
    adapter.metadata = {k: v for k, v in meta.items() if not (_is_lora_diffusion_key(k) or v == EMBED_FLAG)}
    return adapter


def _is_lora_diffusion_key(key: str) -> bool:
    return key in COMPONENTS or bool(re.match(r"^[A-Za-z_]+:\d+:rank$", key))


def _shape(parts: dict[str, torch.Tensor], where: str) -> tuple[int, ...]:
    up, down = parts["up"], parts["down"]
    if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
        raise FormatError(f"{where}: up {tuple(up.shape)} and down {tuple(down.shape)} disagree on the rank")
    return (int(up.shape[0]), int(down.shape[1]), *down.shape[2:])


def write(adapter: Adapter, out, opts) -> Any:
    raise FormatError("lora_diffusion files are read only (lora_diffusion is no longer maintained): write kohya")


def is_embedding(name: str) -> bool:
    """A bundled textual-inversion embedding (A1111's ``bundle_emb.<token>.string_to_param.*``)."""
    return name.startswith("bundle_emb.")


def refuse_embeddings(adapter: Adapter, layout: str) -> None:
    names = [n for (_, n), _ in adapter.extras.items() if is_embedding(n)]
    if names:
        raise FormatError(f"{layout} files hold no textual-inversion embeddings ({', '.join(names[:3])}); write "
                          f"kohya, which bundles them as A1111 does")
