"""SD 1.x / SDXL LoRAs in trainer dialects: diffusers' old attention-processor files without the
``unet.`` prefix (``AttnProcsLayers``; ComfyUI comfy/lora.py maps them with ``diffusers_lora_prefix``
['', 'unet.']), OneTrainer SDXL files (``lora_unet_`` + diffusers names, ``lora_te1_`` / ``lora_te2_``;
OneTrainer modules/model/StableDiffusionXLModel.py), ComfyUI files (``diffusion_model.`` + SGM / LDM names,
any LyCORIS kind; comfy_extras/nodes_lora_extract.py) and ``--to native`` (ComfyUI's layout).

Oracles: diffusers' ``load_lora_adapter`` / pipeline ``lora_state_dict`` + ``fuse_lora``; lycoris'
``merge_to``; diffusers' kohya Flux converter reading what ``--to native`` writes.
"""

from __future__ import annotations

import lycoris
import pytest
import torch
from dialect_helpers import FULL_FLUX, as_loaded, assert_same_lora, bfl_shapes, factors, read_diffusers_file
from safetensors.torch import load_file, save_file
from test_arch_checkpoints import ldm_state_dict, sd1_unet, tiny_sdxl_unet
from test_family_merge import compare, fix_alpha_names, fused_state

import loratool
from loratool.arch import checkpoints, sdxl
from loratool.errors import FormatError
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
UP_ATTN = "up_blocks.1.attentions.2.transformer_blocks.0"


def processor_lora(unet, seed: int) -> dict[str, torch.Tensor]:
    """diffusers < 0.20 ``save_attn_procs`` keys: ``<attn>.processor.to_{q,k,v,out}_lora.{down,up}.weight``."""
    state = unet.state_dict()
    shapes = {}
    for block in (ATTN, UP_ATTN):
        for attn in ("attn1", "attn2"):
            for proj, param in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
                shapes[f"{block}.{attn}.processor.{proj}_lora"] = tuple(state[f"{block}.{attn}.{param}.weight"].shape)
    return factors(shapes, 2, seed, names=("down.weight", "up.weight"))


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_unprefixed_processor_lora_converts_and_merges_as_diffusers(tmp_path, suffix):
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unet = sd1_unet()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    sd = processor_lora(unet, seed=1)
    path = tmp_path / f"pytorch_lora_weights{suffix}"
    if suffix == ".bin":
        torch.save(sd, path)
    else:
        save_file(sd, path)
    info = inspect(path, family="sd1").to_json()
    assert (info["format"], info["dialect"], info["family"], info["module_count"]) == \
        ("diffusers", "diffusers-old", "sd1", 16)
    assert {m["path"] for m in info["modules"]} >= {f"{ATTN}.attn1.to_out.0", f"{UP_ATTN}.attn2.to_k"}

    convert(path, "diffusers", tmp_path / "out.safetensors", family="sd1")
    ours, scales = read_diffusers_file(tmp_path / "out.safetensors")
    theirs = {"unet." + k: v for k, v in convert_unet_state_dict_to_peft(dict(sd)).items()}
    assert assert_same_lora(ours, scales, theirs) == 16

    (tmp_path / "unet").mkdir()
    save_file(base_state, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    result = merge(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", [path], tmp_path / "merged.safetensors")
    assert result.matched == {"unet": 16} and not result.unmatched
    unet.load_lora_adapter(dict(sd), prefix=None)  # diffusers' own reading of unprefixed processor keys
    unet.fuse_lora()
    oracle = fused_state(unet)
    merged = load_file(tmp_path / "merged.safetensors")
    changed = [k for k in base_state if not torch.equal(oracle[k], base_state[k])]
    assert len(changed) == 16
    for k in base_state:
        torch.testing.assert_close(merged[k], oracle[k], rtol=1e-5, atol=1e-6)


# (diffusers' kohya key converter cannot place a diffusers-named ``add_embedding_linear_1``: it becomes
# ``add.embedding.linear``; loratool reads it, the comparison leaves it out)
SDXL_UNET = ["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "down_blocks.1.attentions.0.proj_in",
             "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
             "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v", "down_blocks.0.resnets.1.conv1"]


def test_onetrainer_sdxl_diffusers_names_convert_and_merge_as_diffusers(tmp_path):
    """OneTrainer SDXL LoRAs: kohya keys, but the U-Net in diffusers names (``lora_unet_down_blocks_1_...``),
    not kohya's SGM names; text encoders ``lora_te1_`` / ``lora_te2_``."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unet = tiny_sdxl_unet()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    shapes = {"lora_unet_" + p.replace(".", "_"): tuple(base_state[p + ".weight"].shape) for p in SDXL_UNET}
    sd = factors({k: v[:2] for k, v in shapes.items()}, 2, seed=2, names=("lora_down.weight", "lora_up.weight"))
    for k, shape in shapes.items():  # conv k×k: down [r, in, k, k], up [out, r, 1, 1]
        if len(shape) == 4:
            sd[k + ".lora_down.weight"] = torch.randn(2, *shape[1:]) * 0.1
            sd[k + ".lora_up.weight"] = torch.randn(shape[0], 2, 1, 1) * 0.1
        sd[k + ".alpha"] = torch.tensor(1.0 + len(k) % 3)
    # diffusers needs q and out together to recognise its old text-encoder key style, and loses a text-encoder
    # alpha under those names (its alpha keys keep the to_q_lora spelling): alpha = r there
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
          "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": (32, 32),
          "lora_te2_text_model_encoder_layers_1_mlp_fc1": (37, 32)}
    sd.update(factors(te, 2, seed=3, names=("lora_down.weight", "lora_up.weight"), alpha=2.0))
    # OneTrainer's header (DtypeModelSaverMixin._create_safetensors_header): modelspec, ot_*, kohya's version
    meta = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ot_branch": "master",
            "ot_revision": "0123abc", "ss_base_model_version": "sdxl_"}
    save_file(sd, tmp_path / "ot.safetensors", metadata=meta)
    info = inspect(tmp_path / "ot.safetensors").to_json()
    assert (info["format"], info["dialect"], info["family"]) == ("kohya", "onetrainer", "sdxl")
    assert info["component_modules"] == {"unet": len(SDXL_UNET), "text_encoder": 2, "text_encoder_2": 1}

    state, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(sd), unet_config=unet.config)
    alphas = fix_alpha_names(alphas)
    convert(tmp_path / "ot.safetensors", "diffusers", tmp_path / "out.safetensors")
    ours, scales = read_diffusers_file(tmp_path / "out.safetensors")
    unet_part = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
    theirs = {**{"unet." + k: v for k, v in convert_unet_state_dict_to_peft(unet_part).items()},
              **as_loaded({k: v for k, v in state.items() if not k.startswith("unet.")})}
    their_scales = {}
    for key in theirs:
        if key.endswith(".lora_A.weight"):
            m = key[: -len(".lora_A.weight")]
            rank = theirs[key].shape[0]
            their_scales[m] = alphas.get(m + ".alpha", rank) / rank
    assert assert_same_lora(ours, scales, theirs, their_scales) == len(SDXL_UNET) + 3

    ckpt = ldm_state_dict(unet, base_state)
    save_file(ckpt, tmp_path / "sdxl.safetensors")
    merge(tmp_path / "sdxl.safetensors", [tmp_path / "ot.safetensors"], tmp_path / "merged.safetensors")
    unet.load_lora_adapter({k: v for k, v in state.items() if k.startswith("unet.")}, prefix="unet",
                           network_alphas=alphas)
    unet.fuse_lora()
    oracle = fused_state(unet)
    merged = load_file(tmp_path / "merged.safetensors")
    touched = {k for k in oracle if not torch.equal(oracle[k], base_state[k])}
    assert len(touched) == len(SDXL_UNET)
    compare(merged, checkpoints.canonical_targets(list(merged)), oracle, "unet", touched)


def test_comfyui_sdxl_loha_merges_as_lycoris(tmp_path):
    """ComfyUI keys for a LyCORIS LoHa on SDXL: ``diffusion_model.`` + the SGM module path + ``hada_*``
    (comfy/lora.py's generic ``diffusion_model.<param>`` map; comfy/weight_adapter/loha.py)."""
    unet = tiny_sdxl_unet().double()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    net = lycoris.create_lycoris(unet, 1.0, linear_dim=2, linear_alpha=2.0, algo="loha")
    net.apply_to()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    up_attn = {i for i, t in enumerate(unet.config.up_block_types) if t.startswith("CrossAttn")}
    sd = {}
    for m in net.loras:
        path = next(n for n, mod in unet.named_modules() if mod is m.org_module[0])
        sgm = sdxl.diffusers_to_sgm(path, 2, up_attn)
        for k, v in m.state_dict().items():
            sd[f"diffusion_model.{sgm}.{k}"] = v.detach().clone()
    save_file(sd, tmp_path / "comfy.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    info = inspect(tmp_path / "comfy.safetensors").to_json()
    assert (info["format"], info["dialect"], info["family"], info["kinds"]) == \
        ("native", "comfyui", "sdxl", {"loha": len(net.loras)})
    save_file(ldm_state_dict(unet, base_state), tmp_path / "sdxl.safetensors")
    merge(tmp_path / "sdxl.safetensors", [tmp_path / "comfy.safetensors"], tmp_path / "merged.safetensors")
    net.merge_to(1.0)
    oracle = {k: v.detach().clone() for k, v in unet.state_dict().items() if k in base_state}
    merged = load_file(tmp_path / "merged.safetensors")
    touched = {k for k in oracle if not torch.equal(oracle[k], base_state[k])}
    assert len(touched) == len(net.loras)
    compare(merged, checkpoints.canonical_targets(list(merged)), oracle, "unet", touched)


def test_comfyui_sd1_ldm_names(tmp_path):
    """SD 1.x ComfyUI files carry LDM names (``diffusion_model.input_blocks.1.1.proj_in``); read into diffusers
    names, they equal the kohya file of the same tensors (kohya names SD 1.x with diffusers names)."""
    unet = sd1_unet()
    state = unet.state_dict()
    paths = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k":
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "output_blocks.4.1.proj_out": "up_blocks.1.attentions.1.proj_out",
             "middle_block.1.transformer_blocks.0.ff.net.2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2"}
    comfy = factors({f"diffusion_model.{k}": tuple(state[v + ".weight"].shape[:2]) for k, v in paths.items()}, 2,
                    seed=5, names=("lora_down.weight", "lora_up.weight"))
    kohya = {}
    for k, v in comfy.items():
        ldm, slot, weight = k[len("diffusion_model."):].rsplit(".", 2)
        kohya[f"lora_unet_{paths[ldm].replace('.', '_')}.{slot}.{weight}"] = v
    save_file(comfy, tmp_path / "comfy.safetensors")
    save_file(kohya, tmp_path / "kohya.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    a = loratool.load(tmp_path / "comfy.safetensors")  # no header, tiny widths: the names fit SD 1.x first
    b = loratool.load(tmp_path / "kohya.safetensors")
    assert (a.dialect, a.family) == ("comfyui", "sd1") and set(a.modules) == set(b.modules) == \
        {("unet", p) for p in paths.values()}
    for key, m in a.modules.items():
        assert all(torch.equal(t, b.modules[key].tensors[n]) for n, t in m.tensors.items())


# ------------------------------------------------------------------ --to native (ComfyUI's layout)


def test_to_native_flux_is_what_diffusers_reads_back(tmp_path):
    """``--to native`` writes BFL names behind ``diffusion_model.`` with alphas, the layout ComfyUI's LoraSave
    writes; diffusers' kohya Flux converter (which reads ComfyUI files) gets back the modules of the source,
    ΔW for ΔW."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    shapes = {k: v for k, v in bfl_shapes(**FULL_FLUX, guidance=False).items()
              if k.startswith(("double_blocks.0.", "single_blocks.3.", "img_in", "txt_in"))}
    kohya = factors({"lora_unet_" + k.replace(".", "_"): v for k, v in shapes.items()}, 2, seed=6,
                    names=("lora_down.weight", "lora_up.weight"), alpha=1.0)
    save_file(kohya, tmp_path / "kohya.safetensors", metadata={"ss_base_model_version": "flux1"})
    convert(tmp_path / "kohya.safetensors", "native", tmp_path / "comfy.safetensors")
    written = load_file(tmp_path / "comfy.safetensors")
    assert all(k.startswith("diffusion_model.") for k in written)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight" in written
    convert(tmp_path / "kohya.safetensors", "diffusers", tmp_path / "out.safetensors")
    ours, scales = read_diffusers_file(tmp_path / "out.safetensors")
    # ComfyUI reads both suffix spellings; diffusers' converter the kohya one
    renames = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}
    as_kohya_suffixes = {}
    for k, v in written.items():
        for a, b in renames.items():
            k = k.replace(a, b)
        as_kohya_suffixes[k] = v
    theirs = as_loaded(_convert_kohya_flux_lora_to_diffusers(as_kohya_suffixes))
    assert assert_same_lora(ours, scales, theirs) == len(loratool.load(tmp_path / "kohya.safetensors"))


def test_to_native_refuses_a_control_lora(tmp_path):
    from dialect_helpers import bfl_norms

    sd = factors({"img_in": (16, 16)}, 2, seed=8)
    sd.update({k: torch.ones(n) for k, n in bfl_norms(8, 1, 1).items()})
    save_file(sd, tmp_path / "ctrl.safetensors")
    with pytest.raises(FormatError, match="keep the original file"):
        convert(tmp_path / "ctrl.safetensors", "native", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_info_cli_names_format_dialect_family_and_modules(tmp_path):
    """The CLI: ``info --json`` carries ``dialect``; the table shows it."""
    import json
    import re
    import subprocess
    import sys

    unet = sd1_unet()
    save_file(processor_lora(unet, seed=9), tmp_path / "old.safetensors")
    run = [sys.executable, "-m", "loratool", "info", str(tmp_path / "old.safetensors"), "--family", "sd1"]
    data = json.loads(subprocess.run(run + ["--json"], capture_output=True, text=True, check=True).stdout)
    assert (data["format"], data["dialect"], data["family"], data["module_count"]) == \
        ("diffusers", "diffusers-old", "sd1", 16)
    assert all(m["component"] == "unet" and m["kind"] == "lora" for m in data["modules"])
    from loratool.cli.info_cmd import render
    from loratool.cli.render import console

    with console.capture() as captured:  # the human table, rendered in-process
        render(inspect(tmp_path / "old.safetensors", family="sd1"))
    assert re.search(r"format\s+│?\s*diffusers \(diffusers-old dialect\)", captured.get())


# ------------------------------------------------------------------ SD3


def test_comfyui_sd3_lora_merges_as_its_kohya_twin(tmp_path):
    """ComfyUI SD3 keys: ``diffusion_model.`` + MMDiT paths (``joint_blocks.0.x_block.attn.qkv``) with kohya
    suffixes; merged into the MMDiT single file it must give sd-scripts' merge on the native names (the
    oracle test_arch_sd3 checks diffusers against), fused q/k/v, split_qkv and swapped halves included."""
    from test_arch_sd3 import kohya_sd3_lora, merged_native, mmdit_state_dict, tiny_sd3

    native = mmdit_state_dict(tiny_sd3().state_dict())
    kohya_sd = kohya_sd3_lora(native)
    paths = {n.removeprefix("model.diffusion_model.").removesuffix(".weight") for n in native}
    by_head = {"lora_unet_" + p.replace(".", "_"): p for p in paths}
    comfy = {}
    for k, v in kohya_sd.items():
        head, suffix = k.split(".", 1)
        comfy[f"diffusion_model.{by_head[head]}.{suffix}"] = v
    save_file(native, tmp_path / "sd3.safetensors")
    save_file(comfy, tmp_path / "comfy.safetensors")
    info = inspect(tmp_path / "comfy.safetensors").to_json()
    assert (info["format"], info["dialect"], info["family"]) == ("native", None, "sd3")
    result = merge(tmp_path / "sd3.safetensors", [tmp_path / "comfy.safetensors"], tmp_path / "out.safetensors")
    assert not result.unmatched
    merged = load_file(tmp_path / "out.safetensors")
    for k, want in merged_native(native, kohya_sd).items():
        err = ((merged[k] - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err <= 1e-10, (k, err)


def test_onetrainer_sd3_mixture_merges_as_peft(tmp_path):
    """OneTrainer's SD3 mixture: ``lora_transformer_`` + diffusers names, header ot_* and modelspec; the update
    of a PEFT LoRA on diffusers' SD3 transformer, merged into the MMDiT single file == PEFT's merge_and_unload."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from test_arch_sd3 import mmdit_state_dict, tiny_sd3
    from tiny_models import randomize_lora

    model = tiny_sd3()
    native = mmdit_state_dict(model.state_dict())
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "add_k_proj",
                                                                                    "to_add_out", "proj_out"]))
    randomize_lora(peft_model, seed=12)
    sd = {}
    for k, v in get_peft_model_state_dict(peft_model).items():
        path, slot = k.removeprefix("base_model.model.").rsplit(".lora_", 1)
        head = "lora_transformer_" + path.replace(".", "_")
        sd[f"{head}.lora_{'down' if slot.startswith('A') else 'up'}.weight"] = v.detach().clone()
        sd[f"{head}.alpha"] = torch.tensor(3.0, dtype=v.dtype)
    meta = {"modelspec.architecture": "stable-diffusion-3-medium/lora", "ot_branch": "master", "ot_revision": "1"}
    save_file(sd, tmp_path / "ot.safetensors", metadata=meta)
    info = inspect(tmp_path / "ot.safetensors").to_json()
    assert (info["format"], info["dialect"], info["family"]) == ("kohya", "onetrainer", "sd3")
    save_file(native, tmp_path / "sd3.safetensors")
    merge(tmp_path / "sd3.safetensors", [tmp_path / "ot.safetensors"], tmp_path / "out.safetensors")
    merged = load_file(tmp_path / "out.safetensors")
    want = mmdit_state_dict(peft_model.merge_and_unload().state_dict())
    changed = 0
    for k, v in want.items():
        changed += not torch.equal(v, native[k])
        torch.testing.assert_close(merged[k], v, rtol=1e-10, atol=1e-12)
    assert changed


def test_marker_texts_are_in_every_match():
    """Detection rules a marker out when no key holds one of its texts (dialects.required_literals): those texts
    are in every match, of every marker, on every fixture's keys, and quantified or grouped text is none."""
    from pathlib import Path

    from loratool.formats import dialects
    from loratool.formats.source import open_source

    assert dialects.required_literals(r"^(double|single)_blocks\.\d+\..*(query|key)_norm\.scale$") == \
        ("_norm.scale", "_blocks.", ".")
    assert dialects.required_literals(r"a{2}bc") == ("bc",)
    assert dialects.required_literals(r"ab?c") == ("a", "c")
    assert dialects.required_literals(r"x[.]y\.z") == ("y.z", "x")
    for unknown in (r"a|b", r"(?i)abc", r"[\]a]b", r"\x41b", r"a{"):
        assert dialects.required_literals(unknown) == ()
    keys = [k for f in sorted(Path(loratool.__file__).parent.parent.glob("fixtures/**/*.safetensors"))
            for k in open_source(f).keys]
    markers = [m for c in dialects._compiled() for g in c.markers for m in g if not isinstance(m, str)]
    matched = 0
    for m in markers:
        for k in keys:
            if m.pattern.search(k):
                matched += 1
                assert all(lit in k for lit in m.literals), (m.pattern.pattern, k)
    assert matched
