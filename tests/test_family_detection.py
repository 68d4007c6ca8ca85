"""``Adapter.family`` from names, shapes and metadata together, for every layout and family; what it is
used for: kohya output without ``--family``, ``--family`` checked against the shapes, merges refused
into another family's base.

The adapters are written by the libraries that define each layout: diffusers ``save_lora_weights``
of each pipeline class (``StableDiffusionXLPipeline``, ``FluxPipeline``, ``StableDiffusion3Pipeline``),
diffusers' ``convert_state_dict_to_kohya`` (kohya files with diffusers module names,
``lora_te1`` / ``lora_te2`` prefixes: diffusers/utils/state_dict_utils.py), PEFT ``save_pretrained``
and the committed fixtures (PEFT, diffusers, sd-scripts, loralib, LyCORIS).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from test_arch_checkpoints import tiny_sdxl_unet
from test_arch_sd3 import tiny_sd3
from test_family_diffusers import tiny_clip_pair
from test_family_merge import tiny_flux
from test_fixtures import LAYOUT_OF
from test_info_fused import kohya_flux
from tiny_models import randomize_lora, tiny_clip_text, tiny_unet

import loratool
from loratool.cli import main
from loratool.ops.inspect import inspect

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# every committed fixture adapter: the LLM ones (tiny Llama, the GPT-2-like loralib model) and the SD 1.x ones
FIXTURE_FAMILIES = {rel: "llm" if layout in ("peft", "loralib") else "sd1" for rel, layout in LAYOUT_OF.items()}


def run(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("rel", list(FIXTURE_FAMILIES))
def test_every_fixture_has_its_family_on_read_and_in_header_only_info(rel):
    assert loratool.load(FIXTURES / rel).family == FIXTURE_FAMILIES[rel]
    assert inspect(FIXTURES / rel).family == FIXTURE_FAMILIES[rel]


def test_peft_llm_adapter_is_llm_from_its_config_or_its_module_names(tmp_path):
    import json
    import shutil

    folder = tmp_path / "peft"
    shutil.copytree(FIXTURES / "peft_tiny_llama", folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"  # PEFT wrote it
    cfg["auto_mapping"] = None
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert loratool.load(folder).family == "llm"  # model.layers.N.self_attn.* are language-model names


# ---- diffusers-layout files of each family ------------------------------------------------------------


def _lora(model, targets, seed, r=2):
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=targets)
    model = inject_adapter_in_model(cfg, model)
    randomize_lora(model, seed=seed)
    return get_peft_model_state_dict(model), cfg


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """diffusers SDXL LoRAs: U-Net + both text encoders, and U-Net only."""
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("sdxl")
    unet = tiny_sdxl_unet()
    te1, te2 = tiny_clip_pair()
    us, ucfg = _lora(unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"], 1)
    t1, _ = _lora(te1, ["q_proj", "v_proj"], 2)
    t2, _ = _lora(te2, ["q_proj", "fc1"], 3)
    StableDiffusionXLPipeline.save_lora_weights(folder / "full", unet_lora_layers=us, text_encoder_lora_layers=t1,
                                                text_encoder_2_lora_layers=t2)
    StableDiffusionXLPipeline.save_lora_weights(folder / "unet", unet_lora_layers=us)
    return {"full": folder / "full" / "pytorch_lora_weights.safetensors",
            "unet": folder / "unet" / "pytorch_lora_weights.safetensors",
            "unet_config": unet.config, "states": {"unet": us, "text_encoder": t1, "text_encoder_2": t2}}


@pytest.mark.parametrize("which", ["full", "unet"])
def test_diffusers_sdxl_lora_is_sdxl_and_converts_to_kohya_without_family(tmp_path, capsys, sdxl_files, which):
    from diffusers import StableDiffusionXLPipeline

    src = sdxl_files[which]
    assert loratool.load(src).family == "sdxl" and inspect(src).family == "sdxl"
    out = tmp_path / "k.safetensors"
    rc, err = run(capsys, "convert", src, "--to", "kohya", "-o", out)
    assert rc == 0, err
    kohya = load_file(out)
    prefixes = {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] for k in kohya}
    assert prefixes == ({"lora_unet", "lora_te1", "lora_te2"} if which == "full" else {"lora_unet"})
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)  # sd-scripts' SGM names
    # oracle: diffusers' kohya SDXL loader (+ its own key converters to PEFT names) maps the file back onto
    # the modules and factors the LoRA was saved with (CLIP names in the checkpoint's text_model. form)
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(out), unet_config=sdxl_files["unet_config"])
    back = convert_unet_state_dict_to_peft({k: v for k, v in state.items() if k.startswith("unet.")})
    for k, v in state.items():  # text encoders: attention-processor and lora_linear_layer keys side by side
        if not k.startswith("unet."):
            style = StateDictType.DIFFUSERS if "lora_linear_layer" in k else StateDictType.DIFFUSERS_OLD
            back.update(convert_state_dict_to_peft({k: v}, original_type=style))
    original = {k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.")
                 .replace("text_encoder_2.encoder.", "text_encoder_2.text_model.encoder."): v
                for k, v in load_file(src).items()}
    assert set(back) == set(original)
    for k, v in original.items():
        assert torch.equal(back[k], v), k


def kohya_by_diffusers(states: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    """The kohya file diffusers' ``convert_state_dict_to_kohya`` makes of PEFT state dicts (by component)."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft = {f"{comp}.{k}": v for comp, state in states.items() for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft).items()}, path)
    return path


@pytest.mark.parametrize("components", [("unet",), ("unet", "text_encoder", "text_encoder_2")])
def test_sdxl_kohya_file_with_diffusers_names_is_sdxl(tmp_path, sdxl_files, components):
    path = kohya_by_diffusers({c: sdxl_files["states"][c] for c in components}, tmp_path / "k.safetensors")
    keys = load_file(path)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in keys)
    adapter = loratool.load(path)
    assert adapter.family == "sdxl" and inspect(path).family == "sdxl"
    assert {m.component for m in adapter} == set(components)


def test_sd1_kohya_file_with_diffusers_names_and_te1_prefix_is_sd1(tmp_path):
    """diffusers names an SD1 text encoder ``lora_te1`` too: the U-Net blocks say SD 1.x."""
    us, _ = _lora(tiny_unet(), ["to_q", "to_v"], 4)
    ts, _ = _lora(tiny_clip_text(), ["q_proj"], 5)
    path = kohya_by_diffusers({"unet": us, "text_encoder": ts}, tmp_path / "k.safetensors")
    assert any(k.startswith("lora_te1_") for k in load_file(path))
    assert loratool.load(path).family == "sd1"


@pytest.fixture(scope="module")
def transformer_files(tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    folder = tmp_path_factory.mktemp("dit")
    flux, _ = _lora(tiny_flux(), ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"], 6)
    FluxPipeline.save_lora_weights(folder / "flux", transformer_lora_layers=flux)
    sd3, _ = _lora(tiny_sd3(), ["to_q", "to_k", "to_v", "to_out.0", "proj", "linear"], 7)
    StableDiffusion3Pipeline.save_lora_weights(folder / "sd3", transformer_lora_layers=sd3)
    # attention of the double-stream blocks only: the names Flux and SD3 share
    shared = {k: v for k, v in flux.items() if k.startswith("transformer_blocks.") and ".attn.to_" in k}
    FluxPipeline.save_lora_weights(folder / "shared", transformer_lora_layers=shared)
    return {name: folder / name / "pytorch_lora_weights.safetensors" for name in ("flux", "sd3", "shared")}


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_diffusers_flux_and_sd3_loras_have_their_family(transformer_files, name):
    assert loratool.load(transformer_files[name]).family == name
    assert inspect(transformer_files[name]).family == name


def test_names_both_flux_and_sd3_have_leave_the_family_unknown(transformer_files):
    assert loratool.load(transformer_files["shared"]).family is None


def published_width_lora(path: Path, width: int, seed: int = 0) -> Path:
    """A rank-1 diffusers-layout LoRA on the double-stream attention of a transformer of hidden width
    ``width`` (3072: FLUX.1; 1536: SD3 medium / SD3.5 medium), as ``save_lora_weights`` writes it."""
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for proj in ("to_q", "to_k", "to_v"):
        state[f"transformer_blocks.0.attn.{proj}.lora_A.weight"] = torch.randn(1, width, generator=gen) * 0.01
        state[f"transformer_blocks.0.attn.{proj}.lora_B.weight"] = torch.randn(width, 1, generator=gen) * 0.01
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=state)
    return path / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("width, family", [(3072, "flux"), (1536, "sd3")])
def test_published_widths_name_the_family(tmp_path, width, family):
    assert loratool.load(published_width_lora(tmp_path / "l", width)).family == family


# ---- item 14: a kohya Flux file without ss_* metadata resizes / converts to kohya without --family ----


def test_kohya_flux_without_metadata_resizes_and_converts_without_family(tmp_path, capsys):
    src = kohya_flux(tmp_path, metadata=False)
    assert loratool.load(src).family == "flux"
    for cmd in (("resize", src, "--rank", "2", "-o", tmp_path / "r.safetensors"),
                ("convert", src, "--to", "kohya", "-o", tmp_path / "c.safetensors"),
                ("convert", src, "--to", "diffusers", "-o", tmp_path / "d.safetensors")):
        rc, err = run(capsys, *cmd)
        assert rc == 0, (cmd, err)
    rc, err = run(capsys, "convert", tmp_path / "d.safetensors", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert rc == 0, err
    for out in ("r", "c", "k"):
        keys = load_file(tmp_path / f"{out}.safetensors")
        assert any(k.startswith("lora_unet_double_blocks_0_") for k in keys), out
        assert any(k.startswith("lora_te3_encoder_block_0_") for k in keys), out
    from loratool.ops.resize import resize

    assert resize(loratool.load(src), 2).adapter.family == "flux"


# ---- item 10: --family checked against names and widths ----------------------------------------------


@pytest.mark.parametrize("case", ["tiny-sd3-names", "sd3-widths", "flux-widths", "sd1-kohya-as-sdxl"])
def test_family_forced_onto_another_familys_shapes_is_refused(tmp_path, capsys, transformer_files, case):
    src, forced, actual = {
        "tiny-sd3-names": lambda: (transformer_files["sd3"], "flux", "sd3"),
        "sd3-widths": lambda: (published_width_lora(tmp_path / "w", 1536), "flux", "sd3"),
        "flux-widths": lambda: (published_width_lora(tmp_path / "w", 3072), "sd3", "flux"),
        "sd1-kohya-as-sdxl": lambda: (FIXTURES / "kohya_tiny_sd.safetensors", "sdxl", "sd1"),
    }[case]()
    out = tmp_path / "out.safetensors"
    rc, err = run(capsys, "convert", src, "--to", "kohya", "--family", forced, "-o", out)
    assert rc == 2 and not out.exists(), err
    line = err.strip().splitlines()[-1]
    assert f"--family {forced}" in line and actual in line, line
    rc, err = run(capsys, "convert", src, "--to", "kohya", "--family", actual, "-o", out)
    assert rc == 0, err


def test_family_forced_where_nothing_contradicts_it_is_taken(tmp_path, capsys, transformer_files):
    out = tmp_path / "out.safetensors"
    rc, err = run(capsys, "convert", transformer_files["shared"], "--to", "kohya", "--family", "flux", "-o", out)
    assert rc == 0, err
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in load_file(out))


# ---- item 8: a LoRA for one family is not merged into another family's base ---------------------------


def llama_with_clip_widths(path: Path) -> Path:
    """A Llama whose attention widths equal the tiny CLIP's (hidden 32, 4 kv heads): names alone place
    the SD1 text-encoder q/k/v LoRA on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def sd1_text_encoder_lora(path: Path) -> Path:
    """sd-scripts naming (networks/lora.py ``lora_te``) of a q/k/v LoRA on the tiny CLIP, with its metadata."""
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            head = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"
            sd[head + ".lora_down.weight"] = torch.randn(2, 32, generator=gen)
            sd[head + ".lora_up.weight"] = torch.randn(32, 2, generator=gen)
            sd[head + ".alpha"] = torch.tensor(2.0)
    save_file(sd, path, metadata={"ss_base_model_version": "sd_v1"})
    return path


def test_sd1_lora_into_an_llm_base_is_refused_unless_ignore_family(tmp_path, capsys):
    base = llama_with_clip_widths(tmp_path / "llama")
    lora = sd1_text_encoder_lora(tmp_path / "sd1.safetensors")
    out = tmp_path / "merged"
    rc, err = run(capsys, "merge", base, lora, "-o", out)
    assert rc == 2 and not out.exists(), err
    line = err.strip().splitlines()[-1]
    assert "sd1" in line and "llm" in line and "--ignore-family" in line, line
    rc, err = run(capsys, "merge", base, lora, "-o", out, "--ignore-family", "--json")
    assert rc == 0, err  # what the names place (q/k/v through the prefix rule) is merged when asked for
    assert load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)


def test_llm_lora_into_an_sd_pipeline_is_refused(tmp_path, capsys):
    rc, err = run(capsys, "merge", FIXTURES / "base" / "tiny_sd", FIXTURES / "peft_tiny_llama", "-o", tmp_path / "m")
    assert rc == 2 and not (tmp_path / "m").exists()
    line = err.strip().splitlines()[-1]
    assert "llm" in line and "sd1" in line, line


def test_sd1_lora_into_its_stand_alone_text_encoder_is_allowed(tmp_path, capsys):
    base = FIXTURES / "base" / "tiny_sd" / "text_encoder" / "model.safetensors"
    rc, err = run(capsys, "merge", base, FIXTURES / "kohya_tiny_sd.safetensors", "-o", tmp_path / "te.safetensors")
    assert rc == 0, err
