"""bitsandbytes weights as transformers serialises them (``save_pretrained`` of a quantized model).

4-bit (NF4 / FP4; ``Linear4bit._save_to_state_dict`` writes ``QuantState.as_dict(packed=True)``)::

    <m>.weight                                  uint8 [(n+1)//2, 1]: two 4-bit codes per byte, high nibble first
    <m>.weight.absmax                           float32 [blocks], or uint8 [blocks] when nested
    <m>.weight.quant_map                        float32 [16]: the code (NF4 or FP4 values in [-1, 1])
    <m>.weight.nested_absmax / nested_quant_map float32 [blocks/256] / [256]  (double quantization)
    <m>.weight.quant_state.bitsandbytes__nf4    uint8 JSON: quant_type, blocksize, dtype, shape,
                                                nested_blocksize, nested_dtype, nested_offset

Dequantization, as ``bitsandbytes.functional.dequantize_4bit`` (CPU backend) computes it::

    absmax = nested_quant_map[absmax_u8] · nested_absmax[block of 256] + nested_offset   (nested only)
    W      = (quant_map[code] · absmax[block]).to(dtype)                                  (float32 product)

The result is rounded to the state's ``dtype`` as bitsandbytes does (the weights the model computes
with), then widened to float32 exactly.

8-bit (LLM.int8; ``Linear8bitLt._save_to_state_dict``): ``<m>.weight`` int8 [out, in], ``<m>.SCB``
float32 [out] (row absmax), ``<m>.weight_format`` (kept)::

    W = weight · SCB[row] · 7.874015718698502e-3          (bitsandbytes' int8_vectorwise_dequant)

Requantizing (``encode``) follows bitsandbytes' quantizers: 4-bit codes by nearest value of the
code (``bucketize`` on the midpoints, as its ``quantize_4bit``), block absmax in float32, the nested
absmax quantized with the stored 8-bit map per 256 values around the *stored* offset (so the
JSON state is kept byte for byte); 8-bit ``SCB = max|W| per row``, ``weight = round(W · 127 / SCB)``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from loratool.io.codecs import Codec, Entry, Layout, Rounding, Stored
from loratool.io.codecs.fp8 import Unsupported

if TYPE_CHECKING:
    import torch

STATE_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
_INT8_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it
_DTYPES = ("bfloat16", "float16", "float32")


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the code value nearest to each element (midpoint bucketing, as bitsandbytes)."""
    import torch

    order = torch.argsort(code)
    ordered = code[order]
    mid = (ordered[:-1] + ordered[1:]) / 2
    return order[torch.bucketize(x, mid, out_int32=True)]


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, as [blocks, blocksize]."""
    import torch

    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


class BnB4(Codec):
    """bitsandbytes NF4 / FP4 (optionally with double-quantized absmax)."""

    def __init__(self, state: dict):
        self.state = state
        self.quant_type = str(state["quant_type"])
        self.blocksize = int(state["blocksize"])
        self.nested = "nested_blocksize" in state
        nested = f", nested absmax /{state['nested_blocksize']}" if self.nested else ""
        self.label = f"{self.quant_type} (blocks of {self.blocksize}{nested}, {state['dtype']})"

    def _absmax(self, stored: Stored) -> torch.Tensor:
        import torch

        absmax = stored.aux["absmax"]
        if not self.nested:
            return absmax.to(torch.float32)
        code2 = stored.aux["nested_quant_map"].to(torch.float32)
        scale2 = stored.aux["nested_absmax"].to(torch.float32)
        n = absmax.numel()
        values = _blocks(code2[absmax.long()], int(self.state["nested_blocksize"])) * scale2.view(-1, 1)
        return values.reshape(-1)[:n] + torch.tensor(float(self.state["nested_offset"]), dtype=torch.float32)

    def decode(self, stored: Stored, entry: Entry) -> torch.Tensor:
        import torch

        shape = tuple(self.state["shape"])
        n = 1
        for d in shape:
            n *= d
        packed = stored.tensor.reshape(-1).view(torch.uint8)
        idx = torch.empty(packed.numel() * 2, dtype=torch.long)
        idx[0::2] = (packed >> 4).long()
        idx[1::2] = (packed & 0xF).long()
        values = stored.aux["quant_map"].to(torch.float32)[idx[:n]]
        out = (_blocks(values, self.blocksize) * self._absmax(stored).view(-1, 1)).reshape(-1)[:n]
        return out.reshape(shape).to(getattr(torch, self.state["dtype"])).to(torch.float32)

    def encode(self, value: torch.Tensor, like: Stored, entry: Entry, rounding: Rounding) -> Stored:
        import torch

        flat = value.detach().to("cpu", torch.float32).reshape(-1)
        n = flat.numel()
        blocks = _blocks(flat, self.blocksize)
        absmax = blocks.abs().amax(dim=1)
        scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).reshape(-1)[:n]
        codes = _nearest(scaled, like.aux["quant_map"].to(torch.float32)).to(torch.uint8)
        if codes.numel() % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        packed = ((codes[0::2] << 4) | codes[1::2]).view(like.tensor.dtype).reshape(like.tensor.shape)
        aux = {}
        if self.nested:
            offset = float(self.state["nested_offset"])
            size2 = int(self.state["nested_blocksize"])
            shifted = _blocks(absmax - offset, size2)
            scale2 = shifted.abs().amax(dim=1)
            norm = (shifted * (1.0 / scale2.clamp(min=1e-38)).view(-1, 1)).reshape(-1)[: absmax.numel()]
            aux["absmax"] = _nearest(norm, like.aux["nested_quant_map"].to(torch.float32)).to(torch.uint8)
            aux["nested_absmax"] = scale2.to(like.aux["nested_absmax"].dtype)
        else:
            aux["absmax"] = absmax.to(like.aux["absmax"].dtype)
        return Stored(packed, aux)


class BnB8(Codec):
    """bitsandbytes LLM.int8 (row-wise absmax)."""

    label = "int8 (row absmax)"

    def decode(self, stored: Stored, entry: Entry) -> torch.Tensor:
        import torch

        scb = stored.aux["scb"].to(torch.float32)
        return stored.tensor.to(torch.float32) * scb.view(-1, *([1] * (stored.tensor.dim() - 1))) * _INT8_SCALE

    def encode(self, value: torch.Tensor, like: Stored, entry: Entry, rounding: Rounding) -> Stored:
        import torch

        value = value.to(torch.float32)
        rows = value.reshape(value.shape[0], -1)
        scb = rows.abs().amax(dim=1)
        q = torch.round(rows * (127.0 / scb.clamp(min=1e-38).unsqueeze(-1))).clamp_(-127, 127)
        return Stored(q.to(torch.int8).reshape(like.tensor.shape), {"scb": scb.to(like.aux["scb"].dtype)})


# ---------------------------------------------------------------- detection (headers only, no torch)


def _state(file, key: str) -> dict | None:
    info = file.info(key)
    if info.dtype_name != "U8" or info.nbytes > 1 << 16:
        return None
    try:
        state = json.loads(file.raw_bytes(key).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = (isinstance(state, dict) and state.get("quant_type") in ("nf4", "fp4")
          and isinstance(state.get("blocksize"), int) and state["blocksize"] > 0 and state.get("dtype") in _DTYPES
          and isinstance(state.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in state["shape"]))
    if ok and "nested_blocksize" in state:
        ok = isinstance(state["nested_blocksize"], int) and state["nested_blocksize"] > 0 \
            and isinstance(state.get("nested_offset"), (int, float))
    return state if ok else None


def _inconsistent(file, weight: str, aux: dict[str, str], state: dict) -> str | None:
    """Why the stored tensors cannot hold the weight the quant state describes (None when they can)."""
    n = 1
    for d in state["shape"]:
        n *= d
    blocks = -(-n // state["blocksize"])
    numel = {role: _numel(file.info(key).shape) for role, key in aux.items()}
    if file.info(weight).nbytes * 2 < n:
        return f"{weight} holds {file.info(weight).nbytes * 2} codes, the quant state says {n}"
    if numel["absmax"] != blocks or numel["quant_map"] != 16:
        return f"{weight}: {numel['absmax']} block maxima and {numel['quant_map']} code values for {blocks} blocks"
    if "nested_blocksize" in state:
        nested = -(-blocks // state["nested_blocksize"])
        if numel["nested_absmax"] != nested or numel["nested_quant_map"] != 256:
            return f"{weight}: nested absmax / map sizes {numel['nested_absmax']} / {numel['nested_quant_map']}"
    return None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def detect_4bit(file, layout: Layout) -> None:
    keys = file.header.tensors
    for key in keys:
        suffix = next((s for s in STATE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        weight = key[: -len(suffix)]
        if weight not in keys:
            continue
        aux = {role: f"{weight}.{role}" for role in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
               if f"{weight}.{role}" in keys}
        aux["state"] = key
        state = _state(file, key)
        need = {"absmax", "quant_map"} | ({"nested_absmax", "nested_quant_map"} if state and "nested_blocksize"
                                         in state else set())
        if state is None or not need <= set(aux):
            missing = sorted(need - set(aux)) if state is not None else ["a readable quant_state"]
            layout.add(Entry(weight, Unsupported("bitsandbytes 4-bit (incomplete)",
                                                 f"bitsandbytes 4-bit weight without {', '.join(missing)}"),
                             None, aux, "bitsandbytes"))
            continue
        bad = _inconsistent(file, weight, aux, state)
        if bad:
            layout.add(Entry(weight, Unsupported("bitsandbytes 4-bit (inconsistent)", bad), None, aux, "bitsandbytes"))
            continue
        layout.add(Entry(weight, BnB4(state), tuple(state["shape"]), aux, "bitsandbytes"))


def detect_int8(file, layout: Layout) -> None:
    keys = file.header.tensors
    for key in keys:
        if not (key == "SCB" or key.endswith(".SCB")):
            continue
        base = key[: -len("SCB")]
        weight = base + "weight"
        if (weight in keys and keys[weight].dtype_name == "I8" and weight not in layout.entries
                and keys[weight].shape and tuple(keys[key].shape) == (keys[weight].shape[0],)):
            layout.add(Entry(weight, BnB8(), tuple(keys[weight].shape), {"scb": key}, "bitsandbytes"))
            if base + "weight_format" in keys:
                layout.markers.add(base + "weight_format")
