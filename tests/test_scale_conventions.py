"""alpha conventions per layout: PEFT ``lora_alpha=0`` is scale 0 (``scaling = 0 / r``); in kohya /
LyCORIS files "alpha missing or 0" means alpha = r (sd-scripts ``networks/lora.py`` LoRAModule,
lycoris ``modules/locon.py``: ``alpha = lora_dim if alpha is None or alpha == 0``).

Oracles: PEFT ``merge_and_unload`` and lycoris' own rebuild of the file
(``create_lycoris_from_weights`` + ``merge_to``), float64.
"""

from __future__ import annotations

import lycoris
import pytest
import torch
from lycoris_nets import lycoris_network
from merge_oracles import assert_merged, save_base
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import randomize_lora, tiny_llama, tiny_unet

import loratool
from loratool.errors import FormatError
from loratool.ops.merge import merge


def test_peft_lora_alpha_zero_is_scale_zero(tmp_path):
    model = tiny_llama().double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_path = save_base(base, tmp_path / "model.safetensors")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          alpha_pattern={"v_proj": 0}))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "adapter")
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    adapter = loratool.load(tmp_path / "adapter")
    scales = {m.path.rsplit(".", 1)[-1]: m.scale for m in adapter}
    assert scales == {"q_proj": 2.0, "v_proj": 0.0}
    out = tmp_path / "merged.safetensors"
    merge(base_path, [tmp_path / "adapter"], out, device="cpu")
    # q_proj within 1e-12 of PEFT's update; v_proj untouched, as PEFT leaves it
    assert assert_merged(out, expected, base, tol=1e-12) == 2
    # kohya would read alpha 0 as alpha = r: the conversion refuses instead of changing the scale
    with pytest.raises(FormatError, match="scale 0"):
        loratool.save(adapter, tmp_path / "k.safetensors", "kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_kohya_alpha_zero_means_rank(tmp_path):
    model = tiny_unet().double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    (tmp_path / "unet").mkdir()
    base_path = save_base(base, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    net = lycoris_network(model, "locon", ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                           "down_blocks.0.attentions.0.proj_in", "down_blocks.1.resnets.0.conv1"],
                          linear_alpha=2.0, conv_dim=4, conv_alpha=2.0)
    saved = tmp_path / "saved.safetensors"
    net.save_weights(str(saved), torch.float32, {"ss_network_module": "lycoris.kohya"})
    sd = load_file(saved)
    sd = {k: (torch.zeros_like(v) if k.endswith(".alpha") else v) for k, v in sd.items()}
    zero = tmp_path / "zero.safetensors"
    save_file(sd, str(zero), {"ss_network_module": "lycoris.kohya", "ss_network_alpha": "0"})

    fresh = tiny_unet().double()
    oracle, _ = lycoris.create_lycoris_from_weights(1.0, str(zero), fresh)
    oracle.apply_to()
    oracle.double()
    oracle.merge_to(1.0)
    expected = {k: v.detach().clone() for k, v in fresh.state_dict().items() if k in base}

    adapter = loratool.load(zero, family="sd1")
    assert all(m.alpha is None and m.scale == 1.0 for m in adapter)
    out = tmp_path / "merged.safetensors"
    merge(base_path, [zero], out, device="cpu")
    assert assert_merged(out, expected, base, tol=1e-12) == len(net.loras)
    # written back as the file spelled it (alpha 0), not as an explicit rank
    again = tmp_path / "again.safetensors"
    loratool.save(adapter, again, "kohya")
    back = load_file(again)
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    assert loratool.load(again).metadata["ss_network_alpha"] == "0"
