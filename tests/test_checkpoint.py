"""Opening base checkpoints: single files, shards, component and pipeline folders, hub refs,
and single-file checkpoints described by ``loratool.arch.checkpoints``."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_llama

from loratool.errors import InputError
from loratool.io import checkpoint as ckmod
from loratool.io.checkpoint import open_checkpoint


def _save(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_single_file_component_from_folder_name(tmp_path):
    p = _save(tmp_path / "unet" / "diffusion_pytorch_model.safetensors",
              {"down_blocks.0.conv.weight": torch.zeros(2, 2), "down_blocks.0.conv.bias": torch.zeros(2)})
    ck = open_checkpoint(p)
    assert ck.kind == "file" and [g.component for g in ck.groups] == ["unet"]
    assert ck.module_vocabulary() == {"unet": {"down_blocks.0.conv"}}
    f, key, rows = ck.resolve("unet", "down_blocks.0.conv.weight")
    assert key == "down_blocks.0.conv.weight" and rows is None and f.path == p
    assert ck.resolve("text_encoder", "down_blocks.0.conv.weight") is None


def test_unknown_file_answers_for_any_component_and_guesses_vocabulary(tmp_path):
    p = _save(tmp_path / "x.safetensors", {"text_model.encoder.layers.0.q.weight": torch.zeros(1)})
    ck = open_checkpoint(p)
    assert ck.groups[0].component is None
    assert ck.module_vocabulary() == {"text_encoder": {"text_model.encoder.layers.0.q"}}
    assert ck.resolve("model", "text_model.encoder.layers.0.q.weight") is not None


def test_sharded_folder(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    ck = open_checkpoint(tmp_path / "m")
    assert ck.kind == "sharded" and len(list(ck.parts())) > 1
    index = json.loads(next((tmp_path / "m").glob("*.index.json")).read_text())
    for key, shard in index["weight_map"].items():
        f, k, _ = ck.resolve("model", key)
        assert f.path.name == shard and k == key
    assert "model.layers.0.self_attn.q_proj" in ck.module_vocabulary()["model"]
    # the index file itself is also accepted
    assert open_checkpoint(next((tmp_path / "m").glob("*.index.json"))).kind == "sharded"


def test_pipeline_folder(tmp_path):
    root = tmp_path / "pipe"
    _save(root / "unet" / "diffusion_pytorch_model.safetensors", {"conv_in.weight": torch.zeros(1)})
    _save(root / "text_encoder" / "model.safetensors", {"encoder.layers.0.q.weight": torch.zeros(1)})
    _save(root / "unet" / "diffusion_pytorch_model.fp16.safetensors", {"conv_in.weight": torch.zeros(1).half()})
    (root / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["d", "U"],
                                                       "text_encoder": ["t", "C"], "tokenizer": ["t", "T"]}))
    ck = open_checkpoint(root)
    assert ck.kind == "pipeline"
    assert ck.module_vocabulary() == {"unet": {"conv_in"}, "text_encoder": {"encoder.layers.0.q"}}
    assert ck.resolve("unet", "conv_in.weight")[0].path.name == "diffusion_pytorch_model.safetensors"
    assert ck.resolve("unet", "encoder.layers.0.q.weight") is None


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no safetensors weights"):
        open_checkpoint(tmp_path / "empty")
    _save(tmp_path / "two" / "a.safetensors", {"x": torch.zeros(1)})
    _save(tmp_path / "two" / "b.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(InputError, match="several weight files"):
        open_checkpoint(tmp_path / "two")


def test_hub_reference_goes_through_hub_resolve(tmp_path, monkeypatch):
    p = _save(tmp_path / "model.safetensors", {"a.weight": torch.zeros(1)})
    seen = []
    monkeypatch.setattr(ckmod.hub, "resolve", lambda ref: seen.append(ref) or p)
    ck = open_checkpoint("hf://owner/repo/model.safetensors")
    assert seen == ["hf://owner/repo/model.safetensors"] and ck.root == p


def test_single_file_checkpoint_uses_arch_targets_with_row_slices(tmp_path, monkeypatch):
    p = _save(tmp_path / "sd.safetensors", {"cond_stage_model.in_proj_weight": torch.zeros(6, 2),
                                            "model.diffusion_model.x.weight": torch.zeros(2, 2)})
    fake = types.ModuleType("loratool.arch.checkpoints")

    def canonical_targets(keys):
        if "cond_stage_model.in_proj_weight" not in keys:
            return None
        return {("text_encoder", "q.weight"): ("cond_stage_model.in_proj_weight", (0, 2)),
                ("text_encoder", "v.weight"): ("cond_stage_model.in_proj_weight", (4, 6)),
                ("unet", "x.weight"): ("model.diffusion_model.x.weight", None)}

    fake.canonical_targets = canonical_targets
    monkeypatch.setitem(sys.modules, "loratool.arch.checkpoints", fake)
    monkeypatch.setattr(ckmod.importlib.util, "find_spec", lambda name: object())
    ck = open_checkpoint(p)
    assert ck.resolve("text_encoder", "v.weight")[1:] == ("cond_stage_model.in_proj_weight", (4, 6))
    assert ck.resolve("unet", "x.weight")[1:] == ("model.diffusion_model.x.weight", None)
    assert ck.module_vocabulary() == {"text_encoder": {"q", "v"}, "unet": {"x"}}
