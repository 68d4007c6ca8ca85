"""PEFT layout against PEFT itself: scales, ΔW and merges equal PEFT's; round trips are bit-exact
and load back into ``PeftModel.from_pretrained`` with every key placed."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from tiny_models import randomize_lora, tiny_gpt2, tiny_llama, tiny_unet

from loratool import api, formats
from loratool.adapter import LoraModule
from loratool.delta import delta_bias, delta_weight, merge_weight
from loratool.errors import FormatError
from loratool.formats import peft as fmt
from loratool.formats.source import open_source

PREFIX = "base_model.model."


def _peft(factory, folder: Path, seed: int = 1, **cfg):
    """A float64 PEFT model with random adapter weights, saved to ``folder``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(factory().double(), LoraConfig(**cfg))
        randomize_lora(model, seed=seed)
        model.save_pretrained(folder)
    return model


def _lora_layers(model) -> dict[str, LoraLayer]:
    return {n[len(PREFIX):]: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _assert_matches_peft(adapter, model) -> None:
    """Rank, scale, ΔW and Δb of every module equal the PEFT layer's own (float64)."""
    layers = _lora_layers(model)
    assert {m.path for m in adapter} == set(layers)
    for module in adapter:
        layer = layers[module.path]
        assert module.rank == layer.r["default"]
        assert module.scale == pytest.approx(layer.scaling["default"], rel=1e-15)
        oracle = layer.get_delta_weight("default")
        got = delta_weight(module, dtype=torch.float64, shape=tuple(layer.get_base_layer().weight.shape))
        torch.testing.assert_close(got, oracle, rtol=1e-12, atol=1e-14)
        if "bias" in module.tensors:
            torch.testing.assert_close(delta_bias(module, dtype=torch.float64),
                                       layer.lora_B["default"].bias * layer.scaling["default"])


def _merged_state(model) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def _read(path: Path):
    return fmt.read(open_source(path), formats.ReadOptions())


def _load_peft(factory, folder: Path):
    """PeftModel.from_pretrained on a fresh float64 base; asserts every file key became a parameter
    and no adapter parameter was left without a file key."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(factory().double(), str(folder))
    file_sd = load_file(str(folder / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(file_sd)
    for k, v in file_sd.items():
        assert torch.equal(loaded[k], v), k
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft") / "llama"
    model = _peft(tiny_llama, folder, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                  rank_pattern={"layers.1.self_attn.q_proj": 2, "q_proj": 3},
                  alpha_pattern={"v_proj": 3, "up_proj": 5.5}, modules_to_save=["lm_head"])
    return folder, model


@pytest.fixture(scope="module")
def dora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft") / "dora"
    model = _peft(tiny_llama, folder, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "down_proj"],
                  use_dora=True)
    return folder, model


def test_read_patterns_modules_to_save(llama_dir):
    folder, model = llama_dir
    src = open_source(folder)
    assert fmt.detect(src)
    adapter = fmt.read(src, formats.ReadOptions())
    assert adapter.components == ["model"] and adapter.source_format == "peft"
    # first key in dict order wins: layers.1.q_proj -> 2, other q_proj -> 3
    assert adapter.modules[("model", "model.layers.1.self_attn.q_proj")].rank == 2
    assert adapter.modules[("model", "model.layers.0.self_attn.q_proj")].rank == 3
    assert adapter.modules[("model", "model.layers.0.mlp.up_proj")].alpha == 5.5
    _assert_matches_peft(adapter, model)
    assert set(adapter.extras) == {("model", "lm_head.weight")}
    torch.testing.assert_close(adapter.extras[("model", "lm_head.weight")],
                               model.base_model.model.lm_head.modules_to_save["default"].weight)
    assert adapter.config["model"]["modules_to_save"] == ["lm_head"]


def test_rslora_scale(tmp_path):
    model = _peft(tiny_llama, tmp_path / "a", r=4, lora_alpha=6, target_modules=["q_proj", "k_proj"],
                  use_rslora=True)
    adapter = _read(tmp_path / "a")
    assert all(m.rslora and m.scale == pytest.approx(6 / math.sqrt(4)) for m in adapter)
    _assert_matches_peft(adapter, model)


def test_dora_embedding_merge_equals_merge_and_unload(dora_dir):
    folder, model = dora_dir
    adapter = _read(folder)
    emb = adapter.modules[("model", "model.embed_tokens")]
    assert emb.layer == "embedding" and emb.magnitude is not None
    _assert_matches_peft(adapter, model)
    # PEFT saves the targeted embedding's base weight beside the adapter (save_embedding_layers)
    assert ("model", "model.embed_tokens.base_layer.weight") in adapter.extras
    base = tiny_llama().double().state_dict()
    merged = _merged_state(model)
    for module in adapter:
        w = base[module.path + ".weight"]
        got = merge_weight(w, module, dtype=torch.float64)
        torch.testing.assert_close(got, merged[module.path + ".weight"], rtol=1e-10, atol=1e-12)


def test_gpt2_fan_in_fan_out(tmp_path):
    model = _peft(tiny_gpt2, tmp_path / "g", r=3, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_bias=True)
    adapter = _read(tmp_path / "g")
    assert all(m.fan_in_fan_out and "bias" in m.tensors for m in adapter)
    _assert_matches_peft(adapter, model)
    base = tiny_gpt2().double().state_dict()
    merged = _merged_state(model)
    for module in adapter:
        got = merge_weight(base[module.path + ".weight"], module, dtype=torch.float64)
        torch.testing.assert_close(got, merged[module.path + ".weight"], rtol=1e-12, atol=1e-12)


def test_unet_conv_and_dora_conv(tmp_path):
    targets = (r"down_blocks\.0\.(resnets\.\d\.conv1|attentions\.0\.proj_in"
               r"|attentions\.0\.transformer_blocks\.0\.attn1\.to_q)")
    model = _peft(tiny_unet, tmp_path / "u", r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    adapter = _read(tmp_path / "u")
    conv = adapter.modules[("model", "down_blocks.0.resnets.0.conv1")]
    assert conv.layer == "conv" and conv.tensors["down"].shape[-2:] == (3, 3)
    _assert_matches_peft(adapter, model)
    base = tiny_unet().double().state_dict()
    merged = _merged_state(model)
    for module in adapter:
        got = merge_weight(base[module.path + ".weight"], module, dtype=torch.float64)
        torch.testing.assert_close(got, merged[module.path + ".weight"], rtol=1e-10, atol=1e-12)


def _assert_roundtrip(src_dir: Path, out: Path, factory, model) -> None:
    adapter = _read(src_dir)
    written = api.save(adapter, out, "peft")
    assert written == [out / "adapter_model.safetensors", out / "adapter_config.json"]
    a, b = load_file(str(src_dir / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca = json.loads((src_dir / "adapter_config.json").read_text())
    cb = json.loads((out / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias",
                "fan_in_fan_out", "modules_to_save", "task_type", "peft_type", "base_model_name_or_path"):
        assert ca.get(key) == cb.get(key), key
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])
    loaded = _load_peft(factory, out)
    mo, ml = _merged_state(model), _merged_state(loaded)
    assert mo.keys() == ml.keys()
    for k in mo:
        torch.testing.assert_close(ml[k], mo[k], rtol=0, atol=0)


def test_roundtrip_patterns_is_bit_exact(llama_dir, tmp_path):
    folder, model = llama_dir
    _assert_roundtrip(folder, tmp_path / "out", tiny_llama, model)


def test_roundtrip_dora_embedding_is_bit_exact(dora_dir, tmp_path):
    folder, model = dora_dir
    _assert_roundtrip(folder, tmp_path / "out", tiny_llama, model)


def test_roundtrip_gpt2_and_unet(tmp_path):
    model = _peft(tiny_gpt2, tmp_path / "g", r=3, lora_alpha=4, target_modules=["c_attn", "c_proj"], use_rslora=True,
                  lora_bias=True)
    _assert_roundtrip(tmp_path / "g", tmp_path / "g_out", tiny_gpt2, model)
    model = _peft(tiny_unet, tmp_path / "u", r=2, lora_alpha=3, target_modules=["conv1", "proj_in", "to_k"])
    _assert_roundtrip(tmp_path / "u", tmp_path / "u_out", tiny_unet, model)


def test_changed_scales_rebuild_patterns(dora_dir, tmp_path):
    """Per-module alphas / rsLoRA that no longer fit the original config get full-path patterns;
    PEFT's own scaling from the written config equals each module's scale."""
    folder, _ = dora_dir
    adapter = _read(folder)
    mods = list(adapter)
    mods[0].alpha = 2.5
    mods[1].rslora = True  # mixed rsLoRA: written as a plain alpha with the same scale
    mods[2].tensors = {k: v[:2] if k == "down" else v[:, :2] for k, v in mods[2].tensors.items()}
    out = tmp_path / "out"
    api.save(adapter, out, "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["rank_pattern"] and cfg["alpha_pattern"]
    loaded = _load_peft(tiny_llama, out)
    layers = _lora_layers(loaded)
    for m in adapter:
        assert layers[m.path].scaling["default"] == pytest.approx(m.scale, rel=1e-15)
        assert layers[m.path].r["default"] == m.rank


def test_suffix_paths_get_anchored_patterns(tmp_path):
    """A module whose path ends another module's path gets a ``^``-anchored pattern key."""
    t = {"down": torch.randn(2, 8, dtype=torch.float64), "up": torch.randn(8, 2, dtype=torch.float64)}
    from loratool.adapter import Adapter

    adapter = Adapter()
    adapter.add(LoraModule("model", "proj", tensors=dict(t), alpha=7.0))
    adapter.add(LoraModule("model", "block.proj", tensors=dict(t), alpha=2.0))
    adapter.add(LoraModule("model", "block.other", tensors=dict(t), alpha=2.0))
    api.save(adapter, tmp_path / "o", "peft")
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] == {"^proj": 7}
    back = _read(tmp_path / "o")
    assert {m.path: m.alpha for m in back} == {"proj": 7.0, "block.proj": 2.0, "block.other": 2.0}


def test_bin_and_unprefixed_diffusers_model(tmp_path):
    """``adapter_model.bin`` reads like safetensors; a diffusers model saved without the
    ``base_model.model.`` prefix takes its component from the folder name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama().double(), LoraConfig(r=2, target_modules=["q_proj"]))
        randomize_lora(model)
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
        model.save_pretrained(tmp_path / "st")
    a, b = _read(tmp_path / "bin"), _read(tmp_path / "st")
    assert a.modules.keys() == b.modules.keys()
    for k, m in a.modules.items():
        assert torch.equal(m.tensors["down"], b.modules[k].tensors["down"]) and m.scale == b.modules[k].scale

    unet = tiny_unet().double()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "conv2"]))
    randomize_lora(unet)
    folder = tmp_path / "unet"
    folder.mkdir()
    sd = get_peft_model_state_dict(unet)
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(unet.peft_config["default"].to_dict(), default=list))
    adapter = _read(folder)
    assert adapter.components == ["unet"]
    assert {m.path for m in adapter} == {k.split(".lora_")[0] for k in sd}
    assert all(m.scale == 2.0 for m in adapter)


def test_multi_component_write_and_component_round_trip(tmp_path):
    t = {"down": torch.randn(2, 8), "up": torch.randn(8, 2)}
    from loratool.adapter import Adapter

    adapter = Adapter()
    adapter.add(LoraModule("unet", "mid_block.attentions.0.proj_in", tensors=dict(t), alpha=1.0))
    adapter.add(LoraModule("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", tensors=dict(t)))
    written = api.save(adapter, tmp_path / "o", "peft")
    assert {p.parent.name for p in written} == {"unet", "text_encoder"}
    for comp in ("unet", "text_encoder"):
        back = api.load(tmp_path / "o" / comp)
        assert back.components == [comp]
        (m,) = back
        assert m.scale == adapter.by_component(comp)[0].scale
    single = api.save(Adapter(modules={("unet", "x"): adapter.by_component("unet")[0]}), tmp_path / "s", "peft")
    assert api.load(single[0].parent).components == ["unet"]  # via the header's loratool.component


def test_errors(tmp_path, llama_dir):
    from loratool.adapter import Adapter

    mixed = Adapter()  # PEFT writes LoHa (peft_type LOHA), but one adapter config holds one kind
    mixed.add(LoraModule("model", "x", kind="loha",
                         tensors={k: torch.ones(2, 2) for k in ("w1a", "w1b", "w2a", "w2b")}))
    mixed.add(LoraModule("model", "y", tensors={"down": torch.ones(2, 2), "up": torch.ones(2, 2)}))
    with pytest.raises(FormatError, match="one PEFT adapter holds one kind"):
        api.save(mixed, tmp_path / "a", "peft")
    assert not (tmp_path / "a").exists()

    folder, _ = llama_dir
    adapter = _read(folder)
    next(iter(adapter)).magnitude = torch.ones(32)
    with pytest.raises(FormatError, match="cannot mix"):
        api.save(adapter, tmp_path / "b", "peft")

    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_file(str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    save_file(sd, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {}}))
    with pytest.raises(FormatError, match="has rank [23] but the config gives r=4"):
        _read(bad)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    with pytest.raises(FormatError, match="lora_A.weight' is not a tensor of a PEFT LOHA adapter"):
        _read(bad)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(FormatError, match="IA3 is not supported"):
        _read(bad)
    save_file({**sd, "base_model.model.x.lora_E": torch.ones(2)}, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="lora_E"):
        _read(bad)


def test_detect_bare_file(llama_dir, tmp_path):
    folder, _ = llama_dir
    path = tmp_path / "adapter.safetensors"
    path.write_bytes((folder / "adapter_model.safetensors").read_bytes())
    src = open_source(path)
    assert fmt.detect(src) and formats.detect(src) == "peft"
    adapter = fmt.read(src, formats.ReadOptions())
    assert all(m.hints.get("alpha_assumed") and m.scale == 1.0 for m in adapter)
