"""diffusers layout against diffusers and PEFT: files written by ``save_lora_weights`` read with
PEFT's scales and ΔW; written files load through ``load_lora_into_unet`` with every key placed
and fuse to the source's weights; round trips (diffusers↔diffusers, PEFT↔diffusers) are bit-exact."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import randomize_lora, tiny_clip_text, tiny_unet

from loratool import api, formats
from loratool.adapter import Adapter, LoraModule
from loratool.delta import delta_weight, merge_weight
from loratool.errors import FormatError
from loratool.formats import diffusers as fmt
from loratool.formats import peft as peft_fmt
from loratool.formats.source import open_source

UNET_CFG = dict(
    r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_out.0", "conv1", "proj_in"],
    rank_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2},
    alpha_pattern={"to_out.0": 3, "conv1": 6.5},
)
TE_CFG = dict(r=2, lora_alpha=5, target_modules=["q_proj", "out_proj", "fc1"], use_rslora=True)


def _adapted(model, cfg: dict, seed: int):
    """Inject a LoRA (PEFT's own injection, as diffusers / transformers do) with random weights."""
    config = LoraConfig(**cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}
    randomize_lora(model, seed=seed)
    return model


def _layers(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _fused(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge(adapter_names=[adapter_name])
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    """A diffusers file with a U-Net and a (flattened, transformers 5) CLIP text encoder LoRA."""
    unet = _adapted(tiny_unet().double(), UNET_CFG, seed=1)
    te = _adapted(tiny_clip_text().double(), TE_CFG, seed=2)
    folder = tmp_path_factory.mktemp("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Loader.save_lora_weights(
            folder, unet_lora_layers=get_peft_model_state_dict(unet),
            text_encoder_lora_layers=get_peft_model_state_dict(te),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict(),
        )
    return folder / "pytorch_lora_weights.safetensors", unet, te


def _read(path: Path):
    return fmt.read(open_source(path), formats.ReadOptions())


def _assert_matches(adapter, component: str, model, te_flat: bool = False) -> None:
    layers = _layers(model)
    mods = adapter.by_component(component)
    paths = {m.hints.get("file_path", m.path) for m in mods}
    assert paths == set(layers)
    for m in mods:
        layer = layers[m.hints.get("file_path", m.path)]
        assert m.rank == layer.r["default"]
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-15)
        got = delta_weight(m, dtype=torch.float64, shape=tuple(layer.get_base_layer().weight.shape))
        torch.testing.assert_close(got, layer.get_delta_weight("default"), rtol=1e-12, atol=1e-14)


def test_read_metadata_patterns_rslora(sd_lora):
    path, unet, te = sd_lora
    src = open_source(path)
    assert fmt.detect(src) and not peft_fmt.detect(src)
    adapter = fmt.read(src, formats.ReadOptions())
    assert sorted(adapter.components) == ["text_encoder", "unet"]
    assert adapter.modules[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")].rank == 2
    assert adapter.modules[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")].alpha == 3
    q = adapter.modules[("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")]
    assert q.hints["file_path"] == "encoder.layers.0.self_attn.q_proj" and q.rslora
    _assert_matches(adapter, "unet", unet)
    _assert_matches(adapter, "text_encoder", te)
    assert adapter.config["unet"]["rank_pattern"] == UNET_CFG["rank_pattern"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["lora_adapter_metadata"])


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_diffusers_roundtrip_bit_exact(sd_lora, tmp_path):
    path, _, _ = sd_lora
    out = tmp_path / "out.safetensors"
    assert api.save(_read(path), out, "diffusers") == [out]
    _assert_same_tensors(_tensors(path), _tensors(out))
    ma, mb = _meta(path), _meta(out)
    for comp in ("unet", "text_encoder"):
        for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "target_modules"):
            va, vb = ma[f"{comp}.{key}"], mb[f"{comp}.{key}"]
            assert (sorted(va) if isinstance(va, list) else va) == (sorted(vb) if isinstance(vb, list) else vb)


def _load_unet(path: Path):
    """diffusers' own loading path; asserts every file key became a LoRA parameter and vice versa."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd, alphas, meta = Loader.lora_state_dict(str(path), return_lora_metadata=True)
        unet = tiny_unet().double()
        Loader.load_lora_into_unet(sd, alphas, unet, adapter_name="x", metadata=meta)
    expected = {k[len("unet."):]: v for k, v in _tensors(path).items() if k.startswith("unet.")}
    loaded = get_peft_model_state_dict(unet, adapter_name="x")
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    return unet


def _load_text_encoder(path: Path):
    """What diffusers' ``_load_lora_into_text_encoder`` does (its key conversions, the LoraConfig
    from the header, strip ``text_model.`` for a flattened CLIP), with PEFT injecting directly:
    transformers' ``load_adapter`` refuses the installed PEFT version."""
    sd = {k[len("text_encoder."):]: v for k, v in _tensors(path).items() if k.startswith("text_encoder.")}
    meta = {k[len("text_encoder."):]: v for k, v in _meta(path).items() if k.startswith("text_encoder.")}
    sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
    te = tiny_clip_text().double()
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    config = LoraConfig(**meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(config, te, adapter_name="x")
        result = set_peft_model_state_dict(te, sd, adapter_name="x")
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    return te


def test_written_file_loads_and_fuses_like_source(sd_lora, tmp_path):
    path, unet, te = sd_lora
    adapter = _read(path)
    # re-express every scale: new patterns must still give each module its own alpha in diffusers
    for i, m in enumerate(adapter.by_component("unet")):
        m.alpha = 1.0 + i % 3
    out = tmp_path / "o.safetensors"
    api.save(adapter, out, "diffusers")
    loaded = _load_unet(out)
    fused = _fused(loaded, "x")
    base = tiny_unet().double().state_dict()
    for m in adapter.by_component("unet"):
        want = merge_weight(base[m.path + ".weight"], m, dtype=torch.float64)
        torch.testing.assert_close(fused[m.path + ".weight"], want, rtol=1e-12, atol=1e-13)
    # the text encoder (unchanged) fuses to exactly the source's fused weights
    fused_te = _fused(_load_text_encoder(out), "x")
    source_te = _fused(te)
    for k, v in source_te.items():
        torch.testing.assert_close(fused_te[k], v, rtol=0, atol=0)


def test_source_file_fuses_through_diffusers(sd_lora):
    """Oracle check of the fixture itself and of ``merge_weight``: diffusers' fuse == loratool merge."""
    path, _, _ = sd_lora
    fused = _fused(_load_unet(path), "x")
    base = tiny_unet().double().state_dict()
    for m in _read(path).by_component("unet"):
        want = merge_weight(base[m.path + ".weight"], m, dtype=torch.float64)
        torch.testing.assert_close(fused[m.path + ".weight"], want, rtol=1e-12, atol=1e-13)


def _old_style(sd: dict[str, torch.Tensor], text: bool) -> dict[str, torch.Tensor]:
    """PEFT keys -> the old processor style (attention) / diffusers style (other layers)."""
    out = {}
    for k, v in sd.items():
        path, slot = k.rsplit(".lora_", 1)
        ud = "down" if slot.startswith("A") else "up"
        attn, last = path.rsplit(".", 1)
        if text and last in ("q_proj", "out_proj"):
            out[f"{attn}.to_{last[0] if last == 'q_proj' else 'out'}_lora.{ud}.weight"] = v
        elif text:
            out[f"{path}.lora_linear_layer.{ud}.weight"] = v
        elif last in ("to_q", "to_k"):
            out[f"{attn}.processor.{last}_lora.{ud}.weight"] = v
        elif path.endswith("to_out.0"):
            out[f"{path[:-len('.to_out.0')]}.processor.to_out_lora.{ud}.weight"] = v
        else:
            out[f"{path}.lora.{ud}.weight"] = v
    return out


def test_old_key_styles_map_like_diffusers(sd_lora, tmp_path):
    path, unet, te = sd_lora
    new = _read(path)
    usd = {k[5:]: v for k, v in _tensors(path).items() if k.startswith("unet.")}
    tsd = {k[13:]: v for k, v in _tensors(path).items() if k.startswith("text_encoder.")}
    old_u, old_t = _old_style(usd, False), _old_style(tsd, True)
    # diffusers' own converters take the old keys back to the PEFT keys: the oracle for the mapping
    assert set(convert_unet_state_dict_to_peft(old_u)) == set(usd)
    assert set(convert_state_dict_to_peft(convert_state_dict_to_diffusers(old_t))) == set(tsd)
    old = {f"unet.{k}": v for k, v in old_u.items()} | {f"text_encoder.{k}": v for k, v in old_t.items()}
    for m in new:  # alphas as tensors (no metadata header in old files)
        stem = f"{m.component}.{m.hints.get('file_path', m.path)}"
        old[stem + ".alpha"] = torch.tensor(m.scale * m.rank)
    file = tmp_path / "old.safetensors"
    save_file(old, str(file))
    adapter = _read(file)
    assert adapter.modules.keys() == new.modules.keys()
    for key, m in adapter.modules.items():
        n = new.modules[key]
        assert m.scale == pytest.approx(n.scale, rel=1e-6)
        assert torch.equal(m.tensors["down"], n.tensors["down"]) and torch.equal(m.tensors["up"], n.tensors["up"])
    # without alphas diffusers' rule: alpha = r
    save_file({k: v for k, v in old.items() if not k.endswith(".alpha")}, str(file))
    assert all(m.scale == 1.0 and m.hints["alpha_assumed"] for m in _read(file))


def test_peft_diffusers_round_trips(sd_lora, tmp_path):
    path, _, _ = sd_lora
    # diffusers -> PEFT (one folder per component) -> diffusers: bit-exact
    api.save(_read(path), tmp_path / "p", "peft")
    back = Adapter(source_format="peft")
    for comp in ("unet", "text_encoder"):
        part = peft_fmt.read(open_source(tmp_path / "p" / comp), formats.ReadOptions())
        back.modules.update(part.modules)
        back.config.update(part.config)
    api.save(back, tmp_path / "d.safetensors", "diffusers")
    _assert_same_tensors(_tensors(path), _tensors(tmp_path / "d.safetensors"))
    # PEFT (a U-Net PeftModel folder) -> diffusers -> PEFT: bit-exact, and diffusers loads it
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_unet().double(), LoraConfig(r=3, lora_alpha=5, target_modules=["to_v", "conv2"],
                                                                use_dora=True))
        randomize_lora(model)
        model.save_pretrained(tmp_path / "unet")
    adapter = api.load(tmp_path / "unet")
    assert adapter.components == ["unet"]
    api.save(adapter, tmp_path / "u.safetensors", "diffusers")
    loaded = _load_unet(tmp_path / "u.safetensors")
    api.save(api.load(tmp_path / "u.safetensors"), tmp_path / "unet2", "peft")
    _assert_same_tensors(_tensors(tmp_path / "unet" / "adapter_model.safetensors"),
                         _tensors(tmp_path / "unet2" / "adapter_model.safetensors"))
    fused = _fused(loaded, "x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = model.merge_and_unload().state_dict()
    for m in adapter:
        torch.testing.assert_close(fused[m.path + ".weight"], source[m.path + ".weight"], rtol=1e-12, atol=1e-13)


def test_folder_output_and_errors(sd_lora, tmp_path):
    path, _, _ = sd_lora
    written = api.save(_read(path), tmp_path / "folder", "diffusers")
    assert written == [tmp_path / "folder" / "pytorch_lora_weights.safetensors"]

    plain = Adapter()
    plain.add(LoraModule("model", "x", tensors={"down": torch.ones(2, 4), "up": torch.ones(4, 2)}))
    with pytest.raises(FormatError, match="component 'model' has no diffusers prefix"):
        api.save(plain, tmp_path / "a.safetensors", "diffusers")
    loha = Adapter()  # diffusers holds LoKr adapters (LoKrConfig), not LoHa
    loha.add(LoraModule("unet", "x", kind="loha", tensors={k: torch.ones(2, 2) for k in ("w1a", "w1b", "w2a", "w2b")}))
    with pytest.raises(FormatError, match="not LoHa"):
        api.save(loha, tmp_path / "b.safetensors", "diffusers")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()

    sd = _tensors(path)
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file({**sd, "unet.mid_block.attentions.0.proj_in.alpha": torch.tensor(3.0)}, str(bad), metadata=md)
    with pytest.raises(FormatError, match="both an .alpha tensor"):
        _read(bad)
    save_file({**sd, "unet.mid_block.x.lora_weird.weight": torch.ones(2)}, str(bad), metadata=md)
    with pytest.raises(FormatError, match="lora_weird"):
        _read(bad)
