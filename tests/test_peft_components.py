"""A folder of PEFT component folders (``P/unet``, ``P/text_encoder``: what ``convert --to peft`` writes for a
pipeline adapter, and what ``save_pretrained`` per component gives) is one adapter for info, convert,
merge and stack.

Oracle: PEFT's ``merge_and_unload`` of the models the folders were saved from.
"""

from __future__ import annotations

import json

import torch
from merge_oracles import assert_merged
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_merge_diffusers import _pipeline_folder
from tiny_models import randomize_lora, tiny_clip_text, tiny_unet

import loratool
from loratool.cli import main

TARGETS = {"unet": ["to_q", "to_k", "proj_in", "conv1", "time_emb_proj"], "text_encoder": ["q_proj", "v_proj", "fc1"]}


def peft_components(root):
    """P/<component> saved by PEFT from float64 tiny models; returns PEFT's merged state dicts."""
    merged = {}
    for comp, model in (("unet", tiny_unet().double()), ("text_encoder", tiny_clip_text().double())):
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[comp]))
        randomize_lora(peft_model, seed=7 + len(comp))
        peft_model.save_pretrained(root / comp)
        merged[comp] = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return merged


def run(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_component_folders_read_as_one_adapter_everywhere(tmp_path, capsys):
    merged = peft_components(tmp_path / "P")
    ubase, tbase = _pipeline_folder(tmp_path / "pipe")

    rc, out, err = run(capsys, "info", tmp_path / "P", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["format"] == "peft" and report["family"] == "sd1"
    assert set(report["components"]) == {"unet", "text_encoder"}
    read = [tmp_path / "P" / c / f for c in TARGETS for f in ("adapter_model.safetensors", "adapter_config.json")]
    assert report["size_bytes"] == sum(f.stat().st_size for f in read)  # PEFT's README.md is not read

    rc, out, err = run(capsys, "merge", tmp_path / "pipe", tmp_path / "P", "-o", tmp_path / "merged", "--json")
    assert rc == 0, err
    assert not json.loads(out)["unmatched"]
    out = tmp_path / "merged"
    assert assert_merged(out / "unet" / "diffusion_pytorch_model.safetensors", merged["unet"], ubase) > 10
    assert assert_merged(out / "text_encoder" / "model.safetensors", merged["text_encoder"], tbase) == 6

    adapter = loratool.load(tmp_path / "P")
    rc, _, err = run(capsys, "convert", tmp_path / "P", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert rc == 0, err
    kohya = loratool.load(tmp_path / "k.safetensors")
    assert set(kohya.modules) == set(adapter.modules)
    for key, m in adapter.modules.items():
        assert all(torch.equal(kohya.modules[key].tensors[n], t) for n, t in m.tensors.items()), key

    rc, _, err = run(capsys, "stack", tmp_path / "P", tmp_path / "P", "-o", tmp_path / "S")
    assert rc == 0, err
    stacked = loratool.load(tmp_path / "S")
    assert set(stacked.modules) == set(adapter.modules) and (tmp_path / "S" / "unet" / "adapter_config.json").is_file()
    assert load_file(tmp_path / "S" / "unet" / "adapter_model.safetensors")
