"""Merging PEFT adapters equals PEFT's own ``merge_and_unload`` (float64 bases, tolerance 1e-5
relative to the update): plain, rsLoRA with rank/alpha patterns, DoRA, embeddings, GPT-2
``fan_in_fan_out``, strength (PEFT ``set_scale``), and several adapters in a row."""

from __future__ import annotations

import pytest
import torch
from merge_oracles import adapter_from_peft, assert_merged, save_base
from peft import LoraConfig, get_peft_model
from tiny_models import randomize_lora, tiny_gpt2, tiny_llama

from loratool.ops.merge import merge

SOURCES = ["memory", "file"]


def _case(tmp_path, factory, strength=None, **cfg):
    model = factory().double()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if "lm_head.weight" in base_state and "transformer.wte.weight" in base_state:
        del base_state["lm_head.weight"]  # GPT-2 ties it to wte; files store it once
    base_path = save_base(base_state, tmp_path / "model.safetensors")
    pm = get_peft_model(model, LoraConfig(**cfg))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "adapter")
    adapter = adapter_from_peft(pm)
    if strength is not None:
        for mod in pm.modules():
            if hasattr(mod, "set_scale") and hasattr(mod, "lora_A"):
                mod.set_scale("default", strength)
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base_path, base_state, adapter, expected


def _run(tmp_path, source, base_path, adapter, strength=None):
    if source == "file":
        lora = tmp_path / "adapter"
    else:
        lora = adapter
    out = tmp_path / "merged.safetensors"
    result = merge(base_path, [lora], out, strength, device="cpu")
    return out, result


LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("source", SOURCES)
def test_plain_lora_matches_merge_and_unload(tmp_path, source):
    base_path, base, adapter, expected = _case(tmp_path, tiny_llama, r=4, lora_alpha=8,
                                                target_modules=LLAMA_ATTN + ["up_proj", "down_proj"])
    out, result = _run(tmp_path, source, base_path, adapter)
    assert assert_merged(out, expected, base) == 2 * 6
    assert result.matched == {"model": 12} and not result.unmatched
    assert result.merged_tensors == 12 and result.skipped == len(base) - 12


@pytest.mark.parametrize("source", SOURCES)
def test_rslora_with_rank_and_alpha_patterns(tmp_path, source):
    base_path, base, adapter, expected = _case(
        tmp_path, tiny_llama, r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_ATTN,
        rank_pattern={"layers.0.self_attn.q_proj": 2, "o_proj": 6}, alpha_pattern={"v_proj": 3},
    )
    out, _ = _run(tmp_path, source, base_path, adapter)
    assert assert_merged(out, expected, base) == 8


@pytest.mark.parametrize("source", SOURCES)
def test_dora(tmp_path, source):
    base_path, base, adapter, expected = _case(tmp_path, tiny_llama, r=4, lora_alpha=4, use_dora=True,
                                                target_modules=["q_proj", "v_proj", "gate_proj"])
    out, _ = _run(tmp_path, source, base_path, adapter)
    assert assert_merged(out, expected, base) == 6


@pytest.mark.parametrize("source", SOURCES)
def test_embeddings(tmp_path, source):
    base_path, base, adapter, expected = _case(tmp_path, tiny_llama, r=4, lora_alpha=16,
                                                target_modules=["q_proj", "embed_tokens", "lm_head"])
    out, _ = _run(tmp_path, source, base_path, adapter)
    assert assert_merged(out, expected, base) == 4


@pytest.mark.parametrize("source", SOURCES)
def test_gpt2_fan_in_fan_out(tmp_path, source):
    base_path, base, adapter, expected = _case(tmp_path, tiny_gpt2, r=4, lora_alpha=8, fan_in_fan_out=True,
                                                target_modules=["c_attn", "c_proj", "c_fc"])
    out, _ = _run(tmp_path, source, base_path, adapter)
    # c_proj names both attn.c_proj and mlp.c_proj: 4 Conv1D weights per layer, 2 layers
    assert assert_merged(out, expected, base) == 8


def test_strength_is_peft_scale(tmp_path):
    base_path, base, adapter, expected = _case(tmp_path, tiny_llama, strength=0.7, r=4, lora_alpha=8,
                                                target_modules=LLAMA_ATTN)
    out, result = _run(tmp_path, "memory", base_path, adapter, strength=0.7)
    assert result.strengths == [0.7]
    assert assert_merged(out, expected, base) == 8


def test_dora_strength_is_peft_scale(tmp_path):
    base_path, base, adapter, expected = _case(tmp_path, tiny_llama, strength=0.4, r=4, lora_alpha=8, use_dora=True,
                                                target_modules=["q_proj", "down_proj"])
    out, _ = _run(tmp_path, "memory", base_path, adapter, strength=0.4)
    assert assert_merged(out, expected, base) == 4


def test_two_adapters_in_a_row_equal_two_peft_merges(tmp_path):
    """Adapter 1 then adapter 2 (one of them DoRA) equals merging them one after the other in PEFT."""
    model = tiny_llama().double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_path = save_base(base, tmp_path / "model.safetensors")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(pm, seed=3)
    first = adapter_from_peft(pm)
    merged_once = pm.merge_and_unload()
    pm2 = get_peft_model(merged_once, LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj", "o_proj"]))
    randomize_lora(pm2, seed=4)
    second = adapter_from_peft(pm2)
    expected = {k: v.detach().clone() for k, v in pm2.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged.safetensors"
    result = merge(base_path, [first, second], out, device="cpu")
    assert result.matched == {"model": 8}
    assert assert_merged(out, expected, base) == 6


def test_float32_base_tolerance(tmp_path):
    """A float32 base is merged in float32: still within 1e-5 of PEFT's float64 result."""
    model = tiny_llama()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_path = save_base(base, tmp_path / "model.safetensors")
    model64 = tiny_llama().double()
    pm = get_peft_model(model64, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ATTN))
    randomize_lora(pm)
    adapter = adapter_from_peft(pm)
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged.safetensors"
    merge(base_path, [adapter], out, device="cpu")
    from safetensors.torch import load_file

    ours = load_file(str(out))
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert ours[key].dtype == torch.float32
        err = (ours[key].double() - expected[key]).norm() / (expected[key] - base[key].double()).norm()
        assert err < 1e-5, (key, float(err))
