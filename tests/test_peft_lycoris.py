"""PEFT LoHa / LoKr adapters (``peft_type`` LOHA / LOKR; keys ``base_model.model.<path>.hada_w1_a`` …,
``lokr_w1`` …: peft/tuners/{loha,lokr}/layer.py), made by PEFT itself: read, merged, and written to PEFT
(and LoKr to diffusers), each checked against the libraries — PEFT's ``merge_and_unload`` for merges,
``PeftModel.from_pretrained`` / diffusers' ``load_lora_adapter`` + ``fuse_lora`` loading what loratool writes.
"""

from __future__ import annotations

import copy

import lycoris
import pytest
import torch
from merge_oracles import assert_merged, save_base
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model
from tiny_models import randomize_lora, tiny_llama, tiny_unet

import loratool
from loratool.errors import FormatError
from loratool.ops.convert import convert
from loratool.ops.merge import merge


@pytest.fixture(scope="module")
def _unet():
    return tiny_unet().double()


def _peft_case(tmp_path, model, config, seed=1, folder="adapter"):
    """PEFT's adapter folder (a folder named after a component is read as that component, PEFT's layout)."""
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(copy.deepcopy(model), config)
    randomize_lora(peft_model, seed=seed)
    peft_model.save_pretrained(tmp_path / folder)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    expected = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return base, expected, peft_model


def _merge_into(tmp_path, base, adapter_path, component=None):
    folder = tmp_path / (component or "base")
    folder.mkdir(exist_ok=True)
    name = "diffusion_pytorch_model.safetensors" if component else "model.safetensors"
    base_path = save_base(base, folder / name)
    out = tmp_path / "merged.safetensors"
    result = merge(base_path, [adapter_path], out, device="cpu")
    assert not result.unmatched, result.unmatched[:4]
    return out


UNET_TARGETS = ["to_q", "to_v", "conv1", "proj_in"]


@pytest.mark.parametrize("config", [
    LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
               alpha_pattern={"down_proj": 3}),
], ids=["llama-loha-patterns"])
def test_peft_loha_on_an_llm_merges_as_peft(tmp_path, config):
    model = tiny_llama().double()
    base, expected, _ = _peft_case(tmp_path, model, config)
    adapter = loratool.load(tmp_path / "adapter")
    assert adapter.source_format == "peft" and {m.kind for m in adapter} == {"loha"}
    assert {(m.rank, m.scale) for m in adapter} == {(4, 2.0), (2, 4.0), (4, 0.75)}
    out = _merge_into(tmp_path, base, tmp_path / "adapter")
    assert assert_merged(out, expected, base, tol=1e-12) == len(adapter)


@pytest.mark.parametrize("config", [
    LoHaConfig(r=2, alpha=3, target_modules=UNET_TARGETS, use_effective_conv2d=True),
    LoKrConfig(r=2, alpha=3, target_modules=UNET_TARGETS),
    LoKrConfig(r=2, alpha=3, target_modules=UNET_TARGETS, use_effective_conv2d=True, decompose_both=True,
               decompose_factor=4),
    LoKrConfig(r=16, alpha=5, target_modules=UNET_TARGETS),  # r large: both Kronecker factors whole
], ids=["loha-tucker", "lokr", "lokr-tucker-both-factor4", "lokr-whole"])
def test_peft_loha_lokr_on_a_unet_merge_as_peft_and_write_back(tmp_path, _unet, config):
    base, expected, peft_model = _peft_case(tmp_path, _unet, config, seed=2, folder="lora/unet")
    adapter = loratool.load(tmp_path / "lora/unet")
    kind = "loha" if isinstance(config, LoHaConfig) else "lokr"
    from peft import get_peft_model_state_dict

    layers = {k.rsplit(".", 1)[0] for k in get_peft_model_state_dict(peft_model)}
    assert {m.kind for m in adapter} == {kind} and len(adapter) == len(layers) > 20
    if config.r == 16:
        assert all("w1" in m.tensors and "w2" in m.tensors and m.scale == 5 / 16 for m in adapter)
    out = _merge_into(tmp_path, base, tmp_path / "lora/unet", component="unet")
    assert assert_merged(out, expected, base, tol=1e-12) == len(adapter)

    # written back as PEFT, PEFT loads it (same tensor names and shapes: strict) and merges the same weights
    convert(tmp_path / "lora/unet", "peft", tmp_path / "again")
    again = PeftModel.from_pretrained(copy.deepcopy(_unet), tmp_path / "again")
    merged = again.merge_and_unload().state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-12, atol=1e-12)


def test_lycoris_lokr_file_written_as_peft_and_diffusers_loads_in_both(tmp_path, _unet):
    """A LyCORIS LoKr file (kohya names) -> --to peft and --to diffusers; PEFT and diffusers each load it and
    merge the weights lycoris' own forward gives (alpha = dim so lycoris' merge_to, which squares the LoKr
    scale, agrees with its forward)."""
    model = copy.deepcopy(_unet)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=2.0, algo="lokr")
    net.apply_to()
    randomize_lora(net, seed=5, std=0.2)
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float64, {"ss_network_module": "lycoris.kohya"})
    net.merge_to(1.0)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items() if k in base}

    convert(tmp_path / "lyco.safetensors", "peft", tmp_path / "peft", family="sd1")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(_unet), tmp_path / "peft")
    merged = peft_model.merge_and_unload().state_dict()
    changed = 0
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-10, atol=1e-12)
        changed += not torch.equal(v, base[k])
    assert changed == len(net.loras)

    convert(tmp_path / "lyco.safetensors", "diffusers", tmp_path / "d.safetensors", family="sd1")
    from diffusers import StableDiffusionPipeline

    unet = copy.deepcopy(_unet)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "d.safetensors"),
                                                                      return_lora_metadata=True)
    unet.load_lora_adapter(state, prefix="unet", metadata=metadata)  # as load_lora_weights passes them
    unet.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lokr_" not in k}
    for k, v in expected.items():
        torch.testing.assert_close(fused[k], v, rtol=1e-10, atol=1e-12)
    back = loratool.load(tmp_path / "d.safetensors")  # and loratool reads its own diffusers LoKr file back
    assert {m.kind for m in back} == {"lokr"} and len(back) == len(net.loras)


def test_lokr_peft_cannot_rebuild_is_refused_clearly(tmp_path, _unet):
    """lycoris' factorization puts the smaller factor first even for an explicit factor (factor=4 on 4 channels
    gives (1, 4)); PEFT's keeps (4, 1): no PEFT config rebuilds such a module."""
    net = lycoris.create_lycoris(copy.deepcopy(_unet), 1.0, linear_dim=2, linear_alpha=2.0, algo="lokr", factor=4)
    net.apply_to()
    randomize_lora(net, seed=6)
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float64, {"ss_network_module": "lycoris.kohya"})
    with pytest.raises(FormatError, match="no decompose_factor makes PEFT factor these LoKr modules as stored"):
        convert(tmp_path / "lyco.safetensors", "peft", tmp_path / "peft", family="sd1")
    assert not (tmp_path / "peft").exists()


def test_loha_to_diffusers_is_refused_clearly(tmp_path, _unet):
    _peft_case(tmp_path, _unet, LoHaConfig(r=2, alpha=2, target_modules=["to_q"]), folder="lora/unet")
    with pytest.raises(FormatError, match="loads LoKr adapters but not LoHa"):
        convert(tmp_path / "lora/unet", "diffusers", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
