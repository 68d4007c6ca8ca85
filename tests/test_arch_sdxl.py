"""SDXL SGM <-> diffusers U-Net naming, checked against diffusers' own kohya loader conversion."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers.loaders import lora_conversion_utils as diffusers_conv

from loratool.adapter import LoraModule
from loratool.arch import sdxl


def _is_lora_target(sgm: str) -> bool:
    """kohya trains Linear and Conv layers; norms are not LoRA targets."""
    last = sgm.split(".")
    return not (any("norm" in p for p in last) or sgm.endswith(("in_layers.0", "out_layers.0")) or sgm == "out.0")


def _oracle_names(sgm_paths: list[str]) -> dict[str, str]:
    """diffusers' answer: kohya SGM key -> PEFT module name, via its own converters."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    sd = {}
    for n, p in enumerate(sgm_paths):
        key = "lora_unet_" + p.replace(".", "_")
        sd[key + ".lora_down.weight"] = torch.full((1, 1), float(n))
        sd[key + ".lora_up.weight"] = torch.full((1, 1), float(n))
    sd = diffusers_conv._maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(layers_per_block=2))
    converted, _ = diffusers_conv._convert_non_diffusers_lora_to_diffusers(sd)
    unet = {k[len("unet."):]: v for k, v in converted.items() if k.startswith("unet.")}
    peft = convert_unet_state_dict_to_peft(unet)
    out = {}
    for k, v in peft.items():
        if k.endswith(".lora_A.weight"):
            out[sgm_paths[int(v.item())]] = k[: -len(".lora_A.weight")]
    return out


def test_sgm_names_match_diffusers_kohya_loader():
    table = sdxl.unet_map()
    targets = [p for p in table if _is_lora_target(p)]
    oracle = _oracle_names(targets)
    assert len(oracle) == len(targets)
    wrong = {p: (table[p], oracle[p]) for p in targets if table[p] != oracle[p]}
    assert not wrong, list(wrong.items())[:5]


def test_table_is_every_sdxl_unet_module_and_rules_agree():
    table = sdxl.unet_map()
    assert len(table) == len(set(table.values())) > 1000
    for sgm, diff in table.items():
        assert sdxl.sgm_to_diffusers(sgm, 2) == diff
        assert sdxl.diffusers_to_sgm(diff, 2, {0, 1}) == sgm
    assert table["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert table["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert table["label_emb.0.0"] == "add_embedding.linear_1"


def test_to_and_from_canonical_are_exact_renames():
    gen = torch.Generator().manual_seed(0)
    mods = [
        LoraModule("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                   tensors={"down": torch.randn(4, 640, generator=gen), "up": torch.randn(640, 4, generator=gen)},
                   alpha=2.0),
        LoraModule("unet", "output_blocks.2.2.conv", layer="conv",
                   tensors={"down": torch.randn(4, 1280, 3, 3, generator=gen),
                            "up": torch.randn(1280, 4, 1, 1, generator=gen)}),
        LoraModule("text_encoder_2", "text_projection",
                   tensors={"down": torch.randn(2, 1280, generator=gen), "up": torch.randn(1280, 2, generator=gen)}),
    ]
    canon = sdxl.to_canonical(mods)
    assert [m.path for m in canon] == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                                       "up_blocks.0.upsamplers.0.conv", "text_projection"]
    back = sdxl.from_canonical(canon)
    for a, b in zip(mods, back):
        assert (a.component, a.path, a.alpha) == (b.component, b.path, b.alpha)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_native_paths_cover_text_encoders_and_detect():
    assert "text_model.encoder.layers.31.self_attn.q_proj" in sdxl.native_paths("text_encoder_2")
    assert "text_projection" in sdxl.native_paths("text_encoder_2")
    assert "text_model.encoder.layers.11.mlp.fc2" in sdxl.native_paths("text_encoder")
    assert "input_blocks.8.1.transformer_blocks.9.attn2.to_k" in sdxl.native_paths("unet")
    keys = ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "lora_te2_text_model_x.alpha"]
    assert sdxl.detect(keys, {}) > 0
    assert sdxl.detect(["lora_unet_double_blocks_0_img_attn_qkv.alpha"], {}) == 0
    assert sdxl.detect([], {"ss_base_model_version": "sdxl_base_v1-0"}) == 100
