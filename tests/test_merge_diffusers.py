"""Merging into diffusers bases equals diffusers' own ``load_lora_weights`` + ``fuse_lora(lora_scale=0.7)``:
a pipeline folder (U-Net conv k×k / 1×1 / linear + CLIP text encoder), single component files, and
kohya-named files (when the kohya reader is present)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from merge_oracles import adapter_from_peft, assert_merged, save_base
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from tiny_models import randomize_lora, tiny_clip_text, tiny_unet

from loratool.adapter import Adapter
from loratool.ops.merge import merge

SCALE = 0.7
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut", "time_emb_proj"]
TE_TARGETS = ["q_proj", "v_proj", "fc1"]


class _Pipe(StableDiffusionLoraLoaderMixin):
    """The two components ``load_lora_weights`` / ``fuse_lora`` touch, without a whole pipeline."""

    hf_device_map = None

    def __init__(self, unet, text_encoder):
        self.unet = unet
        self.text_encoder = text_encoder

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A diffusers LoRA file for tiny_unet + tiny_clip_text, and the same modules in memory."""
    folder = tmp_path_factory.mktemp("lora")
    unet, te = tiny_unet(), tiny_clip_text()
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS)
    tcfg = LoraConfig(r=4, lora_alpha=2, target_modules=TE_TARGETS)
    unet.add_adapter(ucfg)
    te = inject_adapter_in_model(tcfg, te)
    randomize_lora(unet)
    randomize_lora(te, seed=2)
    us, ts = get_peft_model_state_dict(unet), get_peft_model_state_dict(te)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=us, text_encoder_lora_layers=ts,
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict(),
    )
    memory = Adapter()
    for m in adapter_from_peft(unet, component="unet", strip=""):
        memory.add(m)
    for m in adapter_from_peft(te, component="text_encoder", strip=""):
        memory.add(m)
    # kohya naming of the U-Net part (SD1 kohya files use diffusers module names with "_")
    kohya = {}
    for key, value in us.items():
        path, kind = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + path.replace(".", "_")
        kohya[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
        kohya[f"{stem}.alpha"] = torch.tensor(8.0)
    save_file(kohya, str(folder / "kohya_unet.safetensors"))
    return {"file": folder / "pytorch_lora_weights.safetensors", "memory": memory,
            "kohya": folder / "kohya_unet.safetensors"}


def _oracle(lora_file, unet=True, te=True):
    u, t = tiny_unet().double(), tiny_clip_text().double()
    pipe = _Pipe(u, t)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(components=[c for c, on in (("unet", unet), ("text_encoder", te)) if on], lora_scale=SCALE)
    pipe.unload_lora_weights()
    return u.state_dict(), t.state_dict()


def _pipeline_folder(root):
    unet, te = tiny_unet().double(), tiny_clip_text().double()
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps(dict(unet.config)))
    save_base(unet.state_dict(), root / "unet" / "diffusion_pytorch_model.safetensors")
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text("{}")
    save_base(te.state_dict(), root / "text_encoder" / "model.safetensors")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stale copy")
    return unet.state_dict(), te.state_dict()


@pytest.mark.parametrize("source", ["memory", "file"])
def test_pipeline_folder_matches_fuse_lora(tmp_path, lora, source):
    ubase, tbase = _pipeline_folder(tmp_path / "pipe")
    uexp, texp = _oracle(lora["file"])
    out = tmp_path / "merged"
    result = merge(tmp_path / "pipe", [lora[source]], out, SCALE, device="cpu")
    assert result.matched == {"unet": len(lora["memory"].by_component("unet")),
                              "text_encoder": len(lora["memory"].by_component("text_encoder"))}
    assert not result.unmatched
    assert assert_merged(out / "unet" / "diffusion_pytorch_model.safetensors", uexp, ubase) > 20
    assert assert_merged(out / "text_encoder" / "model.safetensors", texp, tbase) == 6
    # the rest of the pipeline is mirrored; the stale .bin weights are not
    assert (out / "scheduler" / "scheduler_config.json").read_text() == '{"num_train_timesteps": 1000}'
    assert (out / "model_index.json").read_bytes() == (tmp_path / "pipe" / "model_index.json").read_bytes()
    assert not (out / "unet" / "diffusion_pytorch_model.bin").exists()
    assert result.dropped_files == ["unet/diffusion_pytorch_model.bin"]


def test_single_component_file_gets_only_its_part(tmp_path, lora):
    """A bare U-Net file in a folder named ``unet``: the text-encoder modules are reported unmatched."""
    unet = tiny_unet().double()
    (tmp_path / "unet").mkdir()
    base = unet.state_dict()
    path = save_base(base, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    uexp, _ = _oracle(lora["file"], te=False)
    out = tmp_path / "unet_merged.safetensors"
    result = merge(path, [lora["memory"]], out, SCALE, device="cpu")
    assert set(result.matched) == {"unet"}
    assert len(result.unmatched) == 6 and all(u.startswith("text_encoder:") for u in result.unmatched)
    assert assert_merged(out, uexp, base) > 20


def test_unnamed_text_encoder_file_picks_best_component(tmp_path, lora):
    te = tiny_clip_text().double()
    base = te.state_dict()
    path = save_base(base, tmp_path / "weights.safetensors")
    _, texp = _oracle(lora["file"], unet=False)
    out = tmp_path / "te_merged.safetensors"
    result = merge(path, [lora["memory"]], out, SCALE, device="cpu")
    assert result.matched == {"text_encoder": 6}
    assert assert_merged(out, texp, base) == 6


def test_kohya_file_into_unet(tmp_path, lora):
    unet = tiny_unet().double()
    (tmp_path / "unet").mkdir()
    base = unet.state_dict()
    path = save_base(base, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    uexp, _ = _oracle(lora["kohya"], te=False)
    out = tmp_path / "merged.safetensors"
    result = merge(path, [lora["kohya"]], out, SCALE, device="cpu")
    assert not result.unmatched
    assert assert_merged(out, uexp, base) > 20
