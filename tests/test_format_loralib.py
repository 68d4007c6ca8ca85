"""loralib layout against loralib itself: ΔW equals what ``model.eval()`` merges; round trips are bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import loralib as lora
import pytest
import torch
from loralib_models import SIDECAR, merged_deltas, tiny_loralib

from loratool import formats
from loratool.delta import delta_weight, merge_weight
from loratool.errors import FormatError, OutputError
from loratool.formats import loralib as fmt
from loratool.formats.source import open_source


def _save(tmp_path: Path, model, name: str = "lora.pt", sidecar: dict | None = SIDECAR) -> Path:
    path = tmp_path / name
    sd = lora.lora_state_dict(model)
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    if sidecar is not None:
        (tmp_path / (name + ".json")).write_text(json.dumps(sidecar))
    return path


def _read(path: Path, config=None):
    src = open_source(path, config=config)
    return fmt.read(src, formats.ReadOptions()), src


@pytest.mark.parametrize("name", ["lora.pt", "lora.safetensors"])
def test_delta_matches_loralib_merge(tmp_path, name):
    model = tiny_loralib(dtype=torch.float64)
    path = _save(tmp_path, model, name)
    src = open_source(path)
    assert fmt.detect(src)
    adapter = fmt.read(src, formats.ReadOptions())
    oracle = merged_deltas(model)
    assert {m.path for m in adapter} == set(oracle)
    for module in adapter:
        assert module.component == "model"
        assert not module.hints.get("alpha_assumed")
        got = delta_weight(module, dtype=torch.float64, shape=tuple(oracle[module.path].shape))
        torch.testing.assert_close(got, oracle[module.path], rtol=1e-12, atol=1e-12)
    merged = adapter.modules[("model", "h.0.attn.c_attn")]
    assert merged.rank == 4 and merged.hints["enable_lora"] == [True, False, True]
    assert merged.scale == pytest.approx(5 / 2)
    assert adapter.modules[("model", "wte")].layer == "embedding"


def test_merge_weight_matches_loralib_eval(tmp_path):
    model = tiny_loralib(dtype=torch.float64)
    path = _save(tmp_path, model)
    adapter, _ = _read(path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lora.LoRALayer)}
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    model.eval()
    for name, layer in layers.items():
        got = merge_weight(before[name], adapter.modules[("model", name)], dtype=torch.float64)
        torch.testing.assert_close(got, layer.weight.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("out_name", ["back.pt", "back.safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_bit_exact(tmp_path, out_name, dtype):
    model = tiny_loralib(dtype=dtype)
    original = lora.lora_state_dict(model)
    path = _save(tmp_path, model)
    adapter, _ = _read(path)
    out = tmp_path / out_name
    written = fmt.write(adapter, out, formats.WriteOptions(inputs=(path,)))
    assert written == [out, tmp_path / (out_name + ".json")]
    back, _ = _read(out)
    if out_name.endswith(".pt"):
        saved = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        saved = load_file(str(out))
    # torch.save keeps the key order; safetensors stores keys sorted.
    assert list(saved) == (list(original) if out_name.endswith(".pt") else sorted(original))
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    side = json.loads((tmp_path / (out_name + ".json")).read_text())
    for path_, entry in SIDECAR["modules"].items():
        for k, v in entry.items():
            assert side["modules"][path_][k] == v, (path_, k)
    assert side["modules"]["h.0.mlp.fc"]["lora_alpha"] == 16
    # and the result loads back into loralib, giving the same merged model
    fresh = tiny_loralib(seed=5, dtype=dtype)
    fresh.load_state_dict(saved, strict=False)
    for k, v in lora.lora_state_dict(fresh).items():
        assert torch.equal(v, original[k])
    for module in back:
        ref = adapter.modules[module.key]
        assert module.alpha == ref.alpha and module.layer == ref.layer and module.fan_in_fan_out == ref.fan_in_fan_out


def test_no_sidecar_assumes_alpha_equals_rank(tmp_path):
    model = tiny_loralib(dtype=torch.float64)
    sd = {k: v for k, v in lora.lora_state_dict(model).items() if "c_attn" not in k}
    path = tmp_path / "plain.pt"
    torch.save(sd, path)
    adapter, _ = _read(path)
    oracle = merged_deltas(model)
    for module in adapter:
        assert module.hints["alpha_assumed"] and module.scale == 1.0
        scaling = dict(model.named_modules())[module.path].scaling
        got = delta_weight(module, dtype=torch.float64)
        if module.path == "h.0.mlp.proj":  # fan_in_fan_out is unknown without a sidecar
            got = got.T
        torch.testing.assert_close(got * scaling, oracle[module.path], rtol=1e-12, atol=1e-12)
    # The embedding was recognised by its name, with no sidecar to say so.
    assert adapter.modules[("model", "wte")].layer == "embedding"
    # proj therefore reads as a plain [out, in] Linear.
    assert not adapter.modules[("model", "h.0.mlp.proj")].fan_in_fan_out


def test_merged_linear_without_enable_lora_is_an_actionable_error(tmp_path):
    model = tiny_loralib()
    path = _save(tmp_path, model, sidecar=None)
    with pytest.raises(FormatError, match="MergedLinear with 2 LoRA groups.*enable_lora"):
        _read(path)


def test_explicit_config_and_sidecar_errors(tmp_path):
    model = tiny_loralib()
    path = _save(tmp_path, model, sidecar=None)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(SIDECAR))
    adapter, _ = _read(path, config=cfg)
    assert adapter.modules[("model", "h.0.attn.c_attn")].hints["enable_lora"] == [True, False, True]
    bad = dict(SIDECAR, modules={**SIDECAR["modules"], "h.9.nothing": {"r": 2}})
    cfg.write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="h.9.nothing"):
        _read(path, config=cfg)
    cfg.write_text(json.dumps(dict(SIDECAR, r="four")))
    with pytest.raises(FormatError, match="positive integer"):
        _read(path, config=cfg)
    wrong_r = {"modules": {**SIDECAR["modules"], "h.0.mlp.fc": {"r": 8}}}
    cfg.write_text(json.dumps(wrong_r))
    with pytest.raises(FormatError, match="r = 8"):
        _read(path, config=cfg)
    conv = {"modules": {**SIDECAR["modules"], "h.0.mlp.fc": {"layer": "conv"}}}
    cfg.write_text(json.dumps(conv))
    with pytest.raises(FormatError, match="ConvLoRA"):
        _read(path, config=cfg)


def test_missing_half_and_detection(tmp_path):
    path = tmp_path / "half.pt"
    torch.save({"fc.lora_A": torch.zeros(2, 4)}, path)
    with pytest.raises(FormatError, match="no lora_B"):
        _read(path)
    peft_like = tmp_path / "peft_like.pt"
    torch.save({"fc.lora_A.weight": torch.zeros(2, 4), "fc.lora_B.weight": torch.zeros(4, 2)}, peft_like)
    assert not fmt.detect(open_source(peft_like))


def test_write_refuses_what_loralib_cannot_hold(tmp_path):
    from loratool.adapter import Adapter, LoraModule

    conv = LoraModule("model", "conv", layer="conv",
                      tensors={"down": torch.zeros(2, 3, 3, 3), "up": torch.zeros(4, 2, 1, 1)})
    with pytest.raises(FormatError, match="conv"):
        fmt.write(Adapter(modules={conv.key: conv}), tmp_path / "x.pt", formats.WriteOptions())
    dora = LoraModule("model", "fc", tensors={"down": torch.zeros(2, 3), "up": torch.zeros(4, 2)},
                      magnitude=torch.ones(4))
    with pytest.raises(FormatError, match="DoRA"):
        fmt.write(Adapter(modules={dora.key: dora}), tmp_path / "x.pt", formats.WriteOptions())
    with pytest.raises(OutputError, match=r"\.pt"):
        fmt.write(Adapter(), tmp_path / "x.txt", formats.WriteOptions())
    assert not list(tmp_path.iterdir())


def test_multi_component_and_rslora_write(tmp_path):
    """Several components get key prefixes; rsLoRA / alpha-less scales become loralib lora_alpha = scale·r."""
    from loratool.adapter import Adapter, LoraModule

    gen = torch.Generator().manual_seed(0)
    a = LoraModule("unet", "down_blocks.0.proj_in", alpha=8.0, rslora=True,
                   tensors={"down": torch.randn(4, 6, generator=gen), "up": torch.randn(5, 4, generator=gen)})
    b = LoraModule("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj",
                   tensors={"down": torch.randn(2, 6, generator=gen), "up": torch.randn(6, 2, generator=gen)})
    adapter = Adapter(modules={a.key: a, b.key: b}, metadata={"ss_note": "x"})
    out = tmp_path / "multi.pt"
    fmt.write(adapter, out, formats.WriteOptions())
    back, _ = _read(out)
    assert set(back.modules) == {a.key, b.key}
    assert back.metadata["ss_note"] == "x"
    for module in back:
        ref = adapter.modules[module.key]
        torch.testing.assert_close(delta_weight(module, dtype=torch.float64), delta_weight(ref, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)
    # A single non-"model" component keeps its name through the sidecar, without key prefixes.
    single = Adapter(modules={a.key: a})
    out2 = tmp_path / "single.safetensors"
    fmt.write(single, out2, formats.WriteOptions())
    assert json.loads((tmp_path / "single.safetensors.json").read_text())["component"] == "unet"
    back2, src2 = _read(out2)
    assert list(back2.modules) == [a.key]
    assert src2.keys == ["down_blocks.0.proj_in.lora_A", "down_blocks.0.proj_in.lora_B"]
