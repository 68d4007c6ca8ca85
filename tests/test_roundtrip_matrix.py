"""Every layout → every other layout → back: bit-exact factors and identical scales.

The sources are the fixtures made by the real libraries (PEFT ``save_pretrained``, diffusers
``save_lora_weights``, loralib ``lora_state_dict``, sd-scripts naming), plus files the libraries
write here: a multi-component PEFT folder (``P/unet``, ``P/text_encoder``, each PEFT
``save_pretrained``), PEFT DoRA on linears and convs, LyCORIS DoRA (linear and conv), LyCORIS LoHa /
LoKr on k×k convs without Tucker core (flattened products). Where the middle layout cannot hold what
the source holds, the conversion must refuse with a FormatError that says why, never write something
lossy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loratool
from loratool.delta import merge_weight
from loratool.errors import FormatError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SOURCES = {
    "peft": FIXTURES / "peft_tiny_llama",
    "diffusers": FIXTURES / "diffusers_tiny_sd" / "pytorch_lora_weights.safetensors",
    "kohya": FIXTURES / "kohya_tiny_sd.safetensors",
    "loralib": FIXTURES / "loralib_tiny.pt",
}
SUFFIX = {"kohya": ".safetensors", "diffusers": ".safetensors", "peft": "", "loralib": ".pt"}
# Pairs whose middle layout cannot hold the source, and the reason it must give.
REFUSED = {
    ("loralib", "diffusers"): "diffusers",  # a plain torch model has no diffusers component
    ("peft", "diffusers"): "diffusers",
    ("loralib", "kohya"): "embedding",  # kohya has no embedding LoRA keys
    ("kohya", "loralib"): "conv",  # loralib's ConvLoRA factorises differently
    ("peft_multi", "loralib"): "conv",
}
FAMILY = {"peft": "llm", "loralib": "llm", "diffusers": "sd1", "kohya": "sd1"}
# Sources written here by the libraries themselves (built once per session): name -> layout.
GENERATED = {"peft_multi": "peft", "peft_dora": "peft", "lycoris_dora": "kohya", "lycoris_loha_conv": "kohya",
             "lycoris_lokr_conv": "kohya"}
REFUSED.update({
    ("peft_dora", "loralib"): "conv|DoRA",  # loralib has neither conv LoRA nor a magnitude vector
    ("lycoris_dora", "loralib"): "conv|DoRA",
    ("lycoris_loha_conv", "diffusers"): "not LoHa",  # diffusers holds LoKr adapters, not LoHa; PEFT holds both
    **{(src, "loralib"): "loralib" for src in ("lycoris_loha_conv", "lycoris_lokr_conv")},
})
DORA_TARGETS = ["down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut", "to_q", "proj_in"]
LYCORIS_TARGETS = ["down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
                   "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.proj_in"]


@pytest.fixture(scope="session")
def generated(tmp_path_factory):
    """{name: path} of the GENERATED sources (tiny SD U-Net / CLIP, float32, random factors)."""
    from lycoris_nets import lycoris_network, save
    from peft import LoraConfig, get_peft_model
    from tiny_models import randomize_lora, tiny_clip_text, tiny_unet

    root = tmp_path_factory.mktemp("generated")
    out = {}
    multi = root / "peft_multi" / "P"  # a pipeline adapter as PEFT folders per component
    for comp, model, targets in (("unet", tiny_unet(), ["to_q", "to_v", "proj_in", "conv1"]),
                                 ("text_encoder", tiny_clip_text(), ["q_proj", "fc1"])):
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, target_modules=targets,
                                                      rank_pattern={"to_v": 2}))
        randomize_lora(peft_model, seed=len(comp))
        peft_model.save_pretrained(multi / comp)
    assert set(loratool.load(multi).components) == {"unet", "text_encoder"}
    out["peft_multi"] = multi
    pm = get_peft_model(tiny_unet(), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=DORA_TARGETS))
    randomize_lora(pm, seed=2)
    pm.save_pretrained(root / "peft_dora" / "unet")  # a folder named after its component
    out["peft_dora"] = root / "peft_dora" / "unet"
    for name, algo, kw in (("lycoris_dora", "locon", {"dora_wd": True}), ("lycoris_loha_conv", "loha", {}),
                           ("lycoris_lokr_conv", "lokr", {"factor": 4})):
        net = lycoris_network(tiny_unet(), algo, LYCORIS_TARGETS, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0, **kw)
        out[name] = save(net, root / f"{name}.safetensors", torch.float32)
    return out


def _save(adapter, path: Path, layout: str) -> Path:
    files = loratool.save(adapter, path, layout)
    assert files and all(Path(f).exists() for f in files)
    return path


def _load(path: Path, layout: str, family: str | None):
    # A multi-component PEFT output (one folder per component) reads back as one adapter.
    return loratool.load(path, layout, family=family)


# Same-layout round trips are covered by each layout's own tests.
LAYOUT = {**{s: s for s in SOURCES}, **GENERATED}
PAIRS = [(s, m) for s in LAYOUT for m in SUFFIX if LAYOUT[s] != m]


@pytest.mark.parametrize("source, middle", PAIRS)
def test_there_and_back_is_bit_exact(tmp_path, generated, source, middle):
    layout = LAYOUT[source]
    original = loratool.load(SOURCES[source] if source in SOURCES else generated[source], family="sd1"
                             if source in GENERATED else None)
    family = "sd1" if source in GENERATED else FAMILY[source]
    there = tmp_path / f"there{SUFFIX[middle]}"
    if (source, middle) in REFUSED:
        with pytest.raises(FormatError, match=REFUSED[(source, middle)]):
            loratool.save(original, there, middle)
        assert not there.exists() and not list(tmp_path.iterdir())
        return
    _save(original, there, middle)
    mid = _load(there, middle, family)
    back_path = _save(mid, tmp_path / f"back{SUFFIX[layout]}", layout)
    back = _load(back_path, layout, family)

    assert set(back.modules) == set(original.modules)
    for key, m in original.modules.items():
        b = back.modules[key]
        assert (b.kind, b.layer, b.fan_in_fan_out) == (m.kind, m.layer, m.fan_in_fan_out), key
        assert b.weight_shape == m.weight_shape, key
        assert set(b.tensors) == set(m.tensors), key
        for name, t in m.tensors.items():
            assert b.tensors[name].dtype == t.dtype, (key, name)
            assert torch.equal(b.tensors[name], t), (key, name)
        assert b.scale == pytest.approx(m.scale, rel=1e-12, abs=0), key
        assert (b.magnitude is None) == (m.magnitude is None)
        if m.magnitude is not None:  # the layouts store it in their own shapes; the values are the same
            assert b.magnitude.dtype == m.magnitude.dtype and torch.equal(b.magnitude.reshape(-1),
                                                                          m.magnitude.reshape(-1)), key
            assert b.hints.get("dora_axis", "out") == m.hints.get("dora_axis", "out"), key
    if any(m.magnitude is not None for m in original):
        # ... and so is what they merge to (each layout's strength semantics agree at λ = 1)
        w = {m.key: torch.randn(m.weight_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
             for m in original}
        for key, m in original.modules.items():
            torch.testing.assert_close(merge_weight(w[key], back.modules[key], dtype=torch.float64),
                                       merge_weight(w[key], m, dtype=torch.float64), rtol=0, atol=0)
