"""Merging into bitsandbytes NF4 / FP4 / int8 bases (transformers-serialized).

Oracles: bitsandbytes itself (its CPU backend's ``dequantize_4bit`` / ``int8_vectorwise_dequant`` /
``quantize_4bit`` / ``int8_vectorwise_quant``, and its modules' ``state_dict`` as the serialized
layout), PEFT's ``merge_and_unload`` on the dequantized model, and transformers loading the output.
"""

from __future__ import annotations

import json

import pytest
import torch
from quant_bases import LINEARS, bnb_linear_state, is_linear, peft_oracle, wide_llama
from safetensors.torch import load_file, save_file

from loratool.errors import MatchError, UsageError
from loratool.io.checkpoint import open_checkpoint
from loratool.io.codecs import layout_of, read_weight
from loratool.io.safetensors_file import SafetensorsFile
from loratool.ops.inspect import inspect_checkpoint
from loratool.ops.merge import merge

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional
TARGETS = ["q_proj", "v_proj", "down_proj"]


def quantized_state(kind: str, nested: bool = True, seed: int = 0) -> tuple[dict, dict]:
    """(serialized state of a tiny bf16 LLaMA with every linear layer in ``kind``, the bf16 state)."""
    state = {k: v.to(torch.bfloat16) for k, v in wide_llama(seed).state_dict().items()}
    out = {}
    for key, v in state.items():
        if is_linear(key):
            stem = key[: -len("weight")]
            out.update({stem + k: t for k, t in bnb_linear_state(v, kind, nested).items()})
        else:
            out[key] = v
    return out, state


def write_folder(folder, tensors: dict, quant: dict | None) -> None:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = wide_llama().config.to_dict()
    config["torch_dtype"] = "bfloat16"
    if quant is not None:
        config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))


def bnb_state(tensors: dict, key: str):
    prefix = key + "."
    qs = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return F.QuantState.from_dict(qs, device=torch.device("cpu"))


@pytest.mark.parametrize(("kind", "nested"), [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)])
def test_dequantization_equals_bitsandbytes_bit_for_bit(tmp_path, kind, nested):
    tensors, _ = quantized_state(kind, nested)
    save_file(tensors, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    keys = [k for k in tensors if k.endswith(".weight") and any(f".{n}." in k for n in LINEARS)]
    assert set(layout_of(f).entries) == set(keys)
    for key in keys:
        ours = read_weight(f, key)
        assert ours.dtype == torch.float32
        if kind == "int8":
            ref = F.int8_vectorwise_dequant(tensors[key], tensors[key[: -len("weight")] + "SCB"])
            assert torch.equal(ours, ref), key
        else:
            ref = F.dequantize_4bit(tensors[key], bnb_state(tensors, key))  # in the state's dtype (bf16)
            assert ours.shape == ref.shape and torch.equal(ours.to(ref.dtype).view(torch.int16),
                                                           ref.view(torch.int16)), key
            assert torch.equal(ours, ref.float())


def test_short_rows_follow_the_default_backend_not_the_cpu_kernel():
    """bitsandbytes' CPU 4-bit kernel dequantizes rows shorter than a block (or not a whole number of
    blocks) wrongly: it restarts blocks at each row, while quantize_4bit (and its default / CUDA
    kernels) run blocks over the flattened tensor. loratool follows the quantizer: for a 32×32 weight
    it equals the default backend's _dequantize_4bit_compute, and the CPU kernel is farther from W."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    from loratool.io.codecs import Entry, Stored
    from loratool.io.codecs.bnb import BnB4

    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    state = qs.as_dict(packed=True)
    codec = BnB4(json.loads(bytes(state["quant_state.bitsandbytes__nf4"].tolist())))
    ours = codec.decode(Stored(q, {"absmax": state["absmax"], "quant_map": state["quant_map"]}),
                        Entry("w", codec, (32, 32)))
    with torch.compiler.set_stance("force_eager"):  # the function is wrapped in torch.compile: seconds to build
        default = _dequantize_4bit_compute(q.reshape(-1), qs.absmax, qs.code, 64, qs.shape, qs.dtype)
    cpu = F.dequantize_4bit(q, qs)
    assert torch.equal(ours, default)
    assert float((cpu - w).abs().max()) > 2 * float((ours - w).abs().max())


def test_info_names_the_bitsandbytes_kind(tmp_path):
    tensors, _ = quantized_state("nf4")
    save_file(tensors, tmp_path / "m.safetensors")
    report = inspect_checkpoint(tmp_path / "m.safetensors")
    assert report.quantization == {"bitsandbytes: nf4 (blocks of 64, nested absmax /256, bfloat16)": 14}
    assert report.parameter_count == sum(v.numel() for v in wide_llama().state_dict().values())


def test_merge_into_nf4_writes_a_plain_bf16_model_by_default(tmp_path):
    tensors, _ = quantized_state("nf4")
    write_folder(tmp_path / "nf4", tensors, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    decoded = {k: read_weight(SafetensorsFile(tmp_path / "nf4" / "model.safetensors"), k)
               for k in tensors if not layout_of(SafetensorsFile(tmp_path / "nf4" / "model.safetensors")).hidden(k)}
    adapter, oracle, _ = peft_oracle(decoded, TARGETS, model_fn=wide_llama)
    result = merge(tmp_path / "nf4", [adapter], tmp_path / "out", device="cpu")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(oracle)  # absmax, quant maps and states dropped
    for key, v in out.items():
        assert v.dtype == torch.bfloat16 and v.shape == oracle[key].shape
        assert torch.allclose(v.double(), oracle[key], rtol=2 ** -8, atol=0), key  # one bf16 step
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp_path / "out")  # a plain model transformers loads as it is
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16),
                       out["model.layers.0.self_attn.q_proj.weight"])
    assert result.kept["overall"] == pytest.approx(1.0, abs=0.05) and not result.warnings


def test_requantize_nf4_rereads_in_bitsandbytes_and_reports_the_loss(tmp_path):
    tensors, _ = quantized_state("nf4")
    save_file(tensors, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    decoded = {k: read_weight(f, k) for k in tensors if not layout_of(f).hidden(k)}
    adapter, _, deltas = peft_oracle(decoded, TARGETS, std=0.01, model_fn=wide_llama)
    result = merge(tmp_path / "m.safetensors", [adapter], tmp_path / "o.safetensors", device="cpu", requantize=True)
    out = load_file(tmp_path / "o.safetensors")
    assert set(out) == set(tensors)
    g = SafetensorsFile(tmp_path / "o.safetensors")
    for key, delta in deltas.items():
        ours = read_weight(g, key)
        state = bnb_state(out, key)
        assert torch.equal(ours, F.dequantize_4bit(out[key], state).float()), key  # bitsandbytes reads it back
        # the 4-bit codes are bitsandbytes' own choice for W + ΔW (its quantize_4bit, float32 input)
        codes, _ = F.quantize_4bit((decoded[key].double() + delta).float(), blocksize=64, quant_type="nf4",
                                   compress_statistics=True)
        assert float((codes != out[key]).float().mean()) < 2e-3, key
    for key in tensors:
        if not any(key.startswith(k[: -len("weight")]) for k in deltas):
            assert torch.equal(out[key], tensors[key]), key
    assert any("requantizing" in w for w in result.warnings)
    assert result.kept["overall_aligned"] < 0.8 and any("kept under" in w for w in result.warnings)


def test_requantize_int8_equals_bitsandbytes_quantizer(tmp_path):
    tensors, _ = quantized_state("int8")
    save_file(tensors, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    decoded = {k: read_weight(f, k) for k in tensors if not layout_of(f).hidden(k)}
    adapter, _, deltas = peft_oracle(decoded, TARGETS, model_fn=wide_llama)
    merge(tmp_path / "m.safetensors", [adapter], tmp_path / "o.safetensors", device="cpu", requantize=True)
    out = load_file(tmp_path / "o.safetensors")
    for key, delta in deltas.items():
        cb, scb, _ = F.int8_vectorwise_quant((decoded[key].double() + delta).float())
        stem = key[: -len("weight")]
        assert torch.allclose(out[stem + "SCB"], scb, rtol=1e-6)
        assert int((out[key].int() - cb.int()).abs().max()) <= 1 and float((out[key] != cb).float().mean()) < 2e-3
        assert torch.equal(out[stem + "weight_format"], tensors[stem + "weight_format"])


def test_base_16bit_pairs_the_4bit_base_with_its_original(tmp_path):
    tensors, bf16 = quantized_state("nf4")
    write_folder(tmp_path / "nf4", tensors, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    write_folder(tmp_path / "orig", bf16, None)
    adapter, _, _ = peft_oracle({k: v.float() for k, v in bf16.items()}, TARGETS, model_fn=wide_llama)
    merge(tmp_path / "nf4", [adapter], tmp_path / "paired", device="cpu", base_16bit=tmp_path / "orig")
    merge(tmp_path / "orig", [adapter], tmp_path / "direct", device="cpu")
    paired, direct = load_file(tmp_path / "paired" / "model.safetensors"), load_file(tmp_path / "direct" /
                                                                                      "model.safetensors")
    assert paired.keys() == direct.keys() and all(torch.equal(paired[k], direct[k]) for k in paired)

    _, other = quantized_state("nf4", seed=3)  # another model's weights, same names and shapes
    write_folder(tmp_path / "other", other, None)
    with pytest.raises(MatchError, match="original"):
        merge(tmp_path / "nf4", [adapter], tmp_path / "bad", device="cpu", base_16bit=tmp_path / "other")
    del bf16["model.layers.1.mlp.up_proj.weight"]
    write_folder(tmp_path / "short", bf16, None)
    with pytest.raises(MatchError, match="up_proj.weight missing"):
        merge(tmp_path / "nf4", [adapter], tmp_path / "bad", device="cpu", base_16bit=tmp_path / "short")
    with pytest.raises(UsageError, match="--requantize"):
        merge(tmp_path / "nf4", [adapter], tmp_path / "bad", device="cpu", requantize=True, dtype="bf16")
    assert not (tmp_path / "bad").exists()


def test_sharded_nf4_folder_gets_an_index_without_the_quantization_tensors(tmp_path):
    tensors, _ = quantized_state("nf4")
    folder = tmp_path / "nf4"
    folder.mkdir()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, folder / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    files = [p.file for p in open_checkpoint(folder).groups[0].parts]  # shards see each other's tensors
    decoded = {k: read_weight(f, k) for f in files for k in f.keys() if not layout_of(f).hidden(k)}
    assert any(e.where for f in files for e in layout_of(f).entries.values())  # a weight split from its state
    adapter, oracle, _ = peft_oracle(decoded, TARGETS, model_fn=wide_llama)
    result = merge(folder, [adapter], tmp_path / "out", device="cpu")
    assert result.dequantized == "bfloat16" and result.to_json()["dequantized"] == "bfloat16"
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(out_index["weight_map"]) == set(oracle)
    merged = {}
    for name in shards:
        merged.update(load_file(tmp_path / "out" / name))
    assert set(merged) == set(oracle)
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    with pytest.raises(UsageError, match="different shards"):  # the split weight is touched (v_proj)
        merge(folder, [adapter], tmp_path / "re", device="cpu", requantize=True)
    assert not (tmp_path / "re").exists()


def test_an_inconsistent_quant_state_is_named_and_refused(tmp_path):
    tensors, _ = quantized_state("nf4")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key + ".absmax"] = tensors[key + ".absmax"][:-1].clone()  # one block maximum short
    save_file(tensors, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert "inconsistent" in layout_of(f).entries[key].label
    decoded = {k: torch.zeros(v.shape) for k, v in wide_llama().state_dict().items()}
    adapter, _, _ = peft_oracle(decoded, ["q_proj"], model_fn=wide_llama)
    from loratool.errors import FormatError

    with pytest.raises(FormatError, match="block maxima"):
        merge(tmp_path / "m.safetensors", [adapter], tmp_path / "o.safetensors", device="cpu")
    assert not (tmp_path / "o.safetensors").exists()
