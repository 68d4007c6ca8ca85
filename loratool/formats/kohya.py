"""kohya / A1111 / ComfyUI layout (one ``.safetensors``), LyCORIS kinds included.

Key = ``head + "." + suffix`` where ``head = prefix + "_" + native module path`` with dots
turned into ``_`` (name restoration: :mod:`loratool.formats.kohya_names`, family tables:
:mod:`loratool.arch`). Suffixes and the canonical tensor each one holds:

=================================================  =========================================
``lora_down.weight`` / ``lora_up.weight``          ``down`` [r, in(, k, k)] / ``up`` [out, r(, 1, 1)]
``lora_mid.weight``                                ``mid`` [r, r, k, k] (LoCon Tucker core)
``hada_w1_a`` ``hada_w1_b`` ``hada_w2_a`` ...      LoHa ``w1a`` [out, r], ``w1b`` [r, in·k·k], ...
``hada_t1`` / ``hada_t2``                          LoHa Tucker cores; then ``hada_w?_a`` is stored
                                                   [r, out] and transposed to canonical [out, r]
``lokr_w1`` / ``lokr_w1_a`` / ``lokr_w1_b``        LoKr first factor, whole or factorised
``lokr_w2`` / ``lokr_w2_a`` / ``lokr_w2_b``        LoKr second factor; with ``lokr_t2`` (Tucker)
                                                   ``lokr_w2_a`` is stored [r, out_k] (transposed)
``diff`` / ``diff_b``                              full weight / bias delta
``alpha``                                          0-dim, weights' dtype; missing or 0 → alpha = r
``dora_scale``                                     DoRA magnitude (see below)
=================================================  =========================================

``dora_scale`` (LyCORIS ``weight_decompose``; ComfyUI reads it the same way): shaped
[out, 1(, 1, 1)] when the norm is taken per output row (LyCORIS ``wd_on_out=True``, the
default) and [1, in(, 1, 1)] when per input column. The merged weight is
``W' = dora_scale · (W + ΔW) / ‖W + ΔW‖`` with the norm over that axis; the reader records
the axis as ``hints["dora_axis"]`` ("out" / "in") and keeps the tensor as stored; the writer
writes that shape for the axis whatever layout the magnitude came from. A strength λ ≠ 1
follows LyCORIS (``hints["dora_strength"] = "lycoris"``, see :mod:`loratool.delta`).

Writing keeps every header entry, updates ``ss_network_dim`` / ``ss_network_alpha`` (a
number, or ``Dynamic`` when modules differ) unless the header's values (with ``conv_dim`` /
``conv_alpha`` from ``ss_network_args`` for k×k convs, as sd-scripts trains them) still give every
module its rank and alpha, and recomputes ``sshs_model_hash`` /
``sshs_legacy_hash`` as sd-scripts does (:mod:`loratool.formats.kohya_hash`). alpha tensors
are written in the dtype they were read in, else in the dtype of the module's factors when
that holds alpha exactly (else float32, else float64).
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
from dataclasses import replace
from itertools import repeat
from pathlib import Path

from loratool import arch
from loratool.adapter import Adapter, LoraModule
from loratool.arch import dit
from loratool.arch.clip import canonical_clip_path
from loratool.arch.layer_kinds import conv_kernel
from loratool.errors import FormatError, UsageError
from loratool.formats import lycoris_kinds
from loratool.formats.kohya_hash import HASH_KEYS, kohya_hashes
from loratool.formats.kohya_names import HeadResolver, to_head
from loratool.formats.outputs import check_target
from loratool.header_only import torch
from loratool.io.atomic import atomic_path
from loratool.shapes import module_shapes, product_shape

NAME = "kohya"

# suffix -> (kind, canonical tensor name)
SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1a"),
    "hada_w1_b": ("loha", "w1b"),
    "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"),
    "hada_t1": ("loha", "t1"),
    "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"),
    "lokr_w1_a": ("lokr", "w1a"),
    "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"),
    "lokr_w2_a": ("lokr", "w2a"),
    "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"),
    "diff_b": ("full", "diff_b"),
    **lycoris_kinds.SUFFIXES,  # OFT / BOFT / GLoRA / norm deltas
}
SHARED = ("alpha", "dora_scale")
SUFFIX_OF = {**{kind_name: suffix for suffix, kind_name in SUFFIXES.items()}, **lycoris_kinds.SUFFIX_OF}
# Canonical tensors a kind cannot do without: alternatives separated by "|".
REQUIRED = {"lora": ("down", "up"), "loha": ("w1a", "w1b", "w2a", "w2b"), "lokr": ("w1|w1a", "w2|w2a"),
            "full": ("diff",), **lycoris_kinds.REQUIRED}
PAIRS = (("w1a", "w1b"), ("w2a", "w2b"))
# Tucker cores whose "a" factor LyCORIS stores as [r, out] instead of [out, r].
TUCKER_A = {"loha": (("t1", "w1a"), ("t2", "w2a")), "lokr": (("t2", "w2a"),)}
LYCORIS_ONLY = ("hada_", "lokr_", "diff", "lora_mid.weight", *lycoris_kinds.SUFFIXES)
_HEAD = re.compile(r"^[A-Za-z0-9_]+$")
# Textual-inversion embeddings bundled in a LoRA file (A1111 extensions-builtin/Lora/networks.py):
# ``bundle_emb.<name>.string_to_param.*`` [vectors, dim]; kept whole, as text-encoder extras.
BUNDLED = "bundle_emb."


@functools.lru_cache(maxsize=1 << 16)  # detection and grouping ask for the same keys several times
def split_key(key: str) -> tuple[str, str] | None:
    """(head, suffix) for a kohya-shaped key, else None."""
    head, dot, suffix = key.partition(".")
    if not dot or not _HEAD.match(head) or (suffix not in SUFFIXES and suffix not in SHARED):
        return None
    return head, suffix


def _shaped(keys: list[str]) -> list[tuple[str, str]]:
    return [s for s in map(split_key, keys) if s is not None]


def claims(keys: list[str]) -> bool:
    """More than half the keys are kohya-shaped and some carry factors (the rest fail loudly on read)."""
    shaped = _shaped(keys)
    return bool(keys) and 2 * len(shaped) > len(keys) and any(s in SUFFIXES for _, s in shaped)


def has_lycoris_keys(keys: list[str]) -> bool:
    suffixes = map(operator.itemgetter(1), _shaped(keys))
    return any(map(str.startswith, suffixes, repeat(LYCORIS_ONLY)))  # C-level: every file of a scan asks


def detect(src) -> bool:
    return claims(src.keys)


# ----------------------------------------------------------------------------------- reading


def _family_for_read(src, opts):
    if opts.family:
        # refused here when the keys are another family's (read_source checks names and shapes too)
        return arch.check_family(opts.family, None, src.keys)
    fam = arch.detect(src.keys, src.metadata, module_shapes(src.shapes()))
    if fam is None and not opts.vocabulary:
        raise FormatError(
            f"{src.path}: cannot tell which model family this kohya file is for "
            f"(no ss_base_model_version / modelspec.architecture, key names not recognised); "
            f"pass --family ({', '.join(arch.families())}) or --base <model>"
        )
    return fam


def _group(src) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for key in src.keys:
        if key.startswith(BUNDLED):
            continue  # a bundled embedding: read as a whole tensor (read)
        parts = split_key(key)
        if parts is None:
            raise FormatError(f"{src.path}: key {key!r} is not a kohya/LyCORIS key this reader knows")
        head, suffix = parts
        groups.setdefault(head, {})[suffix] = key
    return groups


def _dora_axis(scale: torch.Tensor, out_features: int) -> str:
    """ComfyUI's rule: the output axis when dim 0 matches the weight's output features."""
    if scale.dim() <= 1 or (scale.shape[0] == out_features and (out_features != 1 or scale.numel() == 1)):
        return "out"
    return "in"


def build_module(where: str, component: str, path: str, parts: dict[str, torch.Tensor]) -> LoraModule:
    """One canonical module from the tensors of one kohya head ({suffix: tensor})."""
    kinds = {SUFFIXES[s][0] for s in parts if s in SUFFIXES}
    if len(kinds) != 1:
        what = "no factor tensors" if not kinds else f"tensors of several kinds ({', '.join(sorted(kinds))})"
        raise FormatError(f"{where}: {what} ({', '.join(sorted(parts))})")
    kind = kinds.pop()
    tensors = {SUFFIXES[s][1]: t for s, t in parts.items() if s in SUFFIXES}
    kind = lycoris_kinds.refine(kind, tensors)
    for need in REQUIRED[kind]:
        if not any(n in tensors for n in need.split("|")):
            raise FormatError(f"{where}: {kind} module lacks {SUFFIX_OF[(kind, need.split('|')[0])]}")
    for a, b in PAIRS:
        if kind == "lokr" and (a in tensors) != (b in tensors):
            raise FormatError(f"{where}: {SUFFIX_OF[(kind, a)]} and {SUFFIX_OF[(kind, b)]} come in pairs")
    hints: dict = {}
    for core, a in TUCKER_A.get(kind, ()):
        if core in tensors and a in tensors:
            tensors[a] = tensors[a].T.contiguous()
    if kind == "lora":
        down, up = tensors["down"], tensors["up"]
        if up.dim() < 2 or down.shape[0] != up.shape[1]:
            raise FormatError(f"{where}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} "
                              f"disagree on the rank")
        layer = "conv" if down.dim() >= 3 else "linear"  # Conv2d, Conv3d (video patch embedders)
    elif kind == "full":
        layer = "conv" if tensors["diff"].dim() > 2 else "linear"
    elif kind in lycoris_kinds.REQUIRED:
        layer = lycoris_kinds.layer_of(kind, tensors)
    else:
        layer = "conv" if any(t.dim() > 2 for t in tensors.values()) else "linear"
    alpha = None
    if "alpha" in parts:
        a = parts["alpha"]
        if a.numel() != 1:
            raise FormatError(f"{where}: alpha must hold one number, has shape {tuple(a.shape)}")
        alpha = float(a.float().reshape(()).item())
        if alpha == 0:
            # sd-scripts / LyCORIS: "alpha None or 0 means alpha = r" (networks/lora.py LoRAModule)
            alpha = None
            hints["alpha_zero"] = True
        hints["alpha_dtype"] = a.dtype
        hints["alpha_shape"] = tuple(a.shape)
    module = LoraModule(component=component, path=path, kind=kind, layer=layer, tensors=tensors, alpha=alpha,
                        hints=hints)
    if "dora_scale" in parts:
        module.magnitude = parts["dora_scale"]
        hints["dora_axis"] = _dora_axis(parts["dora_scale"], module.out_features)
        hints["dora_strength"] = "lycoris"  # what a strength ≠ 1 means for this layout (loratool.delta)
    return module


def _type_flattened_conv(m: LoraModule, family: str | None) -> None:
    """A LoHa / LoKr on a conv without Tucker core holds its product flattened ([out, in·kh·kw], 2-D
    factors): the family's layer table gives the kernel, so the module is typed ``conv`` with the
    weight's real shape (``hints["weight_shape"]``), as LyCORIS built it from ``org_module``."""
    if m.kind not in ("loha", "lokr") or m.layer != "linear":
        return
    kernel = conv_kernel(family, m.component, m.path)
    if kernel is None:
        return
    out, flat = product_shape(m)
    taps = math.prod(kernel)
    if flat % taps == 0:
        m.layer = "conv"
        m.hints["weight_shape"] = (out, flat // taps, *kernel)


def read(src, opts, source_format: str = NAME) -> Adapter:
    from loratool.formats import dialects

    dialect = dialects.detect(src)
    if dialect is not None:  # a trainer's variant of this layout (formats.dialects)
        from loratool.formats import dialect_read

        return dialect_read.read(src, opts, dialect)
    family = _family_for_read(src, opts)
    resolver = HeadResolver(family, opts.vocabulary)
    spec = dit.find(family.name) if family is not None else None
    spec = spec if spec is not None and spec.diffusers_named is not None else None
    tensors = src.tensors
    modules: list[LoraModule] = []
    for head, parts in _group(src).items():
        try:
            component, path, prefix, _ = resolver.resolve(head)
        except FormatError as exc:
            raise FormatError(f"{src.path}: {exc}") from None
        module = build_module(f"{src.path}: {head}", component, path,
                              {suffix: tensors[key] for suffix, key in parts.items()})
        # The native key lets a writer reuse the file's own spelling of the head (case, prefix)
        # for a module that still has that native name after a round trip through canonical names.
        module.hints.update(kohya_head=head, kohya_prefix=prefix, kohya_native=(component, path))
        if family is not None:
            module.hints["kohya_family"] = family.name
            if spec is not None and component == dit.COMPONENT and spec.diffusers_only(path):
                module.hints["kohya_names"] = "diffusers"  # FramePack's musubi-tuner names: written back so
        modules.append(module)
    if family is not None:
        modules = family.to_canonical(modules)
    modules = [m if canonical_clip_path(m.component, m.path) == m.path else
               replace(m, path=canonical_clip_path(m.component, m.path)) for m in modules]
    adapter = Adapter(metadata=dict(src.metadata), source_format=source_format,
                      family=family.name if family is not None else None)
    for m in modules:
        _type_flattened_conv(m, family.name if family is not None else None)
        m.hints["kohya_canonical"] = (m.component, m.path)
        adapter.add(m)
    for key in src.keys:
        if key.startswith(BUNDLED):
            adapter.extras[("text_encoder", key)] = tensors[key]
    return adapter


# ----------------------------------------------------------------------------------- writing


def _family_for_write(adapter: Adapter, opts):
    if opts.family:
        return arch.check_family(opts.family, adapter)
    if adapter.family in arch.families():
        return arch.get(adapter.family)
    names = {m.hints.get("kohya_family") for m in adapter} - {None}
    if len(names) == 1:
        return arch.get(names.pop())
    detected = arch.family_of(adapter)
    if detected is not None:
        return arch.get(detected)
    comps = set(adapter.components)
    if comps <= {"model"}:
        return arch.get("llm")
    if comps <= {"unet", "text_encoder"}:
        return arch.get("sd1")
    raise UsageError(f"cannot tell which model family to name kohya keys for (components: "
                     f"{', '.join(sorted(comps))}); pass --family ({', '.join(arch.families())})")


def _alpha_value(m: LoraModule) -> float | None:
    """The alpha to store (None: store none). rsLoRA is folded in: kohya scales by alpha/r.

    A module read from a kohya file without an alpha key is written without one again (same
    meaning, alpha = r); others get an explicit alpha, since some loaders (diffusers) give an
    alpha-less module the file's most common alpha instead of r.
    """
    if m.alpha is None and m.hints.get("alpha_zero"):
        return 0.0  # the file's own spelling of alpha = r
    if m.kind == "full" or (m.alpha is None and (m.rank == 0 or "kohya_head" in m.hints)):
        return None
    if m.scale == 0:
        raise FormatError(f"{m.component}:{m.path} has scale 0 (alpha 0); kohya files cannot hold it: "
                          "kohya reads alpha 0 as alpha = rank")
    if m.rslora:
        return m.effective_alpha
    if m.alpha is None:
        return float(m.rank) if m.rank else None
    return m.alpha


def _alpha_dtype(alpha: float, factors: torch.dtype) -> torch.dtype:
    """The factors' dtype, as sd-scripts writes it, unless that would round alpha (fp16 16.77 → 16.78)."""
    for dtype in (factors, torch.float32):
        if float(torch.tensor(alpha, dtype=torch.float64).to(dtype).double()) == alpha:
            return dtype
    return torch.float64


def _magnitude_tensor(m: LoraModule) -> torch.Tensor:
    """``dora_scale`` in the shape LyCORIS (and ComfyUI) read for the module's axis: [out, 1(, 1, 1)]
    per output feature, [1, in(, 1, 1)] per input feature, whatever shape the source layout used
    (PEFT: [out], conv [1, out, 1, 1] — which LyCORIS would read as per input)."""
    mag = m.magnitude
    assert mag is not None
    ndim = max(2, len(m.weight_shape), mag.dim())
    axis = 1 if m.hints.get("dora_axis") == "in" else 0
    shape = [1] * ndim
    shape[axis] = mag.numel()
    return (mag if tuple(mag.shape) == tuple(shape) else mag.reshape(shape)).contiguous()


def module_tensors(m: LoraModule, where: str) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of one module in kohya / LyCORIS layout."""
    if m.layer == "embedding":
        raise FormatError(f"{where}: kohya files cannot hold an embedding LoRA")
    if "bias" in m.tensors:
        raise FormatError(f"{where}: kohya files cannot hold a LoRA bias (PEFT lora_bias)")
    out: dict[str, torch.Tensor] = {}
    tensors = dict(m.tensors)
    for core, a in TUCKER_A.get(m.kind, ()):
        if core in tensors and a in tensors:
            tensors[a] = tensors[a].T
    for name, t in tensors.items():
        suffix = SUFFIX_OF.get((m.kind, name))
        if suffix is None:
            raise FormatError(f"{where}: {m.kind} tensor {name!r} has no kohya key")
        out[suffix] = t.contiguous()
    alpha = _alpha_value(m)
    if alpha is not None:
        dtype = m.hints.get("alpha_dtype") or _alpha_dtype(alpha, m.dtype)
        out["alpha"] = torch.tensor(alpha, dtype=torch.float64).to(dtype).reshape(m.hints.get("alpha_shape", ()))
    if m.magnitude is not None:
        out["dora_scale"] = _magnitude_tensor(m)
    return out


def _number_text(old: str | None, value: float | int | None, as_int: bool) -> str | None:
    if value is None:
        return old
    try:
        if old is not None and float(old) == float(value):
            return old  # keep the producer's spelling ("8" vs "8.0")
    except ValueError:
        pass
    return str(int(value)) if as_int else str(float(value))


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _is_kxk_conv(m: LoraModule) -> bool:
    return m.layer == "conv" and math.prod(int(x) for x in m.weight_shape[2:]) > 1


def _described(metadata: dict[str, str], modules: list[LoraModule]) -> bool:
    """Whether the header's network settings still give every module its rank and alpha.

    sd-scripts (``networks/lora.py`` ``create_modules``) and LyCORIS train Linear and 1×1 conv
    modules at ``ss_network_dim`` / ``ss_network_alpha`` and k×k convs at ``conv_dim`` /
    ``conv_alpha`` from ``ss_network_args`` (conv_alpha 1 when only conv_dim is given); a module
    without an alpha key has alpha = r.
    """
    dim, alpha = _number(metadata.get("ss_network_dim")), _number(metadata.get("ss_network_alpha"))
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        args = {}
    args = args if isinstance(args, dict) else {}
    conv_dim = _number(args.get("conv_dim"))
    conv_alpha = _number(args.get("conv_alpha", 1.0)) if conv_dim is not None else None
    for m in modules:
        want = (conv_dim, conv_alpha) if conv_dim is not None and _is_kxk_conv(m) else (dim, alpha)
        stored = _alpha_value(m)
        if want[0] != m.rank or want[1] != (float(m.rank) if stored is None else stored):
            return False
    return True


def network_metadata(metadata: dict[str, str], modules: list[LoraModule]) -> dict[str, str]:
    """``ss_network_dim`` / ``ss_network_alpha`` for these modules ("Dynamic" when they differ),
    or nothing (the header's values are kept) when those still describe every module."""
    factored = [m for m in modules if m.rank > 0]
    if not factored or _described(metadata, factored):
        return {}
    out: dict[str, str] = {}
    ranks = {m.rank for m in factored}
    alphas = {a for a in (_alpha_value(m) for m in factored)}
    for key, values, as_int in (("ss_network_dim", ranks, True), ("ss_network_alpha", alphas, False)):
        if len(values) == 1:
            text = _number_text(metadata.get(key), next(iter(values)), as_int)
        else:
            text = "Dynamic"
        if text is not None:
            out[key] = text
    return out


def write(adapter: Adapter, out: Path, opts) -> list[Path]:
    from safetensors.torch import save

    out = check_target(NAME, out, opts.inputs, opts.force)
    bundled = {n: t for (_, n), t in adapter.extras.items() if n.startswith(BUNDLED)}
    if len(bundled) < len(adapter.extras):
        names = ", ".join(f"{c}:{n}" for c, n in list(adapter.extras)[:3])
        raise FormatError(f"{out}: kohya files hold only LoRA modules; this adapter also has whole tensors "
                          f"({names}); write it as peft instead")
    family = _family_for_write(adapter, opts)
    # from_canonical may fuse several canonical modules into one native module (Flux / SD3 q, k, v),
    # so heads are derived from the native modules themselves, never by pairing the two lists.
    # (FramePack in HunyuanVideo keeps diffusers' names: Family.kohya_from_canonical)
    native = (family.kohya_from_canonical(list(adapter), adapter.metadata) if family.kohya_from_canonical
              else family.from_canonical(list(adapter)))
    resolver = HeadResolver(family, None)
    tensors: dict[str, torch.Tensor] = {}
    for nat in native:
        where = f"{out}: {nat.component}:{nat.path}"
        head = nat.hints.get("kohya_head")
        if head is None or nat.hints.get("kohya_native") != nat.key or \
                nat.hints.get("kohya_family") not in (None, family.name):
            head = to_head(resolver.prefix_for(nat.component), nat.path)
        for suffix, t in module_tensors(nat, where).items():
            key = f"{head}.{suffix}"
            if key in tensors:
                raise FormatError(f"{where}: two modules map to the kohya key {key!r}")
            tensors[key] = t
    tensors.update({n: t.contiguous() for n, t in bundled.items()})
    metadata = {k: v for k, v in adapter.metadata.items() if k not in HASH_KEYS}
    metadata.update(opts.extra_metadata)
    metadata.update(network_metadata(metadata, native))
    metadata.update(kohya_hashes(tensors, metadata))
    data = save(tensors, metadata)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return [out]
