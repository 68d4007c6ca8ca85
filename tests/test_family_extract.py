"""``extract`` between two single-file SD 1.x (LDM) checkpoints: the LoRA of an exactly low-rank
fine-tune, merged back into the base (loratool ``merge`` on the single file, and diffusers'
``load_lora_adapter`` + ``fuse_lora`` on the diffusers U-Net that diffusers' own LDM converter
builds from the base), gives the fine-tune."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from loratool.arch import checkpoints
from loratool.ops.extract import extract

sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
pytest.importorskip("peft")

from test_arch_checkpoints import hf_state, ldm_state_dict, tiny_clip  # noqa: E402
from tiny_models import tiny_unet  # noqa: E402

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
