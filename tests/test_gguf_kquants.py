"""The k-quant quantizers (Q2_K ... Q6_K) of ``loratool.io.codecs.gguf_kquants`` against ggml.

Oracles: golden blocks (``fixtures/gguf_kquant_golden.json``) that ggml's own
``quantize_row_q{2..6}_K_ref`` (ggml-org/ggml ``src/ggml-quants.c`` at commit
d99724f2b141fed9e1a9f402213506c081433465, gcc 12 -O2 on x86-64) wrote for nine float32 blocks and
the port reproduced bit for bit (also on 150 000 random blocks of 15 distributions, and on their
dequantizations, when the fixture was made; CI has no C build); ``gguf.quants.dequantize`` (gguf-py
0.19) reads every byte written here, and gives the grid each value must lie nearest to.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from loratool.io.codecs import gguf_kquants as K

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "gguf_kquant_golden.json"
TYPES = list(K.QUANTIZERS)

# where the quant bits lie in a block, and the bytes that set every value to the lowest level,
# the one above it and the highest (gguf-py quants.py / ggml-common.h block layouts)
LEVEL_BYTES = {
    "Q2_K": {(16, 80): (0x00, 0x55, 0xFF)},
    "Q3_K": {(0, 32): (0x00, 0x00, 0xFF), (32, 96): (0x00, 0x55, 0xFF)},  # hmask bit clear: q − 4
    "Q4_K": {(16, 144): (0x00, 0x11, 0xFF)},
    "Q5_K": {(16, 48): (0x00, 0x00, 0xFF), (48, 176): (0x00, 0x11, 0xFF)},
    "Q6_K": {(0, 128): (0x00, 0x11, 0xFF), (128, 192): (0x00, 0x00, 0xFF)},
}
# measured on the data below (64 × 1024, N(0, 0.02²)); ggml's C gives the same bytes
ROUNDTRIP = {"Q2_K": 0.29504, "Q3_K": 0.15048, "Q4_K": 0.07089, "Q5_K": 0.03592, "Q6_K": 0.01763}
# quantize(dequantize(q)) against q, as ggml's C does it (measured on 4000 random blocks in C):
# the share of values it leaves unchanged and ‖d₂ − d₁‖ / ‖d₁‖
FIXED = {"Q2_K": (0.9952, 8.09e-3), "Q3_K": (0.9134, 3.10e-2), "Q4_K": (0.9999, 9.75e-5),
         "Q5_K": (0.9730, 3.82e-3), "Q6_K": (1.0, 0.0)}


def qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    return (np.random.default_rng(3).standard_normal((64, 1024)) * 0.02).astype(np.float32)


def test_golden_blocks_from_ggml_reference_bit_for_bit():
    golden = json.loads(GOLDEN.read_text())
    assert "quantize_row_q2_K_ref" in golden["note"] and "d99724f2b141fed9e1a9f402213506c081433465" in golden["note"]
    x = np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.float32) for h in golden["input"]])
    assert x.shape == (9, 256)
    for name in TYPES:
        expected = np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in golden[name]])
        ours = K.quantize(x, name).reshape(expected.shape)
        assert expected.shape[1] == GGML_QUANT_SIZES[qtype(name)][1]
        for i, (a, b) in enumerate(zip(ours, expected)):
            assert a.tobytes() == b.tobytes(), f"{name} block {i}"


@pytest.mark.parametrize("name", TYPES)
def test_dequantizes_in_gguf_within_the_types_error(weights, name):
    q = K.quantize(weights, name)
    assert q.dtype == np.uint8 and q.shape == quants.quant_shape_to_byte_shape(weights.shape, qtype(name))
    back = quants.dequantize(q, qtype(name))
    assert back.shape == weights.shape
    rel = np.linalg.norm(back - weights) / np.linalg.norm(weights)
    assert rel <= ROUNDTRIP[name] * 1.001
    assert np.array_equal(K.quantize(weights.reshape(-1), name).reshape(q.shape), q)  # any leading shape


def nearest_level_holds(q: np.ndarray, name: str, x: np.ndarray) -> bool:
    """Whether every value of ``x`` is stored (blocks ``q``) at the nearest level of its block's grid:
    the grid read back through gguf's dequantizer with the quant bits set to the lowest level, the
    next and the highest; within half a step of ``x`` clipped to the grid (at the end level when ``x``
    lies past it); a block whose step is 0 holds its offset everywhere."""
    q = q.reshape(-1, GGML_QUANT_SIZES[qtype(name)][1])
    got = quants.dequantize(q, qtype(name)).reshape(-1).astype(np.float64)
    levels = []
    for pick in range(3):
        blocks = q.copy()
        for (a, b), fill in LEVEL_BYTES[name].items():
            blocks[:, a:b] = fill[pick]
        levels.append(quants.dequantize(blocks, qtype(name)).reshape(-1).astype(np.float64))
    low, step, high = levels[0], levels[1] - levels[0], levels[2]
    x = np.clip(np.asarray(x, np.float64).reshape(-1), np.minimum(low, high), np.maximum(low, high))
    live = step != 0
    slack = np.abs(step) * 0.5 * (1 + 1e-5) + 1e-6 * np.abs(low)
    return bool(live.mean() > 0.99 and (np.abs(x - got) <= slack)[live].all()
                and np.array_equal(got[~live], low[~live]))


@pytest.mark.parametrize("name", TYPES)
def test_every_value_is_at_the_nearest_level_of_its_blocks_grid(weights, name):
    assert nearest_level_holds(K.quantize(weights, name), name, weights)


@pytest.mark.parametrize("name", TYPES)
def test_requantizing_a_dequantized_tensor_moves_it_as_little_as_ggml_does(weights, name):
    """ggml's reference is no exact fixed point: re-searching the scales of dequantized values finds
    other near-equal ones for some blocks (Q4_K and Q6_K keep the values, Q5_K / Q3_K / Q2_K move a few)."""
    t = qtype(name)
    d1 = quants.dequantize(K.quantize(weights, name), t)
    d2 = quants.dequantize(K.quantize(d1, name), t)
    unchanged, drift = FIXED[name]
    assert (d1 == d2).mean() >= unchanged - 0.005
    assert np.linalg.norm(d2 - d1) / np.linalg.norm(d1) <= drift * 1.15
    d3 = quants.dequantize(K.quantize(d2, name), t)
    assert np.linalg.norm(d3 - d2) <= np.linalg.norm(d2 - d1)  # and settles


def test_chunks_blocks_and_edge_inputs():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((K.CHUNK + 3, 256)) * 0.1).astype(np.float32)
    x[5] = 0.0
    x[7, :16] = 1e-30  # under GROUP_MAX_EPS in a Q6_K block: that block is all zero
    for name in TYPES:
        whole = K.quantize(x, name)
        parts = np.concatenate([K.quantize(x[:K.CHUNK - 1], name), K.quantize(x[K.CHUNK - 1:], name)])
        assert np.array_equal(whole, parts), name  # a block does not depend on its neighbours
        assert not quants.dequantize(whole[5:6], qtype(name)).any(), name
    with pytest.raises(ValueError, match="multiple of 256"):
        K.quantize(np.zeros((4, 100), np.float32), "Q4_K")


def test_quantizer_does_not_import_torch():
    code = ("import sys, numpy as np; from loratool.io.codecs import gguf_kquants as K; "
            "[K.quantize(np.ones((2, 256), np.float32), t) for t in K.QUANTIZERS]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]
