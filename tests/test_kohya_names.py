"""kohya name restoration: family tables (from the real models), vocabularies, detection."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_clip_text, tiny_gpt2, tiny_llama, tiny_unet

from loratool import arch
from loratool.arch import llm
from loratool.errors import FormatError
from loratool.formats.kohya_names import HeadResolver, PathIndex, template, to_head


def _weight_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if n and "weight" in dict(m.named_parameters(recurse=False))]


def test_shipped_sd_tables_equal_a_fresh_generation():
    from loratool.arch.generate import sd_tables

    assert sd_tables() == arch.load_table("sd")


@pytest.mark.parametrize("family", ["sd1", "sd2", "llm"])
def test_templates_are_unambiguous(family):
    fam = arch.get(family)
    for comp in fam.components:
        index = PathIndex.from_paths(fam.native_paths(comp), templated=True)
        assert index.templates, comp
        clashes = {k: v for k, v in index.templates.items() if len(v) > 1}
        assert not clashes, clashes


def test_every_real_unet_and_clip_module_is_restored():
    """tiny_unet / tiny_clip_text have other sizes and depths than SD1.5: templates generalise."""
    r = HeadResolver(arch.get("sd1"), None)
    for p in _weight_paths(tiny_unet()):
        assert r.resolve(to_head("lora_unet", p))[:3] == ("unet", p, "lora_unet")
    for p in _weight_paths(tiny_clip_text()):
        full = p if p.startswith("text_model.") else f"text_model.{p}"
        assert r.resolve(to_head("lora_te", full))[:2] == ("text_encoder", full)


def test_every_real_llm_module_is_restored():
    r = HeadResolver(arch.get("llm"), None)
    for model in (tiny_llama(), tiny_gpt2()):
        for p in _weight_paths(model):
            comp, path, _, _ = r.resolve(to_head(r.prefix_for("model"), p))
            assert (comp, path) == ("model", p)
    assert r.resolve("lora_te_model_layers_31_self_attn_k_proj")[1] == "model.layers.31.self_attn.k_proj"
    assert r.resolve("lora_model_layers_31_self_attn_k_proj")[1] == "layers.31.self_attn.k_proj"  # bare LlamaModel


def test_case_is_kept_for_t5():
    r = HeadResolver(arch.get("llm"), None)
    assert r.resolve("lora_te_encoder_block_3_layer_0_SelfAttention_q")[1] == "encoder.block.3.layer.0.SelfAttention.q"
    assert "encoder.block.0.layer.1.DenseReluDense.wi" in llm.paths("t5_encoder")
    with pytest.raises(FormatError):
        r.resolve("lora_te_encoder_block_3_layer_0_selfattention_q")


def test_numbers_inside_identifiers_and_as_segments():
    assert template("time_embedding.linear_1") == "time_embedding.linear_#"
    assert template("down_blocks.10.attn1.to_out.0") == "down_blocks.#.attn1.to_out.#"
    r = HeadResolver(arch.get("sd1"), None)
    assert r.resolve("lora_unet_time_embedding_linear_2")[1] == "time_embedding.linear_2"
    assert r.resolve("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj")[1] == \
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"


def test_ambiguous_and_unknown_names_are_errors():
    index = PathIndex.from_paths(["a_b.c", "a.b_c"], templated=True)
    with pytest.raises(FormatError, match="a_b.c"):
        index.restore("a_b_c")
    assert index.restore("a_b_d") is None
    r = HeadResolver(arch.get("sd1"), None)
    with pytest.raises(FormatError, match="lora_unet_down_blocks_0_attentions_0_to_nowhere"):
        r.resolve("lora_unet_down_blocks_0_attentions_0_to_nowhere")
    with pytest.raises(FormatError, match="unknown kohya prefix"):
        r.resolve("lora_xx_down_blocks_0_resnets_0_conv1")


def test_vocabulary_wins_and_takes_any_prefix():
    vocab = {"model": {"layers.0.attn.qkv_proj", "layers.0.attn.o_proj"}}
    r = HeadResolver(None, vocab)
    assert r.resolve("whatever_prefix_layers_0_attn_qkv_proj")[:2] == ("model", "layers.0.attn.qkv_proj")
    with pytest.raises(FormatError):
        r.resolve("whatever_prefix_layers_0_attn_k_proj")


@pytest.mark.parametrize("keys,meta,expected", [
    (["lora_unet_down_blocks_0_resnets_0_conv1.alpha"], {"ss_base_model_version": "sd_v1"}, "sd1"),
    (["lora_unet_down_blocks_0_resnets_0_conv1.alpha"], {"ss_base_model_version": "sd_v2"}, "sd2"),
    (["lora_unet_down_blocks_0_resnets_0_conv1.alpha"], {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"},
     "sd2"),
    (["lora_unet_down_blocks_0_resnets_0_conv1.alpha", "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"], {}, "sd1"),
    (["lora_model_layers_0_self_attn_q_proj.alpha"], {}, "llm"),
])
def test_family_detection(keys, meta, expected):
    assert arch.detect(keys, meta).name == expected


def test_sd_to_canonical_adds_text_model_prefix():
    from loratool.adapter import LoraModule

    m = LoraModule("text_encoder", "encoder.layers.0.mlp.fc1", tensors={"down": torch.zeros(1, 2),
                                                                         "up": torch.zeros(2, 1)})
    (c,) = arch.get("sd1").to_canonical([m])
    assert c.path == "text_model.encoder.layers.0.mlp.fc1"
