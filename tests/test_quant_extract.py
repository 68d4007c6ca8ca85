"""Extracting a LoRA from quantized pairs (fp8, scaled fp8, GGUF, NF4): both sides decoded, ΔW in float32.

Oracle: the decoders of the writers' own libraries (torch's float8 cast, gguf.quants.dequantize,
bitsandbytes' dequantize_4bit) applied to each side, the difference taken in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants
from merge_oracles import save_base
from quant_bases import bnb_linear_state, musubi_scaled, scaled_decode
from test_quant_gguf import write_gguf

from loratool.ops.extract import extract

SHAPES = {"a": (64, 128), "b": (32, 128)}


def pair(kind: str, tmp_path):
    """(fine-tune path, base path, {key: (fine-tune W, base W) as their library decodes them})."""
    gen = torch.Generator().manual_seed(0)
    base = {f"{n}.weight": torch.randn(*s, generator=gen) * 0.05 for n, s in SHAPES.items()}
    tuned = {k: v + torch.randn(v.shape[0], 2, generator=gen) @ torch.randn(2, v.shape[1], generator=gen) * 0.02
             for k, v in base.items()}
    out = {}
    for name, state in (("ft", tuned), ("base", base)):
        if kind == "fp8":
            q = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
            save_base(q, tmp_path / f"{name}.safetensors")
            out[name] = (tmp_path / f"{name}.safetensors", {k: v.double() for k, v in q.items()})
        elif kind == "scaled":
            q, ref = {}, {}
            for k, v in state.items():
                q[k], q[k[:-7] + ".scale_weight"] = musubi_scaled(v, "block")
                ref[k] = scaled_decode(q[k], q[k[:-7] + ".scale_weight"])
            save_base(q, tmp_path / f"{name}.safetensors")
            out[name] = (tmp_path / f"{name}.safetensors", ref)
        elif kind == "gguf":
            write_gguf(tmp_path / f"{name}.gguf", {k: (v.numpy(), T.Q8_0) for k, v in state.items()})
            ref = {t.name: torch.from_numpy(quants.dequantize(t.data, t.tensor_type)).double()
                   for t in GGUFReader(tmp_path / f"{name}.gguf").tensors}
            out[name] = (tmp_path / f"{name}.gguf", ref)
        else:
            import bitsandbytes.functional as F

            q, ref = {}, {}
            for k, v in state.items():
                st = bnb_linear_state(v.to(torch.bfloat16), "nf4")
                q.update({k[:-6] + key: t for key, t in st.items()})
                qs = F.QuantState.from_dict({key[7:]: t for key, t in st.items() if key.startswith("weight.")},
                                            device=torch.device("cpu"))
                ref[k] = F.dequantize_4bit(st["weight"], qs).double()
            save_base(q, tmp_path / f"{name}.safetensors")
            out[name] = (tmp_path / f"{name}.safetensors", ref)
    return out["ft"][0], out["base"][0], {k: (out["ft"][1][k], out["base"][1][k]) for k in base}


@pytest.mark.parametrize("kind", ["fp8", "scaled", "gguf", "nf4"])
def test_extract_from_a_quantized_pair_is_the_difference_of_the_decoded_weights(tmp_path, kind):
    ft, base, decoded = pair(kind, tmp_path)
    result = extract(ft, base, rank=128, exact=True, device="cpu", dtype=torch.float64)
    assert not result.not_extracted and result.unchanged == 0  # scales, maps, states are no weights
    modules = {m.path: m for m in result.adapter}
    assert set(modules) == set(SHAPES)
    for key, (w_ft, w_base) in decoded.items():
        m = modules[key[: -len(".weight")]]
        delta = m.scale * m.tensors["up"].double() @ m.tensors["down"].double()
        exact = w_ft - w_base
        assert float((delta - exact).norm() / exact.norm()) < 1e-6, key
    assert np.isfinite([m.rel_error for m in result.modules]).all()
