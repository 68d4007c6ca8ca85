"""A PEFT adapter trained after ``resize_token_embeddings``: PEFT saves the wrapped embedding layers whole
(``save_embedding_layers=True``: ``<path>.base_layer.weight``, more rows than the base), and
``merge_and_unload`` adds the LoRA update on top of that saved weight. loratool's merge must give the same
tensors and a config whose ``vocab_size`` the merged model loads with (transformers ``from_pretrained``)."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from tiny_models import randomize_lora, tiny_llama
from transformers import LlamaForCausalLM

from loratool.ops.check import check
from loratool.ops.merge import merge


def test_resized_embeddings_merge_as_merge_and_unload(tmp_path):
    base = tiny_llama().double()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float64)
    model.resize_token_embeddings(72, mean_resizing=False)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4,
                                                  target_modules=["q_proj", "lm_head", "embed_tokens"]))
    randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert {"base_model.model.lm_head.base_layer.weight", "base_model.model.model.embed_tokens.base_layer.weight"} \
        <= saved  # PEFT's own key names for the saved base layers
    oracle = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}

    result = merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged")
    assert result.unmatched == [] and sum(result.matched.values()) == 6  # 4 modules (q_proj of 2 layers), 2 replaced
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == 72
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float64).state_dict()
    assert merged.keys() == oracle.keys()
    for key, want in oracle.items():
        # measured: bit-exact (both add scale · B @ A to the same float64 weight)
        torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-15, msg=key)


def test_check_counts_the_replaced_weights(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base", safe_serialization=True)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(70, mean_resizing=False)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    report = check(tmp_path / "adapter", tmp_path / "base")
    assert report.groups == [] and report.matched_total == 2
