"""LoRA Block Weight vectors / presets and ``--strength`` patterns.

The reference for which block a module is in is written here from the two tools' rules, on the
names those tools see, not through loratool's lookup:

* hako-mikan/sd-webui-lora-block-weight, ``scripts/lora_block_weight.py`` (commit b403cb7):
  ``ratiodealer`` picks the last of its ``BLOCKS`` substrings (``diffusion_model_input_blocks_{i}_``,
  ``..._middle_block_``, ``..._output_blocks_{i}_``, text-encoder keys → BASE) found in the A1111 key
  (the LDM/SGM name), a short vector is widened to 26 with zeros (``to26``), a module in no block
  keeps ratio 1; for Flux ``get_flux_blocks`` on the BFL key: ``double_blocks_{i}`` → D, ``single_blocks_{i}``
  → S, a key holding ``_in`` → IN, ``final_layer`` → OUT, CLIP / T5 for the text encoders.
* kohya-ss/sd-scripts ``networks/svd_merge_lora.py`` (commit 48d368f): ``get_lbw_block_index`` (SD1 from
  diffusers-named kohya keys: down (3b + j + 1), downsamplers 3(b + 1), up 14 + 3b + j, upsamplers 3b + 2,
  mid 13; SDXL from ``input_blocks_{i}``), and only the listed blocks are scaled (the others keep 1).

The SD1 reference uses that index arithmetic on diffusers names; the SDXL reference the extension's
substring rule on the SGM names of the shipped SDXL table; Flux the BFL names of ``arch.flux``'s table.
Merges are checked against PEFT's own ``get_delta_weight`` with each layer's scaling multiplied by the
reference block weight.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from merge_oracles import save_base
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from tiny_models import randomize_lora, tiny_clip_text, tiny_unet

from loratool.adapter import Adapter, LoraModule
from loratool.arch import flux, load_table, sdxl
from loratool.cli import main
from loratool.errors import UsageError
from loratool.ops.block_weights import block_of, module_weights, parse_block_weights, tables
from loratool.ops.merge import merge
from loratool.ops.stack import stack

ID26 = ["BASE"] + [f"IN{i:02}" for i in range(12)] + ["M00"] + [f"OUT{i:02}" for i in range(12)]
IDFLUX = ["CLIP", "T5", "IN"] + [f"D{i:02}" for i in range(19)] + [f"S{i:02}" for i in range(38)] + ["OUT"]


# ------------------------------------------------------------------ the reference
def _sd1_block(component: str, path: str) -> str | None:
    """kohya's get_lbw_block_index arithmetic on diffusers names (conv_in is the extension's IN00)."""
    if component.startswith("text_encoder"):
        return "BASE"
    if path == "conv_in":
        return "IN00"
    if path.startswith("mid_block."):
        return "M00"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.", path + ".")
    if m is None:
        return None
    b, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
    if m.group(1) == "down":
        return f"IN{3 * (b + 1) if kind == 'downsamplers' else 3 * b + j + 1:02}"
    return f"OUT{3 * b + 2 if kind == 'upsamplers' else 3 * b + j:02}"


def _extension_sd_block(key: str) -> str | None:
    """ratiodealer's SD branch on an A1111 key (the last BLOCKS entry found wins)."""
    found = None
    for i, block in enumerate(ID26[1:], start=1):
        kind = "input_blocks" if block.startswith("IN") else "output_blocks" if block.startswith("OUT") else None
        needle = f"diffusion_model_{kind}_{int(block[-2:])}_" if kind else "diffusion_model_middle_block_"
        if needle in key:
            found = ID26[i]
    return found


def _extension_flux_block(key: str) -> str | None:
    if "t5xxl" in key:
        return "T5"
    if "clip_" in key:
        return "CLIP"
    index = re.search(r"_(\d+)_", key)
    if "double_blocks" in key:
        return f"D{int(index.group(1)):02}"
    if "single_blocks" in key:
        return f"S{int(index.group(1)):02}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    return None


def _sd1_modules():
    table = load_table("sd")["sd1"]
    return [("unet", p) for p in table["unet"]] + [("text_encoder", p) for p in table["text_encoder"]]


def _sdxl_modules():
    """(component, diffusers path, the A1111 key of the U-Net module from its SGM name)."""
    out = [(c, p, None) for c in ("text_encoder", "text_encoder_2") for p in sdxl.text_encoder_paths(c)]
    for sgm, diff in sdxl.unet_map().items():
        out.append(("unet", diff, "diffusion_model_" + sgm.replace(".", "_")))
    return out


def _flux_modules():
    data = load_table("flux_modules")
    out = [("text_encoder", p, "clip_l_" + p.replace(".", "_")) for p in data["text_encoder"]]
    out += [("text_encoder_2", p, "t5xxl_" + p.replace(".", "_")) for p in data["text_encoder_2"]]
    for native, parts in flux.module_table(data["num_layers"], data["num_single_layers"]).items():
        for diff in parts:
            out.append(("transformer", diff, "diffusion_model_" + native.replace(".", "_") + "_weight"))
    return out


def _reference_weight(values: list[float], block: str | None, kohya: bool, ids: list[str]) -> float:
    if block is None:
        return 1.0
    listed = dict(zip(ids, values))
    return listed.get(block, 1.0 if kohya else 0.0)


def _vectors(n_ids: list[str], seed: int):
    rng = random.Random(seed)
    return [round(rng.uniform(-1, 1.5), 3) for _ in n_ids]


def _module(component, path):
    return LoraModule(component, path, tensors={"down": torch.zeros(1, 1), "up": torch.zeros(1, 1)})


@pytest.mark.parametrize("n", [12, 17, 20, 26])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sd_vectors_map_like_the_extension_and_kohya(family, n):
    ids = tables()["ids"][str(n)]
    values = _vectors(ids, n)
    ext = parse_block_weights(",".join(str(v) for v in values))
    koh = parse_block_weights(json.dumps(values))
    mods = [(c, p, None) for c, p in _sd1_modules()] if family == "sd1" else _sdxl_modules()
    checked = set()
    for comp, path, key in mods:
        ours = block_of(_module(comp, path), family)
        want = _sd1_block(comp, path) if key is None else _extension_sd_block(key)
        if family == "sd1" and comp == "unet":
            # the SD1 arithmetic agrees with the extension's substring rule on the LDM name
            ldm = sdxl.diffusers_to_sgm(path, 2, {1, 2, 3})
            assert _extension_sd_block("diffusion_model_" + ldm.replace(".", "_") + "_" if ldm else "") == want
        assert ours == want, (comp, path)
        assert ext.weight(ours) == _reference_weight(values, want, False, ids)
        assert koh.weight(ours) == _reference_weight(values, want, True, ids)
        checked.add(want)
    assert {"BASE", "M00", "IN04", "OUT05"} <= checked


@pytest.mark.parametrize("n", [61, 57])
def test_flux_vectors_map_like_the_extension(n):
    ids = IDFLUX if n == 61 else IDFLUX[3:-1]
    values = _vectors(ids, n)
    vec = parse_block_weights(",".join(str(v) for v in values))
    seen = set()
    for comp, path, key in _flux_modules():
        want = _extension_flux_block(key)
        ours = block_of(_module(comp, path), "flux")
        assert ours == want, (comp, path, key)
        expected = _reference_weight(values, want, n == 57, ids)
        assert vec.weight(ours) == expected
        seen.add(want)
    assert seen == set(IDFLUX)


@pytest.mark.parametrize("name", sorted(tables()["presets"]))
def test_every_preset_weights_every_module_as_the_extension(name):
    values = tables()["presets"][name]
    vec = parse_block_weights(name)
    if len(values) == 61:
        for comp, path, key in _flux_modules():
            block = _extension_flux_block(key)
            assert vec.weight(block_of(_module(comp, path), "flux")) == _reference_weight(values, block, False, IDFLUX)
        return
    ids = tables()["ids"][str(len(values))]
    for comp, path, key in _sdxl_modules():
        block = _extension_sd_block(key) if key else "BASE"
        assert vec.weight(block_of(_module(comp, path), "sdxl")) == _reference_weight(values, block, False, ids)
    for comp, path in _sd1_modules():
        block = _sd1_block(comp, path)
        assert vec.weight(block_of(_module(comp, path), "sd1")) == _reference_weight(values, block, False, ids)


@pytest.mark.skipif(not os.environ.get("LORATOOL_LBW_SOURCE"), reason="set LORATOOL_LBW_SOURCE to the extension's "
                    "scripts/lora_block_weight.py to compare the shipped tables with it")
def test_shipped_tables_equal_the_extension_source():
    """The literals of the extension's file (read with ast, never run) equal arch/block_weights.json."""
    tree = ast.parse(Path(os.environ["LORATOOL_LBW_SOURCE"]).read_text(encoding="utf-8"))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    for n in ("12", "17", "20", "26"):
        assert ast.literal_eval(found[f"BLOCKID{n}"]) == tables()["ids"][n]
    blocks = ast.literal_eval(found["BLOCKS"])
    prefixes = tables()["schemes"]["sd"]["unet_ldm_prefixes"]
    assert [b.removeprefix("diffusion_model_") for b in blocks[1:26]] == [p.replace(".", "_") + "_"
                                                                          for p in prefixes.values()]
    text = "".join(v.value for v in found["DEF_WEIGHT_PRESET"].values if isinstance(v, ast.Constant))
    for line in text.split("\n"):
        if not line.strip() or line.startswith("FLUXALL"):
            continue
        name, values = line.split(":")
        assert [float(x) for x in values.split(",")] == [float(x) for x in tables()["presets"][name]]


# ------------------------------------------------------------------ parsing and patterns
def test_strength_patterns_last_match_wins():
    ad = Adapter()
    for comp, path in (("unet", "up_blocks.1.attentions.0.proj_in"), ("unet", "down_blocks.0.resnets.0.conv1"),
                       ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")):
        ad.add(_module(comp, path))
    mw = module_weights([ad], ["INS"], ["text_encoder:0.5", "up_blocks.*:0.8", "up_blocks.1.attentions:0.3",
                                       "IN01:2", "nothing.here:9"])
    up, down, te = list(ad)
    assert mw.factor(0, up) == 0.3
    assert mw.factor(0, down) == 2.0  # IN01 is the block of down_blocks.0.resnets.0
    assert mw.factor(0, te) == 0.5
    assert any("nothing.here" in w for w in mw.warnings())


def test_modules_in_no_block_keep_1_with_a_warning():
    ad = Adapter()
    ad.add(_module("unet", "time_embedding.linear_1"))
    mw = module_weights([ad], ["NONE"], None)
    assert mw.factor(0, next(iter(ad))) == 1.0
    assert any("time_embedding.linear_1" in w for w in mw.warnings())


@pytest.mark.parametrize("text,message", [
    ("1,2,3", "3 numbers"), ("1,x,3", "not a number"), ("[1, true]", "JSON list"), ("BOGUS", "not a preset"),
])
def test_bad_vectors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_block_weights(text)


def test_flux_vector_on_an_sd_lora_is_refused():
    ad = Adapter()
    ad.add(_module("unet", "conv_in"))
    with pytest.raises(UsageError, match="FLUX vector"):
        module_weights([ad], ["FLUXALL"], None)


# ------------------------------------------------------------------ merge and stack vs PEFT per block
UNET_TARGETS = ["to_q", "to_k", "proj_in", "conv1", "conv_shortcut"]
TE_TARGETS = ["q_proj", "fc1"]


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bw")
    unet, te = tiny_unet().double(), tiny_clip_text().double()
    base_unet, base_te = {k: v.clone() for k, v in unet.state_dict().items()}, \
        {k: v.clone() for k, v in te.state_dict().items()}
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS)
    tcfg = LoraConfig(r=4, lora_alpha=2, target_modules=TE_TARGETS)
    unet = inject_adapter_in_model(ucfg, unet)
    te = inject_adapter_in_model(tcfg, te)
    randomize_lora(unet)
    randomize_lora(te, seed=2)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    pipe = folder / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "text_encoder").mkdir()
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    (pipe / "unet" / "config.json").write_text(json.dumps(dict(tiny_unet().config)))
    (pipe / "text_encoder" / "config.json").write_text("{}")
    save_base(base_unet, pipe / "unet" / "diffusion_pytorch_model.safetensors")
    save_base(base_te, pipe / "text_encoder" / "model.safetensors")
    return {"file": folder / "pytorch_lora_weights.safetensors", "pipe": pipe, "models": {"unet": unet,
            "text_encoder": te}, "base": {"unet": base_unet, "text_encoder": base_te}}


def _peft_expected(sd_lora, factor) -> dict[str, dict[str, torch.Tensor]]:
    """W + PEFT's get_delta_weight with the layer's scaling × factor(component, path)."""
    out = {}
    for comp, model in sd_lora["models"].items():
        want = dict(sd_lora["base"][comp])
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            saved = layer.scaling["default"]
            layer.scaling["default"] = saved * factor(comp, name)
            want[f"{name}.weight"] = want[f"{name}.weight"] + layer.get_delta_weight("default").detach()
            layer.scaling["default"] = saved
        out[comp] = want
    return out


def _check(out_file: Path, want: dict[str, torch.Tensor], base: dict[str, torch.Tensor], tol: float) -> int:
    """Every tensor within ``tol`` of the oracle (relative to its change); returns how many changed."""
    got = load_file(str(out_file))
    assert set(got) == set(want)
    changed = 0
    for key, value in want.items():
        update = float((value - base[key]).norm())
        if update == 0:
            assert torch.equal(got[key], value), key
            continue
        changed += 1
        err = float((got[key] - value).norm()) / update
        assert err < tol, (key, err)
    return changed


def test_block_weight_merge_equals_peft_per_block(sd_lora, tmp_path):
    values = [round(0.1 * i - 0.7, 2) for i in range(26)]
    patterns = ["up_blocks.1.attentions.0.*:0.25", "text_encoder.text_model.encoder.layers.1:-1"]

    def factor(comp, path):
        if comp == "unet" and path.startswith("up_blocks.1.attentions.0."):
            return 0.25
        # (transformers 5 names the tiny CLIP's modules without the text_model. loratool's names carry)
        if comp == "text_encoder" and path.removeprefix("text_model.").startswith("encoder.layers.1."):
            return -1.0
        return _reference_weight(values, _sd1_block(comp, path), False, ID26)

    out = tmp_path / "merged"
    result = merge(sd_lora["pipe"], [sd_lora["file"]], out, device="cpu", block_weights=[",".join(map(str, values))],
                   strength_patterns=patterns)
    assert not result.unmatched and not result.warnings
    want = _peft_expected(sd_lora, factor)
    base = sd_lora["base"]
    assert _check(out / "unet" / "diffusion_pytorch_model.safetensors", want["unet"], base["unet"], 1e-12) > 10
    assert _check(out / "text_encoder" / "model.safetensors", want["text_encoder"], base["text_encoder"], 1e-12) == 4


def test_block_weight_stack_scales_each_module(sd_lora):
    import loratool
    from loratool.delta import delta_weight

    adapter = loratool.load(sd_lora["file"])
    res = stack([adapter, adapter], [1.0, 0.5], device="cpu",
                module_weights=module_weights([adapter, adapter], ["OUTALL", "INS"], None))
    ins, outall = tables()["presets"]["INS"], tables()["presets"]["OUTALL"]
    ids = tables()["ids"]["17"]
    for key, out in res.adapter.modules.items():
        block = _sd1_block(*key)
        f = 1.0 * _reference_weight(outall, block, False, ids) + 0.5 * _reference_weight(ins, block, False, ids)
        want = f * delta_weight(adapter.modules[key], dtype=torch.float64)
        assert torch.allclose(delta_weight(out, dtype=torch.float64), want, rtol=0, atol=1e-12), key


def test_info_blocks_lists_the_modules_of_each_entry(sd_lora, capsys):
    assert main(["info", str(sd_lora["file"]), "--blocks", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["family"] == "sd1"
    blocks = doc["blocks"]
    assert all(m.startswith("text_encoder:") for m in blocks["BASE"]) and len(blocks["BASE"]) == 4
    assert "unet:down_blocks.0.attentions.0.proj_in" in blocks["IN01"]
    assert all(_sd1_block(*m.split(":")) == b for b, mods in blocks.items() for m in mods)
    assert main(["info", str(sd_lora["file"]), "--blocks"]) == 0
    assert "IN01" in capsys.readouterr().out


def test_cli_merge_block_weights_and_errors(sd_lora, tmp_path, capsys):
    out = tmp_path / "m"
    code = main(["merge", str(sd_lora["pipe"]), str(sd_lora["file"]), "-o", str(out), "--block-weights", "MIDD",
                 "--strength", "conv1:0", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["warnings"] == []
    code = main(["merge", str(sd_lora["pipe"]), str(sd_lora["file"]), "-o", str(tmp_path / "m2"),
                 "--block-weights", "1,2,3"])
    err = capsys.readouterr().err
    assert code == 2 and "3 numbers" in err and not (tmp_path / "m2").exists()
