"""GGUF tensors of any ggml type, read and written with the ``gguf`` package (llama.cpp's gguf-py).

``decode``: the stored bytes, shaped as rows of blocks, through ``gguf.quants.dequantize`` (float32,
the numpy order of the stored dims), reshaped to the logical shape (ComfyUI-GGUF's
``comfy.gguf.orig_shape``) and, for q / k projections that llama.cpp's ``LlamaModel`` converter
stored row-permuted, permuted back to the Hugging Face row order::

    stored = P(W),  P(W) = W.reshape(h, 2, rows / h / 2, ...).swapaxes(1, 2).reshape(W.shape)
    W      = stored.reshape(h, rows / h / 2, 2, ...).swapaxes(1, 2).reshape(stored.shape)

``encode``: the inverse, quantized to the same type (so the tensor keeps its byte size and place
in the file): the k-quants Q2_K ... Q6_K by :mod:`loratool.io.codecs.gguf_kquants` (ggml's
reference quantizers, bit for bit), the others by ``gguf.quants.quantize`` (F32, F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0, MXFP4). The i-quants (IQ1_S ... IQ4_XS: lattice searches,
below 4 bits with an importance matrix) are not ported: :meth:`GGUFCodec.cannot_encode` says so and
the merge offers a safetensors output instead.

Plain F16 / F32 / BF16 tensors that need no permutation are not entries: they are read and written
like safetensors tensors (same bytes, same order).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from loratool.io.codecs import Codec, Entry, Layout, Rounding, Stored

if TYPE_CHECKING:
    import torch


@functools.cache
def _can_quantize(ggml_type: int) -> bool:
    import numpy as np
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from loratool.io.codecs.gguf_kquants import QUANTIZERS

    qtype = GGMLQuantizationType(ggml_type)
    if qtype.name in QUANTIZERS:
        return True
    block, _ = GGML_QUANT_SIZES[qtype]
    try:
        quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except (NotImplementedError, quants.QuantError, ValueError, TypeError):
        return False
    return True


def _permute(w: torch.Tensor, heads: int, inverse: bool) -> torch.Tensor:
    rows = w.shape[0]
    if inverse:
        return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCodec(Codec):
    def __init__(self, type_name: str, ggml_type: int, stored_shape: tuple[int, ...], heads: int | None = None):
        self.type_name = type_name
        self.ggml_type = ggml_type
        self.stored_shape = stored_shape  # numpy order of the stored dims
        self.heads = heads
        self.label = type_name + (f" (q/k rows permuted, {heads} heads)" if heads else "")

    def read(self, file, entry: Entry) -> Stored:
        import numpy as np
        import torch

        return Stored(torch.from_numpy(np.frombuffer(bytearray(file.raw_bytes(entry.key)), dtype=np.uint8)))

    def decode(self, stored: Stored, entry: Entry) -> torch.Tensor:
        import torch
        from gguf import quants
        from gguf.constants import GGMLQuantizationType

        qtype = GGMLQuantizationType(self.ggml_type)
        data = stored.tensor.numpy().reshape(quants.quant_shape_to_byte_shape(self.stored_shape, qtype))
        values = torch.from_numpy(quants.dequantize(data, qtype).astype("float32", copy=True))
        values = values.reshape(entry.shape)
        if self.heads:
            values = _permute(values, self.heads, inverse=True)
        return values

    def encode(self, value: torch.Tensor, like: Stored, entry: Entry, rounding: Rounding) -> Stored:
        import numpy as np
        import torch
        from gguf import quants
        from gguf.constants import GGMLQuantizationType

        from loratool.io.codecs import gguf_kquants

        value = value.detach().to("cpu", torch.float32)
        if self.heads:
            value = _permute(value, self.heads, inverse=False)
        data = np.ascontiguousarray(value.reshape(self.stored_shape).numpy())
        if self.type_name in gguf_kquants.QUANTIZERS:
            q = gguf_kquants.quantize(data, self.type_name)
        else:
            q = quants.quantize(data, GGMLQuantizationType(self.ggml_type))
        out = torch.from_numpy(np.ascontiguousarray(q).view(np.uint8).reshape(-1).copy())
        if out.numel() != like.tensor.numel():
            raise ValueError(f"{entry.key}: {self.type_name} gave {out.numel()} bytes, {like.tensor.numel()} stored")
        return Stored(out)

    def cannot_encode(self) -> str | None:
        if _can_quantize(self.ggml_type):
            return None
        return (f"{self.type_name} cannot be requantized (loratool writes the k-quants Q2_K ... Q6_K and the types "
                f"the gguf package quantizes, not the i-quants); write a safetensors output instead "
                f"(-o <name>.safetensors, with --dtype bf16 / fp16 / fp32)")


def detect(file) -> Layout:
    """Every GGUF tensor that is not a plain float stored in the Hugging Face row order."""
    layout = Layout()
    for name, info in file.header.tensors.items():
        heads = file.permutations.get(name)
        if info.plain and not heads:
            continue  # same bytes as a safetensors tensor of that dtype and the logical shape
        codec = GGUFCodec(info.dtype_name, info.ggml_type, info.stored_shape, heads)
        layout.add(Entry(name, codec, tuple(info.shape), {}, "gguf"))
    return layout
