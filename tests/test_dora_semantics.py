"""DoRA across layouts: the magnitude's axis and what a strength λ ≠ 1 means, each as the layout's
own library has it (float64; merges within 1e-12 of the update, measured ≤ 2e-14; the issue asks ≤ 1e-5).

* PEFT conv DoRA keeps its magnitude as [1, out, 1, 1]; written to kohya it must become the
  [out, 1, 1, 1] ``dora_scale`` LyCORIS reads per output channel. Oracle: PEFT
  ``merge_and_unload`` against lycoris' own rebuild of the kohya file
  (``lycoris.create_lycoris_from_weights`` + ``merge_to``).
* A LyCORIS DoRA normalised per input column (``wd_on_output=False``) has no PEFT / diffusers
  form: writing it there is refused.
* Strength: LyCORIS ``W' = (W + ΔW)(λ(m/‖W + ΔW‖ − 1) + 1)`` (``get_merged_weight(multiplier=λ)``);
  PEFT ``W' = m/‖W + λΔW‖ (W + λΔW)`` (``set_scale`` / ``scale_layer`` then ``merge_and_unload``).
"""

from __future__ import annotations

import lycoris
import pytest
import torch
from lycoris_nets import lycoris_network
from merge_oracles import assert_merged, relative_error, save_base, save_component
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny_models import randomize_lora, tiny_llama, tiny_unet

import loratool
from loratool.errors import FormatError
from loratool.ops.convert import convert
from loratool.ops.merge import merge

# tiny_unet convs: 32→32 and 32→64 3×3 resnet convs, a 32→64 1×1 shortcut, and a linear
CONV_TARGETS = ["down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv2",
                "down_blocks.1.resnets.0.conv_shortcut", "down_blocks.0.resnets.0.conv1",
                "down_blocks.0.attentions.0.proj_in"]




def _peft_conv_dora(unet, tmp_path):
    """A PEFT DoRA folder on convs (square and in ≠ out) saved as component ``unet``, and PEFT's merge."""
    pm = get_peft_model(unet, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=CONV_TARGETS))
    randomize_lora(pm, seed=4, std=0.2)
    mags = [m for n, m in pm.named_parameters() if "lora_magnitude_vector" in n]
    assert any(p.dim() == 4 and p.shape[0] == 1 for p in mags)  # PEFT's conv layout [1, out, 1, 1]
    pm.save_pretrained(tmp_path / "unet")
    return pm


def test_peft_conv_dora_to_kohya_reads_per_output_in_lycoris(tmp_path, unet64):
    base_path = tmp_path / "base" / "unet"
    base = save_component(unet64, base_path)
    pm = _peft_conv_dora(unet64, tmp_path)
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items() if k in base}
    out = tmp_path / "dora.safetensors"
    convert(tmp_path / "unet", "kohya", out, family="sd1")
    sd = load_file(out)
    for key, t in sd.items():
        if key.endswith(".dora_scale"):
            assert t.dim() == 4 and t.shape[1:] == (1, 1, 1) or t.dim() == 2 and t.shape[1] == 1, (key, t.shape)

    # LyCORIS' own reading of the file, merged into a fresh copy of the base
    fresh = tiny_unet().double()
    fresh.load_state_dict(base)
    # create_lycoris_from_weights names modules lycoris_<path>; kohya's U-Net prefix is lora_unet_
    named = {"lycoris_" + k.removeprefix("lora_unet_"): v for k, v in sd.items()}
    net, _ = lycoris.create_lycoris_from_weights(1.0, "", fresh, weights_sd=named)
    assert len(net.loras) == len(CONV_TARGETS)
    net.apply_to()
    net.double()
    net.merge_to(1.0)
    oracle = {k: v.detach().clone() for k, v in fresh.state_dict().items() if k in base}
    for key in expected:
        if torch.equal(expected[key], base[key]):
            continue
        assert relative_error(oracle[key], expected[key], base[key]) < 1e-12, key  # LyCORIS reads what PEFT merged
    merged = tmp_path / "merged"
    merge(base_path, [out], merged, device="cpu")
    assert assert_merged(merged / "diffusion_pytorch_model.safetensors", expected, base, tol=1e-12) == len(CONV_TARGETS)


def _lycoris_dora(unet, wd_on_output: bool, algo: str = "locon", linear_alpha: float = 2.0, **kw):
    """LyCORIS DoRA (``dora_wd``) on the CONV_TARGETS' weights (linear, 1×1 and k×k convs), with
    magnitudes moved off the base norms."""
    targets = [t for t in CONV_TARGETS] + ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    net = lycoris_network(unet, algo, targets, linear_alpha=linear_alpha, dora_wd=True, wd_on_output=wd_on_output,
                          **kw)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in net.loras:
            m.dora_scale.mul_(1 + 0.3 * torch.rand(m.dora_scale.shape, generator=gen, dtype=m.dora_scale.dtype))
    return net


def test_per_input_lycoris_dora_is_refused_by_peft_and_diffusers(tmp_path, unet64):
    net = _lycoris_dora(unet64, wd_on_output=False, conv_dim=4, conv_alpha=2.0)
    src = tmp_path / "lyco.safetensors"
    net.save_weights(str(src), torch.float32, {"ss_network_module": "lycoris.kohya"})
    adapter = loratool.load(src, family="sd1")
    assert {m.hints["dora_axis"] for m in adapter} == {"in"}
    for layout, out in (("peft", tmp_path / "p"), ("diffusers", tmp_path / "d.safetensors")):
        with pytest.raises(FormatError, match="per input column"):
            loratool.save(adapter, out, layout)
        assert not out.exists()
    # kohya keeps it as LyCORIS wrote it
    loratool.save(adapter, tmp_path / "again.safetensors", "kohya")
    a, b = load_file(src), load_file(tmp_path / "again.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("wd_on_output", [True, False], ids=["per-output", "per-input"])
@pytest.mark.parametrize("algo", ["locon", "loha"])
def test_lycoris_dora_strength_follows_lycoris(tmp_path, unet64, wd_on_output, algo):
    """LyCORIS' ``get_merged_weight(multiplier=λ)`` (what its forward uses) is the oracle, linear and conv."""
    strength = 0.5
    base_path = tmp_path / "base" / "unet"
    base = save_component(unet64, base_path)
    # alpha = dim for LoHa: lycoris 4.1.3's merge path applies the LoHa scale twice (module docstring of
    # tests/test_merge_lycoris_loralib.py); scale 1 keeps the oracle unambiguous
    alpha = 4.0 if algo == "loha" else 2.0
    net = _lycoris_dora(unet64, wd_on_output, algo, linear_alpha=alpha, conv_dim=4, conv_alpha=4.0)
    src = tmp_path / "lyco.safetensors"
    net.save_weights(str(src), torch.float64, {"ss_network_module": "lycoris.kohya"})
    expected = dict(base)
    names = {id(mod): name for name, mod in unet64.named_modules()}
    with torch.no_grad():
        for m in net.loras:
            w = m.org_module[0].weight
            merged, _ = m.get_merged_weight(strength, tuple(w.shape))
            expected[names[id(m.org_module[0])] + ".weight"] = merged.detach().double().reshape(w.shape)
    out = tmp_path / "merged"
    merge(base_path, [src], out, strength, device="cpu")
    assert assert_merged(out / "diffusion_pytorch_model.safetensors", expected, base, tol=1e-12) == len(net.loras)
    assert {m.hints["dora_strength"] for m in loratool.load(src, family="sd1")} == {"lycoris"}


@pytest.mark.parametrize("how", ["set_scale", "scale_layer"])
def test_peft_dora_strength_follows_peft(tmp_path, how):
    """PEFT DoRA (linear and conv) at λ ≠ 1: PEFT with its scaling changed, then merge_and_unload."""
    strength = 0.4
    model = tiny_llama().double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_path = save_base(base, tmp_path / "model.safetensors")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]))
    randomize_lora(pm, seed=6, std=0.2)
    pm.save_pretrained(tmp_path / "adapter")
    for mod in pm.modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "set_scale"):
            if how == "set_scale":
                mod.set_scale("default", strength)
            else:
                mod.scale_layer(strength)
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged.safetensors"
    merge(base_path, [tmp_path / "adapter"], out, strength, device="cpu")
    assert assert_merged(out, expected, base, tol=1e-12) == 4


def test_peft_conv_dora_strength_follows_peft(tmp_path, unet64):
    strength = 0.6
    base_path = tmp_path / "base" / "unet"
    base = save_component(unet64, base_path)
    pm = _peft_conv_dora(unet64, tmp_path)
    for mod in pm.modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "set_scale"):
            mod.set_scale("default", strength)
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items() if k in base}
    out = tmp_path / "merged"
    merge(base_path, [tmp_path / "unet"], out, strength, device="cpu")
    assert assert_merged(out / "diffusion_pytorch_model.safetensors", expected, base, tol=1e-12) == len(CONV_TARGETS)
