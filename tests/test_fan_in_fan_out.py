"""PEFT's ``fan_in_fan_out`` is per module: when PEFT injects a layer it sets the flag from the
layer's class (transformers ``Conv1D`` → True, ``nn.Linear`` → False;
``peft.tuners.lora.layer.dispatch_default``) and overwrites the config's value, so a saved
``adapter_config.json`` holds the last module's value. loratool decides per module from what the
base layer is: the model named by the config (``auto_mapping``, ``base_model_name_or_path``) and
its Conv1D layers; at merge time the base's stored shapes (non-square) and its ``config.json``.

Oracle: PEFT ``get_peft_model`` + ``merge_and_unload`` (and PEFT's own reload of what loratool
writes), float64; merges within 1e-12 of the update (measured ≤ 2e-14; the issue asks ≤ 1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch
from merge_oracles import assert_merged, save_base
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import randomize_lora, seeded

import loratool
from loratool.ops.merge import merge


def gpt2():
    """GPT-2 (Conv1D attention / MLP) with an untied ``lm_head`` (an nn.Linear)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    seeded(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg).eval().double()


def _adapter(tmp_path, targets, task_type="CAUSAL_LM"):
    model = gpt2()
    model.save_pretrained(tmp_path / "base")  # config.json names model_type gpt2
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True,
                                          task_type=task_type))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base, expected, config


def test_square_conv1d_beside_a_linear_merges_like_peft(tmp_path):
    """The issue's case: attn.c_proj (Conv1D, square) + lm_head (Linear); PEFT saves fan_in_fan_out false."""
    base, expected, config = _adapter(tmp_path, ["attn.c_proj", "lm_head"])
    assert config["fan_in_fan_out"] is False and not config.get("auto_mapping")
    out = tmp_path / "merged"
    merge(tmp_path / "base", [tmp_path / "adapter"], out, device="cpu")
    assert assert_merged(out / "model.safetensors", expected, base, tol=1e-12) == 3


def test_read_decides_per_module_from_the_model_the_config_names(tmp_path):
    """task_type None: PEFT writes auto_mapping (GPT2LMHeadModel, transformers.models.gpt2...)."""
    _, _, config = _adapter(tmp_path, ["attn.c_proj", "lm_head"], task_type=None)
    assert config["auto_mapping"]["parent_library"] == "transformers.models.gpt2.modeling_gpt2"
    flags = {m.path: m.fan_in_fan_out for m in loratool.load(tmp_path / "adapter")}
    assert flags == {"lm_head": False, "transformer.h.0.attn.c_proj": True, "transformer.h.1.attn.c_proj": True}


def test_non_square_weights_are_oriented_by_the_base_shapes(tmp_path):
    """c_attn / c_fc are [32, 96] / [32, 128] as Conv1D stores them; no config.json beside the base file."""
    base, expected, config = _adapter(tmp_path, ["c_attn", "c_fc", "lm_head"])
    assert config["fan_in_fan_out"] is False
    base_file = save_base(base, tmp_path / "model.safetensors")
    out = tmp_path / "merged.safetensors"
    merge(base_file, [tmp_path / "adapter"], out, device="cpu")
    assert assert_merged(out, expected, base, tol=1e-12) == 5


@pytest.mark.parametrize("targets", [["attn.c_proj", "lm_head"], ["c_attn", "mlp.c_proj"]], ids=["mixed", "conv1d"])
def test_peft_written_by_loratool_reloads_per_module(tmp_path, targets):
    base, expected, _ = _adapter(tmp_path, targets, task_type=None)
    adapter = loratool.load(tmp_path / "adapter")
    again = tmp_path / "again"
    loratool.save(adapter, again, "peft")
    back = loratool.load(again)
    assert {m.path: m.fan_in_fan_out for m in back} == {m.path: m.fan_in_fan_out for m in adapter}
    # PEFT itself loads the folder and merges it the same
    pm = PeftModel.from_pretrained(gpt2(), str(again))
    pm.double()
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0)
    # ...and a kohya copy merges like PEFT into the base folder (GPT-2 names, config.json)
    kohya = tmp_path / "k.safetensors"
    adapter.extras.clear()  # PEFT saved lm_head's (unchanged) base weight beside an adapted lm_head
    loratool.save(adapter, kohya, "kohya")
    out = tmp_path / "merged"
    merge(tmp_path / "base", [kohya], out, device="cpu")
    assert assert_merged(out / "model.safetensors", expected, base, tol=1e-12) >= 2
