"""kohya layout: read (names, alpha, conv, DoRA), write (round trip, metadata, hashes).

Oracles: diffusers' own kohya converter + ``load_lora_adapter`` / ``fuse_lora`` (SD1 U-Net and
text-encoder names, alpha handling, ΔW), PEFT ``merge_and_unload`` (GPT-2 Conv1D), and an
independent re-implementation of kohya's hash definitions over the written bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_clip_text, tiny_gpt2, tiny_unet

import loratool
from loratool import formats
from loratool.delta import delta_weight, merge_weight
from loratool.errors import FormatError, OutputError
from loratool.formats import ReadOptions, WriteOptions, kohya
from loratool.formats.source import open_source

KOHYA_META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_base_model_version": "sd_v1",
    "ss_tag_frequency": json.dumps({"img": {"cat": 3}}),
    "ss_output_name": "tiny",
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "tiny",
    "sshs_model_hash": "stale",
    "sshs_legacy_hash": "stale",
}


def _factors(mod, r, gen, dtype):
    if isinstance(mod, torch.nn.Linear):
        return (torch.randn(r, mod.in_features, generator=gen).to(dtype),
                torch.randn(mod.out_features, r, generator=gen).to(dtype))
    return (torch.randn(r, mod.in_channels, *mod.kernel_size, generator=gen).to(dtype),
            torch.randn(mod.out_channels, r, 1, 1, generator=gen).to(dtype))


def kohya_sd1_state_dict(dtype=torch.float32, alpha_dtype=None, r=4):
    """A kohya SD1 LoRA/LoCon the way sd-scripts names it: attentions + resnets, CLIP linears."""
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    unet, te = tiny_unet(), tiny_clip_text()
    targets = [("lora_unet", n, m) for n, m in unet.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ("attentions" in n or "resnets" in n)]
    # transformers >= 5 drops ``text_model.`` from CLIPTextModel; kohya names keep it.
    targets += [("lora_te", "text_model." + n, m) for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (prefix, path, mod) in enumerate(targets):
        head = f"{prefix}_{path.replace('.', '_')}"
        down, up = _factors(mod, r, gen, dtype)
        sd[f"{head}.lora_down.weight"], sd[f"{head}.lora_up.weight"] = down, up
        sd[f"{head}.alpha"] = torch.tensor(2.0 if prefix == "lora_unet" else 3.0, dtype=alpha_dtype or dtype)
        if i % 7 == 3 and prefix == "lora_te":
            # Missing alpha means alpha = r (sd-scripts). Only in the text encoder: diffusers'
            # loader would give an alpha-less U-Net module the file's most common alpha instead.
            del sd[f"{head}.alpha"]
    return sd, unet, te


def _write(tmp_path, sd, meta=None, name="k.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path), meta)
    return path


def test_sd1_matches_diffusers_converter_and_fuse(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft

    sd, unet, _ = kohya_sd1_state_dict()
    path = _write(tmp_path, sd, KOHYA_META)
    adapter = loratool.load(path)
    assert adapter.source_format == "kohya"

    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    # U-Net: diffusers loads the converted file into the real model and fuses it.
    unet.double()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_lora_adapter({k: v.double() for k, v in converted.items() if k.startswith("unet.")}, prefix="unet",
                           network_alphas={k: v for k, v in alphas.items() if k.startswith("unet.")})
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    fused = unet.state_dict()
    changed = {k[: -len(".weight")] for k in base if k.endswith(".weight") and not torch.equal(base[k], fused[k])}
    ours = {m.path: m for m in adapter.by_component("unet")}
    assert set(ours) == changed
    for p, m in ours.items():
        torch.testing.assert_close(merge_weight(base[p + ".weight"], m, dtype=torch.float64), fused[p + ".weight"],
                                   rtol=1e-10, atol=1e-10)
    # Text encoder: the converter's names, factors and alphas (normalised by diffusers' own PEFT renamer).
    te_sd = convert_state_dict_to_peft({k: v for k, v in converted.items() if k.startswith("text_encoder.")})
    te_alpha = convert_state_dict_to_peft({k[: -len(".alpha")]: v for k, v in alphas.items()
                                           if k.startswith("text_encoder.")})
    te = {m.path: m for m in adapter.by_component("text_encoder")}
    assert {f"text_encoder.{p}.lora_A.weight" for p in te} == {k for k in te_sd if k.endswith("lora_A.weight")}
    for p, m in te.items():
        assert torch.equal(m.tensors["down"], te_sd[f"text_encoder.{p}.lora_A.weight"])
        assert torch.equal(m.tensors["up"], te_sd[f"text_encoder.{p}.lora_B.weight"])
        assert m.effective_alpha == te_alpha.get(f"text_encoder.{p}.lora_A.weight", m.rank)


def test_roundtrip_is_bit_exact(tmp_path):
    sd, _, _ = kohya_sd1_state_dict(dtype=torch.float16, alpha_dtype=torch.bfloat16)
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(0.3, dtype=torch.bfloat16)
    src = _write(tmp_path, sd, dict(KOHYA_META, ss_network_alpha="Dynamic"))  # alphas 2, 3 and 0.3
    out = tmp_path / "out.safetensors"
    loratool.save(loratool.load(src), out, "kohya")
    a, b = load_file(src), load_file(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    meta_in, meta_out = open_source(src).metadata, open_source(out).metadata
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("sshs_")}  # noqa: E731
    assert strip(meta_in) == strip(meta_out)
    assert meta_out["sshs_model_hash"] != "stale"


def _independent_hashes(path) -> tuple[str, str]:
    """sd-scripts' definitions, re-derived from the written bytes.

    model hash: sha256 of everything after the 8-byte length and the header. legacy hash: sha256
    of 0x10000 bytes at 0x100000 of the file kohya serialises *with only ss_* metadata*: same
    data area, header rebuilt as safetensors writes it (compact JSON padded with spaces to 8).
    """
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    data = raw[8 + n:]
    meta = {k: v for k, v in header.pop("__metadata__").items() if k.startswith("ss_")}
    rebuilt = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    rebuilt += b" " * (-len(rebuilt) % 8)
    kohya_bytes = struct.pack("<Q", len(rebuilt)) + rebuilt + data
    legacy = hashlib.sha256(kohya_bytes[0x100000:0x110000]).hexdigest()[:8]
    return hashlib.sha256(data).hexdigest(), legacy


def test_hashes_follow_sd_scripts(tmp_path):
    gen = torch.Generator().manual_seed(1)
    sd = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(64, 4096, generator=gen),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 64, generator=gen),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(32.0),
    }
    meta = dict(KOHYA_META, **{"modelspec.description": "x" * 5000})
    out = tmp_path / "out.safetensors"
    loratool.save(loratool.load(_write(tmp_path, sd, meta)), out, "kohya")
    written = open_source(out).metadata
    model, legacy = _independent_hashes(out)
    assert written["sshs_model_hash"] == model
    assert written["sshs_legacy_hash"] == legacy
    # The user metadata is left out of the hash: hashing the written file itself differs.
    assert legacy != hashlib.sha256(out.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert written["ss_network_dim"] == "64" and written["ss_network_alpha"] == "32.0"


def test_network_dim_dynamic_and_spelling_kept(tmp_path):
    gen = torch.Generator().manual_seed(2)
    sd = {}
    for i, r in enumerate((4, 8)):
        head = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        sd[f"{head}.lora_down.weight"] = torch.randn(r, 32, generator=gen)
        sd[f"{head}.lora_up.weight"] = torch.randn(32, r, generator=gen)
        sd[f"{head}.alpha"] = torch.tensor(float(r))
    out = tmp_path / "dyn.safetensors"
    loratool.save(loratool.load(_write(tmp_path, sd, {"ss_network_dim": "4", "ss_v2": "False"})), out, "kohya")
    meta = open_source(out).metadata
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_v2"] == "False"


def test_network_dim_kept_while_it_describes_linear_and_conv_ranks(tmp_path):
    """A LyCORIS LoCon trained with network_dim 4 / alpha 2 and conv_dim 8 / conv_alpha 1: its header
    (written as sd-scripts' train_network does) still describes it after a no-op conversion."""
    import lycoris

    from loratool.ops.convert import convert

    net = lycoris.create_lycoris(tiny_unet(), 1.0, linear_dim=4, linear_alpha=2.0, algo="locon", conv_dim=8,
                                 conv_alpha=1.0)
    net.apply_to()
    assert {m.lora_dim for m in net.loras} == {4, 8}
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2.0",
            "ss_network_args": json.dumps({"algo": "locon", "conv_dim": "8", "conv_alpha": "1"}),
            "ss_base_model_version": "sd_v1"}
    src = tmp_path / "locon.safetensors"
    net.save_weights(str(src), torch.float32, meta)
    out = tmp_path / "out.safetensors"
    convert(src, "kohya", out)
    written = open_source(out).metadata
    assert (written["ss_network_dim"], written["ss_network_alpha"]) == ("4", "2.0")
    assert written["ss_network_args"] == meta["ss_network_args"]
    a, b = load_file(src), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # once the ranks no longer fit the header, it says Dynamic
    adapter = loratool.load(out)
    first = next(m for m in adapter if m.layer == "linear")
    first.tensors["down"], first.tensors["up"] = first.tensors["down"][:2], first.tensors["up"][:, :2]
    loratool.save(adapter, tmp_path / "cut.safetensors", "kohya")
    assert open_source(tmp_path / "cut.safetensors").metadata["ss_network_dim"] == "Dynamic"


def test_conv_tucker_and_missing_alpha(tmp_path):
    gen = torch.Generator().manual_seed(3)
    head = "lora_unet_down_blocks_0_resnets_0_conv1"
    sd = {f"{head}.lora_down.weight": torch.randn(4, 32, 1, 1, generator=gen),
          f"{head}.lora_mid.weight": torch.randn(4, 4, 3, 3, generator=gen),
          f"{head}.lora_up.weight": torch.randn(32, 4, 1, 1, generator=gen)}
    adapter = loratool.load(_write(tmp_path, sd), family="sd1")
    (m,) = list(adapter)
    assert adapter.source_format == "lycoris" and m.layer == "conv" and m.scale == 1.0
    # Oracle: running the three convs in sequence equals one conv with ΔW.
    x = torch.randn(1, 32, 8, 8, dtype=torch.float64)
    chain = torch.nn.functional.conv2d(x, sd[f"{head}.lora_down.weight"].double())
    chain = torch.nn.functional.conv2d(chain, sd[f"{head}.lora_mid.weight"].double(), padding=1)
    chain = torch.nn.functional.conv2d(chain, sd[f"{head}.lora_up.weight"].double())
    once = torch.nn.functional.conv2d(x, delta_weight(m, dtype=torch.float64, shape=(32, 32, 3, 3)), padding=1)
    torch.testing.assert_close(once, chain, rtol=1e-10, atol=1e-10)


def test_gpt2_conv1d_matches_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2()
    base = model.transformer.h[0].attn.c_attn.weight.detach().double().clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    gen = torch.Generator().manual_seed(4)
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=gen))
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen))
    head = "lora_te_transformer_h_0_attn_c_attn"
    sd = {f"{head}.lora_down.weight": layer.lora_A["default"].weight.detach().clone(),
          f"{head}.lora_up.weight": layer.lora_B["default"].weight.detach().clone(),
          f"{head}.alpha": torch.tensor(8.0)}
    adapter = loratool.load(_write(tmp_path, sd))
    (m,) = list(adapter)
    assert (m.component, m.path, m.fan_in_fan_out) == ("model", "transformer.h.0.attn.c_attn", True)
    peft_model.double()
    merged = peft_model.merge_and_unload().transformer.h[0].attn.c_attn.weight.detach()
    torch.testing.assert_close(merge_weight(base, m, dtype=torch.float64), merged, rtol=1e-10, atol=1e-10)


def test_vocabulary_restores_any_prefix(tmp_path):
    gen = torch.Generator().manual_seed(5)
    sd = {"my_adapter_model_layers_1_mlp_up_proj.lora_down.weight": torch.randn(2, 32, generator=gen),
          "my_adapter_model_layers_1_mlp_up_proj.lora_up.weight": torch.randn(48, 2, generator=gen)}
    src = open_source(_write(tmp_path, sd))
    vocab = {"model": {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "lm_head"}}
    adapter = kohya.read(src, ReadOptions(vocabulary=vocab))
    assert list(adapter.modules) == [("model", "model.layers.1.mlp.up_proj")]


def test_family_from_metadata_sd2(tmp_path):
    sd, _, _ = kohya_sd1_state_dict()
    adapter = loratool.load(_write(tmp_path, sd, {"ss_base_model_version": "sd_v2"}))
    assert {m.hints["kohya_family"] for m in adapter} == {"sd2"}


def test_peft_dora_magnitude_written_as_output_axis_dora_scale(tmp_path):
    sd, _, _ = kohya_sd1_state_dict()
    adapter = loratool.load(_write(tmp_path, sd, KOHYA_META))
    m = adapter.modules[("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")]
    m.magnitude = torch.rand(32) + 0.5  # PEFT layout: one entry per output row
    out = tmp_path / "dora.safetensors"
    loratool.save(adapter, out, "kohya")
    again = loratool.load(out)
    m2 = again.modules[m.key]
    assert tuple(m2.magnitude.shape) == (32, 1) and m2.hints["dora_axis"] == "out"
    w = torch.randn(32, 32, dtype=torch.float64)
    torch.testing.assert_close(merge_weight(w, m2, dtype=torch.float64), merge_weight(w, m, dtype=torch.float64))


def test_detection_and_errors(tmp_path):
    gen = torch.Generator().manual_seed(6)
    good = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, generator=gen),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, generator=gen)}
    assert formats.detect(open_source(_write(tmp_path, good, name="g.safetensors"))) == "kohya"

    bad_name = {k.replace("proj_in", "proj_nowhere"): v for k, v in good.items()}
    with pytest.raises(FormatError, match="lora_unet_down_blocks_0_attentions_0_proj_nowhere"):
        loratool.load(_write(tmp_path, bad_name, name="b1.safetensors"), family="sd1")

    bad_rank = dict(good)
    bad_rank["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.randn(32, 3)
    with pytest.raises(FormatError, match="rank"):
        loratool.load(_write(tmp_path, bad_rank, name="b2.safetensors"), family="sd1")

    stray = dict(good, **{"lora_unet_down_blocks_0_attentions_0_proj_in.weird": torch.zeros(1)})
    with pytest.raises(FormatError, match="weird"):
        kohya.read(open_source(_write(tmp_path, stray, name="b3.safetensors")), ReadOptions(family="sd1"))

    unknown = {"lora_xyz_foo_bar.lora_down.weight": torch.randn(2, 4),
               "lora_xyz_foo_bar.lora_up.weight": torch.randn(4, 2)}
    with pytest.raises(FormatError, match="family"):
        loratool.load(_write(tmp_path, unknown, name="b4.safetensors"))

    adapter = loratool.load(tmp_path / "g.safetensors")
    with pytest.raises(OutputError):
        kohya.write(adapter, tmp_path / "g.safetensors", WriteOptions(inputs=(tmp_path / "g.safetensors",)))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
