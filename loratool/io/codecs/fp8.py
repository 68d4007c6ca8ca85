"""float8 weights: plain (``F8_E4M3`` / ``F8_E5M2``) or scaled (W = w · s).

Plain: W = float32(w); W' is rounded once to the stored float8 dtype (torch's cast rounds to
nearest, ties to even, and saturates e4m3fn at ±448; e5m2 overflows to ±inf).

Scaled, with ``s`` stored beside ``w`` (per tensor ``[]`` / ``[1]``, per output channel ``[out, 1]``,
or per block of the input dimension ``[out, nblocks, 1]``)::

    W = w · s                       (block-wise: w.view(out, nblocks, -1) · s, back to [out, in])
    s' = amax(|W'| over the group) / max(float8),  rounded up into the scale's dtype
    w' = round(W' / s')              (|W' / s'| ≤ max(float8): nothing saturates)

The scale is recomputed from W' (reusing the old one saturates every entry the update pushes
past the old amax); a group whose W' is all zero keeps its old scale. Layouts:

* ComfyUI ``scaled_fp8`` (``comfy/utils.py`` ``convert_old_quants``): a ``scaled_fp8`` marker
  tensor (its dtype names the float8 kind) and per layer ``.scale_weight`` (float32 scalar) and
  ``.scale_input`` (activations: kept as it is).
* ComfyUI ``comfy_quant`` (the newer mixed-precision layout): per layer a ``.comfy_quant`` uint8
  tensor holding JSON ``{"format": "float8_e4m3fn", ...}`` (or the header's
  ``_quantization_metadata`` ``{"layers": {...}}``), ``.weight_scale`` and ``.input_scale``. Other
  formats (nvfp4, mxfp8, int8) are recognised and named, not merged.
* kohya sd-scripts / musubi-tuner ``--fp8_scaled`` (``fp8_optimization_utils.py``
  ``quantize_weight``): ``.scale_weight`` in the model's dtype, shaped [1], [out, 1] or
  [out, nblocks, 1], no marker.

Stochastic rounding (``Rounding("stochastic", seed)``, ComfyUI's ``comfy/float.py`` idea): with
x in [lo, hi) between neighbouring float8 values, x rounds to hi with probability (x − lo) / (hi − lo),
from a generator seeded by ``crc32(key) + seed`` (ComfyUI seeds by ``string_to_seed(key)``, the CRC-32
of the key): the same key and seed give the same bytes. Computed exactly in float32 (the
probability is exact to 2⁻²⁰); values past the float8 range saturate at ±max.
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING

from loratool.io.codecs import Codec, Entry, Layout, Rounding, Stored

if TYPE_CHECKING:
    import torch

FP8_CODES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
COMFY_FORMATS = {name: code for code, name in FP8_CODES.items()}
_MANTISSA = {"F8_E4M3": 3, "F8_E5M2": 2}


def _dtype(code: str):
    import torch

    return getattr(torch, FP8_CODES[code])


def seed_for(key: str, seed: int) -> int:
    """The generator seed of one tensor: CRC-32 of its key (ComfyUI's ``string_to_seed``) plus ``seed``."""
    return (zlib.crc32(key.encode("utf-8")) + int(seed)) % 2**64


def stochastic_fp8(x: torch.Tensor, code: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` (float32) rounded stochastically to the float8 dtype ``code`` (see the module docstring)."""
    import torch

    dtype = _dtype(code)
    info = torch.finfo(dtype)
    mant = _MANTISSA[code]
    a = x.abs()
    _, exp = torch.frexp(a)  # a = m · 2^exp with m in [0.5, 1): the binade is 2^(exp-1)
    min_exp = int(torch.tensor(info.smallest_normal).log2())
    ulp = torch.exp2((exp - 1).clamp(min=min_exp).to(torch.float32) - mant)
    noise = torch.rand(a.shape, generator=generator, device=a.device, dtype=torch.float32)
    q = torch.floor(a / ulp + noise).mul_(ulp).clamp_(max=info.max)
    return q.copysign_(x).to(dtype)


def round_fp8(x: torch.Tensor, code: str, rounding: Rounding, key: str) -> torch.Tensor:
    """``x`` rounded once to the float8 dtype ``code``."""
    if rounding.mode == "nearest":
        return x.to(_dtype(code))
    import torch

    gen = torch.Generator(device=x.device).manual_seed(seed_for(key, rounding.seed))
    return stochastic_fp8(x.float(), code, gen)


class FP8(Codec):
    """A float8 weight without a scale."""

    def __init__(self, code: str):
        self.code = code
        self.label = FP8_CODES[code]

    def decode(self, stored: Stored, entry: Entry) -> torch.Tensor:
        import torch

        return stored.tensor.to(torch.float32)

    def encode(self, value: torch.Tensor, like: Stored, entry: Entry, rounding: Rounding) -> Stored:
        return Stored(round_fp8(value, self.code, rounding, entry.key))


class ScaledFP8(Codec):
    """A float8 weight times a scale (per tensor, per output channel, or per input block)."""

    def __init__(self, code: str, granularity: str):
        self.code = code
        self.granularity = granularity  # "tensor" | "channel" | "block of N"
        self.label = f"{FP8_CODES[code]} × {granularity} scale"

    @staticmethod
    def _grouped(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``w`` viewed so that ``scale`` broadcasts over its groups."""
        if scale.dim() == 3:
            return w.reshape(scale.shape[0], scale.shape[1], -1)
        if scale.dim() == 2 and w.dim() > 2:
            return w.reshape(scale.shape[0], -1)
        return w

    def decode(self, stored: Stored, entry: Entry) -> torch.Tensor:
        import torch

        scale = stored.aux["scale"].to(torch.float32)
        w = stored.tensor.to(torch.float32)
        return (self._grouped(w, scale) * scale).reshape(w.shape)

    def encode(self, value: torch.Tensor, like: Stored, entry: Entry, rounding: Rounding) -> Stored:
        import torch

        old = like.aux["scale"]
        fmax = torch.finfo(_dtype(self.code)).max
        value = value.to(torch.float32)
        grouped = self._grouped(value, old)  # the scale's shape broadcasts over it
        if old.numel() == 1:
            amax = grouped.abs().amax().reshape(old.shape)
        else:
            amax = grouped.abs().amax(dim=grouped.dim() - 1, keepdim=True).reshape(old.shape)
        amax64 = amax.to(torch.float64)
        scale = (amax64 / fmax).to(old.dtype)
        step = 1.0 + torch.finfo(old.dtype).eps
        for _ in range(8):  # round the scale up until amax / scale ≤ max(float8) holds exactly
            low = scale.to(torch.float64) * fmax < amax64
            if not bool(low.any()):
                break
            scale = torch.where(low, (scale.to(torch.float32) * step).to(old.dtype), scale)
        scale = torch.where(amax64 > 0, scale, old.to(device=scale.device))
        q = (grouped / scale.to(torch.float32)).clamp_(-fmax, fmax).reshape(value.shape)
        return Stored(round_fp8(q, self.code, rounding, entry.key), {"scale": scale})


class Unsupported(Codec):
    """A kind that is recognised (and named by ``info``) but neither read nor written."""

    writable = False

    def __init__(self, label: str, reason: str):
        self.label = label
        self.reason = reason

    def decode(self, stored: Stored, entry: Entry) -> torch.Tensor:
        from loratool.errors import FormatError

        raise FormatError(f"{entry.key}: {self.reason}")

    def cannot_encode(self) -> str:
        return self.reason


# ---------------------------------------------------------------- detection (headers only, no torch)


def _fp8(file, key: str) -> bool:
    return key in file.header.tensors and file.header.tensors[key].dtype_name in FP8_CODES


def _granularity(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> str | None:
    numel = 1
    for d in scale_shape:
        numel *= d
    if numel == 1 and len(scale_shape) <= 1:
        return "tensor"
    if len(scale_shape) == 2 and scale_shape[1] == 1 and weight_shape and scale_shape[0] == weight_shape[0]:
        return "channel"
    if (len(scale_shape) == 3 and scale_shape[2] == 1 and len(weight_shape) == 2
            and scale_shape[0] == weight_shape[0] and scale_shape[1] and weight_shape[1] % scale_shape[1] == 0):
        return f"block of {weight_shape[1] // scale_shape[1]}"
    return None


def _scaled_entry(file, weight: str, scale: str, scheme: str) -> Entry:
    winfo, sinfo = file.info(weight), file.info(scale)
    gran = _granularity(winfo.shape, sinfo.shape)
    if gran is None or sinfo.dtype_name not in ("F32", "F16", "BF16"):
        codec: Codec = Unsupported(f"{FP8_CODES[winfo.dtype_name]} × scale {list(sinfo.shape)} {sinfo.dtype_name}",
                                   f"scale {scale} {list(sinfo.shape)} {sinfo.dtype_name} does not fit weight "
                                   f"{list(winfo.shape)} (expected [], [1], [out, 1] or [out, nblocks, 1] floats)")
        return Entry(weight, codec, None, {"scale": scale}, scheme)
    return Entry(weight, ScaledFP8(winfo.dtype_name, gran), winfo.shape, {"scale": scale}, scheme)


def detect_scaled(file, layout: Layout) -> None:
    """ComfyUI ``scaled_fp8`` and kohya / musubi ``scale_weight`` layouts."""
    keys = file.header.tensors
    comfy = [k for k in keys if k == "scaled_fp8" or k.endswith(".scaled_fp8")]
    layout.markers.update(comfy)
    scheme = "ComfyUI scaled_fp8" if comfy else "kohya/musubi fp8_scaled"
    claimed = layout.claimed()
    for key in keys:
        if not key.endswith(".scale_weight") or key in claimed:
            continue
        base = key[: -len(".scale_weight")]
        weight = base + ".weight"
        if _fp8(file, weight) and weight not in claimed:
            layout.add(_scaled_entry(file, weight, key, scheme))
            if base + ".scale_input" in keys:
                layout.markers.add(base + ".scale_input")


def _comfy_layers(file) -> dict[str, dict]:
    """Layer -> ComfyUI quantization config, from ``.comfy_quant`` tensors and ``_quantization_metadata``."""
    layers: dict[str, dict] = {}
    raw = file.metadata.get("_quantization_metadata")
    if raw:
        try:
            meta = json.loads(raw)
            for name, conf in (meta.get("layers") or {}).items():
                layers[name] = conf if isinstance(conf, dict) else {"format": conf}
        except (json.JSONDecodeError, AttributeError, TypeError):
            pass
    for key, info in file.header.tensors.items():
        if key.endswith(".comfy_quant") and info.dtype_name == "U8" and info.nbytes <= 1 << 16:
            try:
                conf = json.loads(file.raw_bytes(key).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                conf = None
            layers[key[: -len(".comfy_quant")]] = conf if isinstance(conf, dict) else {"format": "unreadable"}
    return layers


def detect_comfy_quant(file, layout: Layout) -> None:
    keys = file.header.tensors
    for layer, conf in _comfy_layers(file).items():
        weight = layer + ".weight"
        if weight not in keys:
            continue
        for extra in (".comfy_quant", ".input_scale"):
            if layer + extra in keys:
                layout.markers.add(layer + extra)
        fmt = str(conf.get("format"))
        if fmt in COMFY_FORMATS and _fp8(file, weight) and layer + ".weight_scale" in keys:
            layout.add(_scaled_entry(file, weight, layer + ".weight_scale", "ComfyUI comfy_quant"))
            continue
        aux = {k[len(layer) + 1:]: k for k in keys if k.startswith(layer + ".") and k != weight
               and k not in layout.markers}
        layout.add(Entry(weight, Unsupported(f"{fmt}", f"ComfyUI quantization format {fmt!r} is not supported "
                                                       "(loratool merges float8 comfy_quant layers)"),
                         None, aux, "ComfyUI comfy_quant"))


def detect_plain(file, layout: Layout) -> None:
    claimed = layout.claimed()
    for key, info in file.header.tensors.items():
        if info.dtype_name in FP8_CODES and key not in claimed:
            layout.add(Entry(key, FP8(info.dtype_name), tuple(info.shape)))
