"""Merging into float8 bases: plain fp8, ComfyUI scaled_fp8 / comfy_quant, kohya / musubi scale_weight.

Oracles: PEFT's ``merge_and_unload`` in float64 on the decoded base (W + λΔW) and torch's own
float8 cast; layouts as ComfyUI and musubi-tuner write them (tests/quant_bases.py cites the files).
"""

from __future__ import annotations

import math

import pytest
import torch
from merge_oracles import save_base
from quant_bases import (
    FP8,
    comfy_quant_marker,
    comfy_scaled,
    is_linear,
    musubi_scaled,
    peft_oracle,
    scaled_decode,
)
from safetensors.torch import load_file
from tiny_models import tiny_llama

from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError
from loratool.io.codecs import Rounding, layout_of
from loratool.io.codecs.fp8 import stochastic_fp8
from loratool.io.safetensors_file import SafetensorsFile
from loratool.ops.inspect import inspect_checkpoint
from loratool.ops.merge import merge

TARGETS = ["q_proj", "v_proj", "gate_proj"]


def raw(path, key: str) -> bytes:
    return SafetensorsFile(path).raw_bytes(key)


def fp8_ulp(x: torch.Tensor, code: str) -> torch.Tensor:
    """Spacing of the float8 grid at |x| (subnormal spacing below the smallest normal)."""
    info = torch.finfo(FP8[code])
    mant = {"F8_E4M3": 3, "F8_E5M2": 2}[code]
    e = torch.floor(torch.log2(x.abs().clamp(min=info.smallest_normal)))
    return torch.exp2(e - mant)


@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E5M2"])
def test_fp8_merge_is_the_float32_merge_rounded_once_by_torch(tmp_path, code):
    state = tiny_llama().state_dict()
    base8 = {k: (v.to(FP8[code]) if is_linear(k) else v) for k, v in state.items()}
    decoded = {k: v.float() for k, v in base8.items()}
    save_base(base8, tmp_path / "fp8.safetensors")
    save_base(decoded, tmp_path / "f32.safetensors")
    adapter, oracle, _ = peft_oracle(decoded, TARGETS, std=0.2)

    r8 = merge(tmp_path / "fp8.safetensors", [adapter], tmp_path / "o8.safetensors", device="cpu")
    merge(tmp_path / "f32.safetensors", [adapter], tmp_path / "o32.safetensors", device="cpu")
    out8, out32 = load_file(tmp_path / "o8.safetensors"), load_file(tmp_path / "o32.safetensors")
    touched = [k for k in base8 if any(f".{t}." in k for t in TARGETS)]
    assert len(touched) == 6 and r8.merged_tensors == 6
    for key, b in base8.items():
        assert out8[key].dtype == b.dtype
        if key in touched:
            # bit-exact: the float32 merge, cast once by torch
            assert torch.equal(out8[key].view(torch.uint8), out32[key].to(FP8[code]).view(torch.uint8)), key
            # and that is round-to-nearest of the exact result: within half a float8 step of PEFT's float64 merge
            got, exact = out8[key].double(), oracle[key]
            assert bool(((got - exact).abs() <= 0.5 * fp8_ulp(exact, code) * (1 + 1e-5) + 1e-7).all()), key
        else:
            assert raw(tmp_path / "o8.safetensors", key) == raw(tmp_path / "fp8.safetensors", key), key
    assert r8.quantized == {FP8[code].__repr__().removeprefix("torch."): sum(map(is_linear, base8))}


def test_kept_update_figure_against_an_independent_computation(tmp_path):
    """kept = ‖Q(W+λΔW) − W‖ / ‖λΔW‖ per module, with ΔW from PEFT's get_delta_weight and Q torch's cast."""
    state = tiny_llama().state_dict()
    base8 = {k: (v.to(torch.float8_e4m3fn) if is_linear(k) else v) for k, v in state.items()}
    decoded = {k: v.float() for k, v in base8.items()}
    save_base(base8, tmp_path / "fp8.safetensors")
    strength = 0.003  # small: most of the update is under half a float8 step (W ~ 0.02, step ~ 0.002)
    adapter, _, deltas = peft_oracle(decoded, TARGETS, strength=strength, std=0.2)
    result = merge(tmp_path / "fp8.safetensors", [adapter], tmp_path / "o.safetensors", strength, device="cpu")
    records = {r["tensor"]: r for r in result.kept["tensors"]}
    assert set(records) == set(deltas)
    updates, kepts = [], []
    for key, delta in deltas.items():
        w = decoded[key].double()
        q = (w + delta).float().to(torch.float8_e4m3fn).double()
        kept = float((q - w).norm() / delta.norm())
        aligned = float(((q - w) * delta).sum() / delta.norm() ** 2)
        assert records[key]["kept"] == pytest.approx(kept, rel=1e-5)
        assert records[key]["aligned"] == pytest.approx(aligned, rel=1e-5, abs=1e-7)
        updates.append(float(delta.norm()) ** 2)
        kepts.append(float((q - w).norm()) ** 2)
    assert result.kept["overall"] == pytest.approx(math.sqrt(sum(kepts) / sum(updates)), rel=1e-5)
    # entries whose change passes half a step jump a whole step: the norm ratio stays high (0.92 here)
    # while the update's direction is half lost; the warning looks at both
    assert result.kept["overall_aligned"] < 0.8 < result.kept["overall"]
    assert any("kept under 80%" in w for w in result.warnings)
    assert result.to_json()["kept_update"]["below_threshold"]


def test_fp8_e4m3_overflow_is_clipped_and_reported(tmp_path):
    base = {"w.weight": torch.full((8, 8), 416.0).to(torch.float8_e4m3fn)}
    save_base(base, tmp_path / "b.safetensors")
    ad = Adapter(source_format=None)
    ad.add(LoraModule("model", "w", "lora", "linear", {"down": torch.ones(1, 8), "up": torch.full((8, 1), 64.0)},
                      alpha=1.0))
    result = merge(tmp_path / "b.safetensors", [ad], tmp_path / "o.safetensors", device="cpu")
    out = load_file(tmp_path / "o.safetensors")["w.weight"].float()
    assert torch.equal(out, torch.full((8, 8), 448.0))  # torch's cast saturates e4m3fn
    assert result.kept["saturated"] == 64 and any("clipped" in w for w in result.warnings)


# ---------------------------------------------------------------- stochastic rounding


def neighbours(x: torch.Tensor, code: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The float8 values next to each x towards and away from zero (equal when x is one), from bit patterns."""
    dtype = FP8[code]
    a = x.abs()
    near = a.to(dtype)  # positive values are ordered like their bit patterns
    bits = near.view(torch.uint8).to(torch.int16)
    lo_bits = torch.where(near.float() <= a, bits, bits - 1)
    hi_bits = torch.where(near.float() == a, lo_bits, lo_bits + 1)
    lo = lo_bits.to(torch.uint8).view(dtype).float()
    hi = hi_bits.to(torch.uint8).view(dtype).float()
    return lo.copysign(x), hi.copysign(x)


@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E5M2"])
def test_stochastic_rounding_picks_a_neighbour_with_the_right_probability(code):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, generator=gen) * 3
    lo, hi = neighbours(x, code)
    outs = [stochastic_fp8(x, code, torch.Generator().manual_seed(s)).float() for s in range(100)]
    for o in outs[:5]:
        assert bool(((o == lo) | (o == hi)).all())
    frac_up = torch.stack([(o == hi) & (hi != lo) for o in outs]).double().mean(0)
    p = torch.where(hi != lo, (x.abs() - lo.abs()) / (hi.abs() - lo.abs()), torch.zeros_like(x)).double()
    # 100 draws per entry: observed − p has σ ≤ 0.5/√100 per entry, ≤ 0.5/√(2048·100) in the mean
    assert abs(float((frac_up - p).mean())) < 6 * 0.5 / math.sqrt(2048 * 100)
    assert float((frac_up - p).abs().max()) < 6 * 0.5 / math.sqrt(100)


def test_stochastic_merge_is_deterministic_per_key_and_seed(tmp_path):
    w = torch.ones(64, 64).to(torch.float8_e4m3fn)
    save_base({"a.weight": w, "b.weight": w.clone()}, tmp_path / "b.safetensors")
    ad = Adapter(source_format=None)
    for name in ("a", "b"):  # ΔW = 0.03 everywhere: 1.03 lies between 1.0 and 1.125
        ad.add(LoraModule("model", name, "lora", "linear", {"down": torch.full((1, 64), 0.1),
                                                            "up": torch.full((64, 1), 0.3)}, alpha=1.0))
    outs = {}
    for seed, name in ((7, "x"), (7, "y"), (8, "z")):
        merge(tmp_path / "b.safetensors", [ad], tmp_path / f"{name}.safetensors", device="cpu",
              rounding="stochastic", seed=seed)
        outs[name] = load_file(tmp_path / f"{name}.safetensors")
    x, y, z = outs["x"], outs["y"], outs["z"]
    assert torch.equal(x["a.weight"].view(torch.uint8), y["a.weight"].view(torch.uint8))  # same seed, same bytes
    assert not torch.equal(x["a.weight"].view(torch.uint8), x["b.weight"].view(torch.uint8))  # seeded per key
    assert not torch.equal(x["a.weight"].view(torch.uint8), z["a.weight"].view(torch.uint8))
    values = x["a.weight"].float()
    assert set(values.unique().tolist()) == {1.0, 1.125}
    up = float((values == 1.125).double().mean())  # P(up) = 0.03 / 0.125 = 0.24, σ ≈ 0.0067 over 4096 entries
    assert abs(up - 0.24) < 0.03
    assert Rounding("stochastic", 7).seed == 7


# ---------------------------------------------------------------- scaled float8


def _scaled_base(layout: str, code: str = "F8_E4M3"):
    """A tiny LLaMA state with its linear weights in one scaled-float8 layout; the decoded float32 state."""
    state = tiny_llama().state_dict()
    out, decoded = {}, {}
    for key, v in state.items():
        if not is_linear(key):
            out[key] = decoded[key] = v
            continue
        base = key[: -len(".weight")]
        if layout == "comfy":
            q, s = comfy_scaled(v, code)
            out[key], out[base + ".scale_weight"] = q, s
            out[base + ".scale_input"] = torch.tensor(1.0)
        elif layout == "comfy_quant":
            q, s = comfy_scaled(v, code)
            out[key], out[base + ".weight_scale"] = q, s
            out[base + ".comfy_quant"] = comfy_quant_marker(str(FP8[code]).removeprefix("torch."))
            out[base + ".input_scale"] = torch.tensor(0.5)
        else:  # musubi tensor / channel / block, scale in the weight's dtype (bf16 here)
            q, s = musubi_scaled(v.to(torch.bfloat16), layout, code)
            out[key], out[base + ".scale_weight"] = q, s
        scale = out.get(base + ".scale_weight", out.get(base + ".weight_scale"))
        decoded[key] = scaled_decode(out[key], scale).float()
    if layout == "comfy":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8[code])
    return out, decoded


SCALED = ["comfy", "comfy_quant", "tensor", "channel", "block"]


@pytest.mark.parametrize("layout", SCALED)
def test_scaled_fp8_merge_recomputes_the_scale_and_stays_within_one_step(tmp_path, layout):
    base, decoded = _scaled_base(layout)
    save_base(base, tmp_path / "b.safetensors")
    f = SafetensorsFile(tmp_path / "b.safetensors")
    assert len(layout_of(f).entries) == sum(map(is_linear, base))
    # a large update: it pushes the amax past the old scale (reusing that scale would saturate)
    adapter, oracle, _ = peft_oracle(decoded, TARGETS, std=0.5)
    result = merge(tmp_path / "b.safetensors", [adapter], tmp_path / "o.safetensors", device="cpu")
    out = load_file(tmp_path / "o.safetensors")
    assert set(out) == set(base)
    scale_role = ".weight_scale" if layout == "comfy_quant" else ".scale_weight"
    fmax = 448.0
    saturating_before = 0
    touched = {k for k in base if k.endswith(".weight") and any(f".{t}." in k for t in TARGETS)}
    rescaled = {k[: -len(".weight")] + scale_role for k in touched}
    for key in base:
        if key in rescaled:
            continue  # checked with its weight
        if key in touched:
            stem = key[: -len(".weight")]
            old_s, new_s = base[stem + scale_role], out[stem + scale_role]
            assert new_s.dtype == old_s.dtype and new_s.shape == old_s.shape
            exact = oracle[key]
            got = scaled_decode(out[key], new_s)
            # within one float8 step of W + ΔW everywhere (the step at that value, times the scale)
            step = fp8_ulp(exact / _broadcast(new_s.double(), exact), "F8_E4M3") * _broadcast(new_s.double(), exact)
            assert bool(((got - exact).abs() <= step).all()), key
            # never saturates: every |W'| fits under the new scale; the old one would have clipped
            assert bool((exact.abs() <= fmax * _broadcast(new_s.double(), exact) * (1 + 1e-6)).all()), key
            saturating_before += int((exact.abs() > fmax * _broadcast(old_s.double(), exact)).sum())
        else:  # untouched tensors and markers: byte for byte
            assert raw(tmp_path / "o.safetensors", key) == raw(tmp_path / "b.safetensors", key), key
    assert saturating_before > 0
    assert result.kept is not None and result.kept["saturated"] == 0


def _broadcast(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 3:
        return scale.expand(scale.shape[0], scale.shape[1], like.shape[1] // scale.shape[1]).reshape(like.shape)
    return scale


def test_scaled_layouts_are_named_by_info(tmp_path):
    names = {}
    for layout in ("comfy", "comfy_quant", "block"):
        base, _ = _scaled_base(layout)
        save_base(base, tmp_path / f"{layout}.safetensors")
        report = inspect_checkpoint(tmp_path / f"{layout}.safetensors")
        names[layout] = report.quantization
        assert report.parameter_count == sum(v.numel() for k, v in base.items()
                                             if not k.endswith(("scale_weight", "scale_input", "weight_scale",
                                                                "input_scale", "comfy_quant", "scaled_fp8")))
    assert names["comfy"] == {"ComfyUI scaled_fp8: float8_e4m3fn × tensor scale": 14}
    assert names["comfy_quant"] == {"ComfyUI comfy_quant: float8_e4m3fn × tensor scale": 14}
    assert names["block"] == {"kohya/musubi fp8_scaled: float8_e4m3fn × block of 16 scale": 14}


def test_unsupported_comfy_quant_format_is_named_and_refused(tmp_path):
    base = {"a.weight": torch.zeros(8, 4, dtype=torch.uint8), "a.weight_scale": torch.ones(8, 1),
            "a.comfy_quant": comfy_quant_marker("nvfp4")}
    save_base(base, tmp_path / "b.safetensors")
    assert inspect_checkpoint(tmp_path / "b.safetensors").quantization == {"ComfyUI comfy_quant: nvfp4": 1}
    ad = Adapter(source_format=None)
    ad.add(LoraModule("model", "a", "lora", "linear", {"down": torch.ones(1, 8), "up": torch.ones(8, 1)}, alpha=1.0))
    with pytest.raises(FormatError, match="nvfp4"):
        merge(tmp_path / "b.safetensors", [ad], tmp_path / "o.safetensors", device="cpu")
    assert not (tmp_path / "o.safetensors").exists()


def test_dtype_writes_scaled_fp8_dequantized_without_its_scales(tmp_path):
    base, decoded = _scaled_base("comfy")
    save_base(base, tmp_path / "b.safetensors")
    adapter, oracle, _ = peft_oracle(decoded, TARGETS)
    merge(tmp_path / "b.safetensors", [adapter], tmp_path / "o.safetensors", device="cpu", dtype="bf16")
    out = load_file(tmp_path / "o.safetensors")
    assert set(out) == set(decoded)  # scales and markers dropped
    for key, v in out.items():
        assert v.dtype == torch.bfloat16
        assert torch.allclose(v.double(), oracle[key], rtol=2 ** -8, atol=1e-30), key  # one bf16 step
