"""``extract`` between two single-file SD 1.x (LDM) checkpoints: the LoRA of an exactly low-rank
fine-tune, merged back into the base (loratool ``merge`` on the single file, and diffusers'
``load_lora_adapter`` + ``fuse_lora`` on the diffusers U-Net that diffusers' own LDM converter
builds from the base), gives the fine-tune."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file
from test_arch_checkpoints import hf_state, ldm_state_dict, tiny_clip  # noqa: E402
from tiny_models import tiny_unet  # noqa: E402

import loratool
from loratool.arch import checkpoints
from loratool.ops.extract import extract

# SGM/LDM keys changed by the fine-tune (rank-2 changes): attention linear, 1×1 conv proj_in,
# 3×3 resnet conv, time embedding, CLIP attention.
CHANGED = [
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.output_blocks.3.0.in_layers.2.weight",
    "model.diffusion_model.time_embed.0.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
]
RANK = 2


def sd1_pair(tmp_path):
    unet = tiny_unet().double()
    base = ldm_state_dict(unet, {k: v.clone() for k, v in unet.state_dict().items()})
    base.update({"cond_stage_model.transformer." + k: v.double() for k, v in hf_state(tiny_clip(projection=False))
                 .items()})
    gen = torch.Generator().manual_seed(3)
    tuned = dict(base)
    for k in CHANGED:
        w = base[k]
        delta = torch.randn(w.shape[0], RANK, generator=gen, dtype=torch.float64) @ \
            torch.randn(RANK, w[0].numel(), generator=gen, dtype=torch.float64)
        tuned[k] = w + 0.05 * delta.reshape(w.shape)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return unet, base, tuned


def test_extract_between_ldm_single_files_merges_back(tmp_path):
    from loratool.ops.merge import merge

    unet, base, tuned = sd1_pair(tmp_path)
    result = extract(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors", rank=4, exact=True,
                     dtype=torch.float64, out_dtype=torch.float64)
    targets = checkpoints.canonical_targets({k: tuple(v.shape) for k, v in base.items()})
    by_key = {(c, n): t.key for (c, n), t in targets.items()}
    got = {by_key[(m.component, m.path + ".weight")] for m in result.adapter}
    assert got == set(CHANGED)
    assert all(m.rank <= 4 for m in result.adapter)
    assert result.worst_captured == pytest.approx(1.0, abs=1e-9)

    out = tmp_path / "lora.safetensors"
    loratool.save(result.adapter, out, "kohya", family="sd1")
    merge(tmp_path / "base.safetensors", [out], tmp_path / "merged.safetensors")
    merged = load_file(tmp_path / "merged.safetensors")
    for k, want in tuned.items():
        err = ((merged[k] - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err <= 1e-10, (k, err)

    # diffusers: its LDM converter builds the U-Net from each file; the extracted LoRA (diffusers layout)
    # fused into the base U-Net gives the fine-tune's U-Net
    want_unet = sfu.convert_ldm_unet_checkpoint(dict(tuned), dict(unet.config))
    base_unet = sfu.convert_ldm_unet_checkpoint(dict(base), dict(unet.config))
    unet.load_state_dict(base_unet)
    (dfile,) = loratool.save(result.adapter, tmp_path / "lora_diffusers.safetensors", "diffusers")
    from diffusers import StableDiffusionPipeline

    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(dfile), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    assert sum(1 for k in unet.state_dict() if "lora_A" in k) == sum(1 for m in result.adapter if m.component == "unet")
    unet.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    for k, want in want_unet.items():
        err = ((fused[k] - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err <= 1e-10, (k, err)


# ------------------------------------------------------------------ weights stored transposed / halves swapped

def low_rank(shape: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(shape[0], RANK, generator=gen, dtype=torch.float64) @ \
        torch.randn(RANK, shape[1], generator=gen, dtype=torch.float64)


def only_module(result):
    (module,) = list(result.adapter)
    (report,) = result.modules
    assert report.captured == pytest.approx(1.0, abs=1e-9) and report.rel_error <= 1e-10
    return module


def test_extract_sdxl_text_projection_stored_transposed(tmp_path):
    """OpenCLIP-G keeps ``text_projection`` as [in, out]: the extracted module is HF's [out, in] ΔW,
    and PEFT merging it into the base HF text encoder gives the fine-tune (diffusers' text-encoder
    loader cannot take a LoRA on text_projection alone: it reads ranks from attention / MLP modules)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from test_arch_checkpoints import hf_state
    from test_family_merge import OPEN_CLIP_G, sgm_file_with_open_clip_g, tiny_clip_g

    from loratool.ops.merge import merge

    te2 = tiny_clip_g()
    hf = {k: v.clone() for k, v in hf_state(te2).items()}
    delta = low_rank(tuple(hf["text_projection.weight"].shape), seed=5)  # [24, 32]
    tuned_hf = dict(hf, **{"text_projection.weight": hf["text_projection.weight"] + delta})
    base, tuned = sgm_file_with_open_clip_g(hf), sgm_file_with_open_clip_g(tuned_hf)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")

    result = extract(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors", rank=4, exact=True,
                     dtype=torch.float64, out_dtype=torch.float64)
    m = only_module(result)
    assert (m.component, m.path, tuple(result.modules[0].shape)) == ("text_encoder_2", "text_projection", (24, 32))
    got = m.tensors["up"] @ m.tensors["down"] * (m.alpha / m.tensors["down"].shape[0])
    assert (got - delta).abs().max().item() <= 1e-12

    (kfile,) = loratool.save(result.adapter, tmp_path / "lora.safetensors", "kohya", family="sdxl")
    kohya = load_file(kfile)
    down, up = kohya["lora_te2_text_projection.lora_down.weight"], kohya["lora_te2_text_projection.lora_up.weight"]
    alpha = float(kohya["lora_te2_text_projection.alpha"])
    te2 = inject_adapter_in_model(LoraConfig(r=down.shape[0], lora_alpha=alpha, target_modules=["text_projection"]),
                                  te2)
    with torch.no_grad():
        te2.text_projection.lora_A["default"].weight.copy_(down)
        te2.text_projection.lora_B["default"].weight.copy_(up)
    layers = [mod for mod in te2.modules() if isinstance(mod, BaseTunerLayer)]
    assert len(layers) == 1
    layers[0].merge()
    oracle = te2.text_projection.base_layer.weight.detach()
    assert (oracle - tuned_hf["text_projection.weight"]).abs().max().item() <= 1e-12
    merge(tmp_path / "base.safetensors", [kfile], tmp_path / "merged.safetensors")
    merged = load_file(tmp_path / "merged.safetensors")
    assert (merged[OPEN_CLIP_G + "text_projection"] - tuned[OPEN_CLIP_G + "text_projection"]).abs().max() <= 1e-12


def test_extract_flux_final_modulation_stored_with_swapped_halves(tmp_path):
    """BFL keeps ``final_layer.adaLN_modulation.1`` as [shift; scale]: the extracted module is diffusers'
    ``norm_out.linear`` ΔW ([scale; shift]), and diffusers fusing it into its model gives the fine-tune."""
    from diffusers import FluxPipeline
    from test_family_merge import bfl_from_diffusers, fused_state, tiny_flux

    model = tiny_flux().double()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    delta = low_rank(tuple(base_state["norm_out.linear.weight"].shape), seed=6)
    tuned_state = dict(base_state, **{"norm_out.linear.weight": base_state["norm_out.linear.weight"] + delta})
    base, tuned = bfl_from_diffusers(base_state), bfl_from_diffusers(tuned_state)
    # the file is what diffusers' own converter reads back as the fine-tune (its whole converter
    # hard-codes Flux.1's 3072 width; this is the step it applies to final_layer.adaLN_modulation.1)
    stored = tuned["model.diffusion_model.final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(sfu.swap_scale_shift(stored, 0), tuned_state["norm_out.linear.weight"])
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")

    result = extract(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors", rank=4, exact=True,
                     dtype=torch.float64, out_dtype=torch.float64)
    m = only_module(result)
    assert (m.component, m.path) == ("transformer", "norm_out.linear")
    got = m.tensors["up"] @ m.tensors["down"] * (m.alpha / m.tensors["down"].shape[0])
    assert (got - delta).abs().max().item() <= 1e-12

    (dfile,) = loratool.save(result.adapter, tmp_path / "lora.safetensors", "diffusers")
    state, metadata = FluxPipeline.lora_state_dict(str(dfile), return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, None, model, metadata=metadata)
    model.fuse_lora()
    fused = fused_state(model)
    for k, want in tuned_state.items():
        err = ((fused[k] - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err <= 1e-10, (k, err)


def test_extract_from_flattened_clip_base_uses_sd_scripts_names(tmp_path):
    """transformers 5 saves CLIPTextModel without ``text_model.``; kohya output must still use the
    names sd-scripts writes (``lora_te_text_model_encoder_...``), as in the sd-scripts-named fixture."""
    from pathlib import Path

    from safetensors import safe_open

    from loratool.ops.extract import extract_to_file
    from loratool.ops.merge import merge

    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    kohya = fixtures / "kohya_tiny_sd.safetensors"
    merge(fixtures / "base" / "tiny_sd", [kohya], tmp_path / "tuned")
    extract_to_file(tmp_path / "tuned", fixtures / "base" / "tiny_sd", tmp_path / "x.safetensors", rank=4, to="kohya")
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        got = {k.split(".")[0] for k in f.keys() if k.startswith("lora_te")}
    with safe_open(kohya, "pt") as f:
        want = {k.split(".")[0] for k in f.keys() if k.startswith("lora_te")}
    assert got and got == want
