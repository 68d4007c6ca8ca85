"""The merge command end to end: dtypes and sharding kept, untouched bytes identical, --dtype,
row-sliced targets, and every refusal leaves nothing behind."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from merge_oracles import adapter_from_peft, relative_error, save_base
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import randomize_lora, tiny_llama

from loratool.adapter import Adapter, LoraModule
from loratool.cli import main
from loratool.errors import MatchError, NonFiniteError, OutputError
from loratool.io import checkpoint as ckmod
from loratool.io.safetensors_file import SafetensorsFile
from loratool.ops.merge import merge

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture()
def peft_case(tmp_path):
    """A float32 tiny_llama saved as fp16 (single file) and sharded, its PEFT adapter folder and oracle."""
    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "adapter")
    adapter = adapter_from_peft(pm)
    base = {k: v.detach().clone() for k, v in pm.get_base_model().state_dict().items() if "lora_" not in k}
    base = {k.replace(".base_layer", ""): v for k, v in base.items()}
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return {"adapter_dir": tmp_path / "adapter", "adapter": adapter, "base": base, "expected": expected}


def _json_run(args, capsys):
    code = main(args + ["--json"])
    captured = capsys.readouterr()
    return code, captured


def test_fp16_base_keeps_dtype_header_and_untouched_bytes(tmp_path, peft_case, capsys):
    base16 = {k: v.half() for k, v in peft_case["base"].items()}
    base_path = save_base(base16, tmp_path / "model.safetensors", {"format": "pt", "origin": "test"})
    out = tmp_path / "out.safetensors"
    code, cap = _json_run(["merge", str(base_path), str(peft_case["adapter_dir"]), "-o", str(out)], capsys)
    assert code == 0, cap.err
    summary = json.loads(cap.out)
    assert summary["matched"] == {"model": 6} and summary["matched_total"] == 6 and summary["unmatched"] == []
    assert summary["merged_tensors"] == 6 and summary["copied_tensors"] == len(base16) - 6
    assert summary["peak_rss_mb"] > 0 and summary["seconds"] >= 0
    ours = load_file(str(out))
    src, dst = SafetensorsFile(base_path), SafetensorsFile(out)
    assert src.header.data_offset == dst.header.data_offset
    assert base_path.read_bytes()[: src.header.data_offset] == out.read_bytes()[: dst.header.data_offset]
    # Oracle: PEFT's merge of the same adapter into the fp16 weights as stored, in float64; the file
    # can differ from it only by the final rounding to fp16 (measured: 2 of 6144 entries differ from the
    # correctly rounded value, by at most 0.51 ulp of the exact result; bound: 1 ulp)
    from peft import PeftModel

    stored = tiny_llama().double()
    stored.load_state_dict({k: v.double() for k, v in base16.items()})
    exact = PeftModel.from_pretrained(stored, str(peft_case["adapter_dir"])).merge_and_unload().state_dict()
    for key in base16:
        assert ours[key].dtype == torch.float16
        if any(t in key for t in TARGETS):
            want = exact[key]
            ulp = torch.finfo(torch.float16).eps * want.abs().clamp(min=2.0 ** -14)
            assert bool(((ours[key].double() - want).abs() <= ulp).all()), key
        else:
            assert src.raw_bytes(key) == dst.raw_bytes(key), key


def test_sharded_base_keeps_shards_and_index(tmp_path, peft_case):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 1
    out = tmp_path / "out"
    result = merge(tmp_path / "base", [peft_case["adapter"]], out, device="cpu")
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = next((tmp_path / "base").glob("*.index.json")).name
    assert (out / index).read_bytes() == (tmp_path / "base" / index).read_bytes()
    assert (out / "config.json").read_bytes() == (tmp_path / "base" / "config.json").read_bytes()
    assert result.matched == {"model": 6}
    for shard in shards:
        before, after = load_file(str(tmp_path / "base" / shard)), load_file(str(out / shard))
        assert before.keys() == after.keys()
        for key in before:
            if key in peft_case["expected"] and any(t in key for t in TARGETS):
                assert relative_error(after[key], peft_case["expected"][key], before[key]) < 1e-5
            else:
                assert torch.equal(before[key], after[key])


def test_dtype_option_converts_float_tensors_and_rewrites_sharded_index(tmp_path, peft_case):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    out = tmp_path / "out"
    merge(tmp_path / "base", [peft_case["adapter"]], out, dtype="bf16", device="cpu")
    index = json.loads(next(out.glob("*.index.json")).read_text())
    total = 0
    for shard in set(index["weight_map"].values()):
        for key, value in load_file(str(out / shard)).items():
            assert value.dtype == torch.bfloat16, key
            total += value.numel() * 2
    assert index["metadata"]["total_size"] == total
    # config.json says what the files now hold (transformers reads it back as bfloat16); nothing else changes
    from transformers import AutoConfig

    before = json.loads((tmp_path / "base" / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert before["dtype"] == "float32" and after["dtype"] == "bfloat16"
    assert {k: v for k, v in after.items() if k != "dtype"} == {k: v for k, v in before.items() if k != "dtype"}
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16


def test_row_slice_targets_get_delta_on_their_rows_only(tmp_path, monkeypatch):
    fused = torch.randn(6, 4, dtype=torch.float64)
    path = save_base({"te.in_proj_weight": fused}, tmp_path / "sd.safetensors")
    fake = types.ModuleType("loratool.arch.checkpoints")
    fake.canonical_targets = lambda keys: {("text_encoder", "k_proj.weight"): ("te.in_proj_weight", (2, 4))}
    monkeypatch.setitem(sys.modules, "loratool.arch.checkpoints", fake)
    monkeypatch.setattr(ckmod.importlib.util, "find_spec", lambda name: object())
    down, up = torch.randn(1, 4, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64)
    adapter = Adapter()
    adapter.add(LoraModule("text_encoder", "k_proj", tensors={"down": down, "up": up}, alpha=1.0))
    out = tmp_path / "o.safetensors"
    merge(path, [adapter], out, 0.5, device="cpu")
    got = load_file(str(out))["te.in_proj_weight"]
    assert torch.equal(got[:2], fused[:2]) and torch.equal(got[4:], fused[4:])
    assert torch.allclose(got[2:4], fused[2:4] + 0.5 * (up @ down), rtol=0, atol=1e-12)


def _refused(tmp_path, fn, exc, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(exc, match=match):
        fn()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp left


def test_refusals_write_nothing(tmp_path, peft_case):
    base_path = save_base(peft_case["base"], tmp_path / "model.safetensors")
    out = tmp_path / "out.safetensors"
    good = peft_case["adapter"]
    # zero matches
    other = Adapter()
    other.add(LoraModule("model", "nothing.here", tensors={"down": torch.ones(1, 2), "up": torch.ones(2, 1)}))
    _refused(tmp_path, lambda: merge(base_path, [other], out), MatchError, "no adapter module matches")
    # unmatched with --strict
    mixed = Adapter(modules=dict(good.modules))
    mixed.add(LoraModule("model", "model.layers.9.mlp.x", tensors={"down": torch.ones(1, 2), "up": torch.ones(2, 1)}))
    _refused(tmp_path, lambda: merge(base_path, [mixed], out, strict=True), MatchError, "model.layers.9.mlp.x")
    # shape mismatch names module and both shapes
    bad = Adapter()
    bad.add(LoraModule("model", "model.layers.0.self_attn.q_proj",
                       tensors={"down": torch.ones(2, 5), "up": torch.ones(32, 2)}))
    _refused(tmp_path, lambda: merge(base_path, [bad], out), MatchError,
             r"model.layers.0.self_attn.q_proj.*\(32, 5\).*\(32, 32\)")
    # NaN in an adapter, then a result that overflows fp16
    nan = Adapter()
    nan.add(LoraModule("model", "model.layers.0.self_attn.q_proj",
                       tensors={"down": torch.full((1, 32), float("nan")), "up": torch.ones(32, 1)}))
    _refused(tmp_path, lambda: merge(base_path, [nan], out), NonFiniteError, "model.layers.0.self_attn.q_proj")
    huge = Adapter()
    huge.add(LoraModule("model", "model.layers.0.self_attn.q_proj",
                        tensors={"down": torch.full((1, 32), 1e30), "up": torch.full((32, 1), 1e30)}))
    _refused(tmp_path, lambda: merge(base_path, [huge], out), NonFiniteError, "q_proj")
    # output equal to the input; existing output without --force
    _refused(tmp_path, lambda: merge(base_path, [good], base_path), OutputError, "input")
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="force"):
        merge(base_path, [good], out)
    assert out.read_bytes() == b"old"
    merge(base_path, [good], out, force=True)
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(str(out))


def test_allow_nonfinite_writes_it(tmp_path, peft_case):
    base_path = save_base(peft_case["base"], tmp_path / "model.safetensors")
    nan = Adapter()
    nan.add(LoraModule("model", "model.layers.0.self_attn.q_proj",
                       tensors={"down": torch.full((1, 32), float("nan")), "up": torch.ones(32, 1)}))
    out = tmp_path / "o.safetensors"
    merge(base_path, [nan], out, allow_nonfinite=True)
    assert torch.isnan(load_file(str(out))["model.layers.0.self_attn.q_proj.weight"]).all()


def test_cli_warns_on_unmatched_and_rejects_bad_alpha_count(tmp_path, peft_case, capsys):
    base = {k: v for k, v in peft_case["base"].items() if "layers.1." not in k}
    base_path = save_base(base, tmp_path / "model.safetensors")
    out = tmp_path / "o.safetensors"
    a = str(peft_case["adapter_dir"])
    assert main(["merge", str(base_path), a, a, "--alpha", "1", "--alpha", "2", "--alpha", "3", "-o", str(out)]) == 2
    assert "--alpha given 3 times for 2 LoRAs" in capsys.readouterr().err
    assert main(["merge", str(base_path), a, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "3 adapter modules match no base weight" in err and "model.layers.1.self_attn.q_proj" in err
    assert main(["merge", str(base_path), a, "-o", str(out), "--strict", "--force"]) == 2
    assert "--strict" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_prefix_rule_places_adapters_trained_on_the_inner_model(tmp_path, peft_case):
    """An adapter named ``layers.0...`` (trained on LlamaModel) merges into ``model.layers.0...`` keys."""
    base_path = save_base(peft_case["base"], tmp_path / "model.safetensors")
    inner = Adapter()
    for m in peft_case["adapter"]:
        inner.add(LoraModule(m.component, m.path.removeprefix("model."), tensors=m.tensors, alpha=m.alpha))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ra = merge(base_path, [inner], a)
    merge(base_path, [peft_case["adapter"]], b)
    assert ra.matched == {"model": 6}
    assert a.read_bytes() == b.read_bytes()
