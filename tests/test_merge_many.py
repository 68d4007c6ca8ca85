"""Merging three or more LoRAs places every module of every one of them.

Oracle: diffusers' ``load_lora_weights`` + ``fuse_lora``, applied once per LoRA in turn
(``load_lora_weights`` → ``fuse_lora(lora_scale=λᵢ)`` → ``unload_lora_weights``, which keeps the fused
weights) to the same LoRAs saved by diffusers' ``save_lora_weights`` (diffusers 0.42 cannot load a
kohya text-encoder LoRA into a transformers-5 CLIP: its converter leaves ``to_q_lora`` names), on a
pipeline folder whose CLIP text encoder is saved by transformers 5 without the
``text_model.`` prefix, so the text-encoder modules are placed through the prefix rule of
:mod:`loratool.ops.matching` (the rule that used to count each module once per copy and gave up
at three copies).

kohya names are those of sd-scripts ``networks/lora.py`` (``LORA_PREFIX_UNET = "lora_unet"``,
``LORA_PREFIX_TEXT_ENCODER = "lora_te"``, module path with ``.`` → ``_``).
"""

from __future__ import annotations

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from merge_oracles import assert_merged
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from test_merge_diffusers import _Pipe, _pipeline_folder
from tiny_models import randomize_lora, tiny_clip_text, tiny_unet

from loratool.ops.merge import merge

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "v_proj", "fc1"]


def kohya_file(folder, seed: int):
    """One LoRA (U-Net + text encoder) from PEFT-injected tiny models, saved twice: as a kohya file with
    sd-scripts key names (the merge input) and by diffusers' ``save_lora_weights`` (the oracle's input)."""
    unet, te = tiny_unet(), tiny_clip_text()
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS)
    tcfg = LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS)
    unet.add_adapter(ucfg)
    te = inject_adapter_in_model(tcfg, te)
    randomize_lora(unet, seed=seed)
    randomize_lora(te, seed=seed + 100)
    us, ts = get_peft_model_state_dict(unet), get_peft_model_state_dict(te)
    folder.mkdir()
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=us, text_encoder_lora_layers=ts,
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    sd = {}
    for prefix, root, state, alpha in (("lora_unet", "", us, 8.0), ("lora_te", "text_model.", ts, 3.0)):
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)
            stem = f"{prefix}_{(root + module).replace('.', '_')}"
            sd[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
            sd[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(folder / "kohya.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    te_modules = sum(1 for k in sd if k.startswith("lora_te") and k.endswith("lora_down.weight"))
    return folder / "kohya.safetensors", folder / "pytorch_lora_weights.safetensors", te_modules


def fused_in_turn(files, strengths):
    """diffusers: each LoRA loaded, fused at its strength and unloaded, one after the other."""
    u, t = tiny_unet().double(), tiny_clip_text().double()
    pipe = _Pipe(u, t)
    for f, s in zip(files, strengths):
        pipe.load_lora_weights(str(f))
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=s)
        pipe.unload_lora_weights()
    return u.state_dict(), t.state_dict()


def test_merge_of_three_loras_places_every_module_and_equals_fuse_lora_in_turn(tmp_path):
    ubase, tbase = _pipeline_folder(tmp_path / "pipe")
    files, oracle_files, te_modules = [], [], 0
    for i in range(3):
        path, oracle, te_modules = kohya_file(tmp_path / f"lora{i}", seed=10 + i)
        files.append(path)
        oracle_files.append(oracle)
    strengths = [0.7, -0.4, 1.3]
    out = tmp_path / "merged"
    result = merge(tmp_path / "pipe", files, out, strengths, device="cpu")
    assert not result.unmatched
    assert result.matched["text_encoder"] == 3 * te_modules and te_modules == 6
    uexp, texp = fused_in_turn(oracle_files, strengths)
    assert assert_merged(out / "unet" / "diffusion_pytorch_model.safetensors", uexp, ubase) > 10
    assert assert_merged(out / "text_encoder" / "model.safetensors", texp, tbase) == te_modules

