"""``loratool info``: header-only by default, stats against the libraries' own merges."""

from __future__ import annotations

import json
import math

import loralib as lora
import pytest
import torch
from loralib_models import SIDECAR, merged_deltas, tiny_loralib
from safetensors.torch import save_file

from loratool.cli import main
from loratool.io.safetensors_file import SafetensorsFile
from loratool.ops.inspect import inspect


@pytest.fixture
def data_reads(monkeypatch):
    """Names of every tensor whose bytes were read from a safetensors file."""
    seen: list[tuple[str, int]] = []
    original = SafetensorsFile.raw_bytes

    def spy(self, name):
        seen.append((name, math.prod(self.info(name).shape)))
        return original(self, name)

    monkeypatch.setattr(SafetensorsFile, "raw_bytes", spy)
    return seen


def _loralib_file(tmp_path, dtype=torch.float64, sidecar=True):
    model = tiny_loralib(dtype=dtype)
    path = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in lora.lora_state_dict(model).items()}, str(path))
    if sidecar:
        (tmp_path / "lora.safetensors.json").write_text(json.dumps(SIDECAR))
    return model, path


def _peft_folder(tmp_path, dtype=torch.float64):
    from peft import LoraConfig, get_peft_model
    from tiny_models import randomize_lora, tiny_llama

    base = tiny_llama().to(dtype)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                     rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3})
    model = get_peft_model(base, cfg)
    randomize_lora(model)
    folder = tmp_path / "peft"
    model.save_pretrained(folder)
    merged = model.merge_and_unload().state_dict()
    deltas = {k.removesuffix(".weight"): merged[k] - before[k] for k in before if not torch.equal(merged[k], before[k])}
    return folder, deltas


def _sv_oracle(delta: torch.Tensor) -> tuple[float, float, int]:
    s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
    p = s / s.sum()
    p = p[p > 0]
    erank = math.exp(float(-(p * p.log()).sum()))
    rank = int(torch.linalg.matrix_rank(delta.reshape(delta.shape[0], -1).double()))
    return float(torch.linalg.matrix_norm(delta.double().reshape(delta.shape[0], -1))), erank, rank


def test_loralib_header_only(tmp_path, data_reads):
    _, path = _loralib_file(tmp_path)
    report = inspect(path, "loralib")
    assert data_reads == []  # not one tensor byte was read
    assert report.header_only and report.format == "loralib" and report.warnings == []
    by_name = {m.path: m for m in report.modules}
    assert by_name["wte"].layer == "embedding" and by_name["wte"].shape == [20, 8]
    c_attn = by_name["h.0.attn.c_attn"]
    assert c_attn.rank == 4 and c_attn.scale == 2.5 and c_attn.shape == [8, 24] and c_attn.fan_in_fan_out
    assert by_name["h.0.mlp.fc"].alpha == 16 and by_name["h.0.mlp.fc"].scale == 4
    data = report.to_json()
    for key in ("format", "metadata", "modules", "components", "size_bytes", "family"):
        assert key in data
    assert data["size_bytes"] == path.stat().st_size + (tmp_path / "lora.safetensors.json").stat().st_size
    assert data["ranks"] == {"min": 2, "max": 4, "histogram": {"2": 1, "3": 1, "4": 2}}
    assert set(data["modules"][0]) >= {"path", "component", "rank", "alpha", "scale", "kind", "layer", "shape", "dtype"}


def test_loralib_stats_match_loralib_merge(tmp_path):
    model, path = _loralib_file(tmp_path)
    oracle = merged_deltas(model)
    report = inspect(path, "loralib", stats=True)
    assert report.stats and not report.header_only
    for m in report.modules:
        norm, erank, rank = _sv_oracle(oracle[m.path])
        assert m.stats.norm == pytest.approx(norm, rel=1e-10)
        assert m.stats.effective_rank == pytest.approx(erank, rel=1e-8)
        assert m.stats.numerical_rank == rank == m.rank


def test_peft_header_only_and_stats(tmp_path, data_reads):
    folder, deltas = _peft_folder(tmp_path)
    report = inspect(folder)
    assert data_reads == [] and report.format == "peft"
    by_name = {m.path: m for m in report.modules}
    assert set(by_name) == set(deltas)
    assert by_name["model.layers.0.mlp.up_proj"].rank == 2 and by_name["model.layers.0.mlp.up_proj"].scale == 4
    assert by_name["model.layers.1.self_attn.v_proj"].alpha == 3
    stats = inspect(folder, stats=True)
    for m in stats.modules:
        norm, erank, _ = _sv_oracle(deltas[m.path])
        assert m.stats.norm == pytest.approx(norm, rel=1e-10)
        assert m.stats.effective_rank == pytest.approx(erank, rel=1e-8)


def test_kohya_style_metadata_tags_and_alpha_scalars(tmp_path, data_reads):
    """Metadata tables and tags come from the header; alpha scalars are the only data read."""
    freq = {"10_cat": {"cat": 12, " dog": 3}, "5_more": {"cat": 1, "tree": 7}}
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2",
        "ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps(freq), "ss_learning_rate": "0.0001",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "demo",
    }
    g = torch.Generator().manual_seed(0)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors = {
        f"{name}.lora_down.weight": torch.randn(4, 32, generator=g).half(),
        f"{name}.lora_up.weight": torch.randn(32, 4, generator=g).half(),
        f"{name}.alpha": torch.tensor(2.0).half(),
    }
    path = tmp_path / "k.safetensors"
    save_file(tensors, str(path), metadata=meta)
    report = inspect(path, "kohya")
    assert all(numel <= 1 for _, numel in data_reads) and len(data_reads) == 1
    (m,) = report.modules
    assert m.alpha == 2 and m.scale == 0.5 and m.dtype == "float16" and m.component == "text_encoder"
    assert report.family == "sd1"
    assert report.tags == [("cat", 13), ("tree", 7), ("dog", 3)]
    assert report.training["ss_learning_rate"] == "0.0001" and "ss_tag_frequency" not in report.training
    assert report.modelspec["modelspec.title"] == "demo"
    assert report.base_model["ss_base_model_version"] == "sd_v1"


def test_no_sidecar_warns(tmp_path):
    model = tiny_loralib()
    path = tmp_path / "plain.pt"
    torch.save({k: v for k, v in lora.lora_state_dict(model).items() if "c_attn" not in k}, path)
    report = inspect(path, "loralib")
    assert not report.header_only  # a pickle has no header: loaded whole
    assert any("assumed alpha = r" in w for w in report.warnings)
    assert all(m.alpha_assumed and m.scale == 1 for m in report.modules)


def test_cli_json_and_human(tmp_path, capsys):
    _, path = _loralib_file(tmp_path)
    assert main(["info", str(path), "--from", "loralib", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "loralib" and data["module_count"] == 4
    assert main(["info", str(path), "--from", "loralib", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "loralib" in out and "eff. rank" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.safetensors" in err and err.count("\n") == 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert main(["info", str(bad)]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err


# ---- base checkpoints: family, tensors, dtypes, size from the headers alone ------------------------


def _sd_single_file(tmp_path, family: str):
    """Tiny single-file checkpoints built with loratool's key maps (themselves checked against
    diffusers' single-file converters in test_arch_checkpoints)."""
    from test_arch_checkpoints import hf_state, ldm_state_dict, open_clip_state_dict, tiny_clip, tiny_sdxl_unet
    from tiny_models import tiny_unet

    unet = tiny_sdxl_unet() if family == "sdxl" else tiny_unet()
    ckpt = ldm_state_dict(unet, {k: v.contiguous() for k, v in unet.state_dict().items()})
    clip = hf_state(tiny_clip(projection=family != "sd1"))
    if family == "sd1":
        ckpt.update({"cond_stage_model.transformer." + k: v.half() for k, v in clip.items()})
    elif family == "sd2":
        ckpt.update(open_clip_state_dict(clip, "cond_stage_model.model.", 2))
    else:
        clip_l = hf_state(tiny_clip(projection=False))
        ckpt.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()})
        ckpt.update(open_clip_state_dict(clip, "conditioner.embedders.1.model.", 2))
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    path = tmp_path / f"{family}.safetensors"
    save_file(ckpt, str(path), metadata={"modelspec.title": "tiny"})
    return path, ckpt


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_sd_checkpoint_names_its_family(tmp_path, data_reads, family):
    path, ckpt = _sd_single_file(tmp_path, family)
    report = inspect(path)
    assert data_reads == []  # header only
    assert report.format == "checkpoint" and report.kind == "file" and report.family == family
    assert report.tensor_count == len(ckpt)
    assert report.parameter_count == sum(v.numel() for v in ckpt.values())
    want_dtypes: dict[str, int] = {}
    for v in ckpt.values():
        name = str(v.dtype).removeprefix("torch.")
        want_dtypes[name] = want_dtypes.get(name, 0) + 1
    assert report.dtypes == want_dtypes
    assert report.size_bytes == path.stat().st_size
    # the VAE has no key map; nor does OpenCLIP's text_projection (SD2's diffusers text encoder has none,
    # SDXL's needs a transpose that the plain row map cannot express)
    assert "first_stage_model.decoder.conv_in.weight" in report.unmapped and report.warnings
    assert all(k.startswith("first_stage_model.") or k.endswith(".text_projection") for k in report.unmapped)
    assert report.metadata == {"modelspec.title": "tiny"}
    want_components = {"sd1": {"unet", "text_encoder"}, "sd2": {"unet", "text_encoder"},
                       "sdxl": {"unet", "text_encoder", "text_encoder_2"}}[family]
    assert set(report.components) == want_components


def test_single_file_flux_checkpoint(tmp_path):
    from test_family_merge import bfl_from_diffusers, tiny_flux

    ckpt = bfl_from_diffusers(tiny_flux().state_dict())
    save_file({k: v.to(torch.bfloat16) for k, v in ckpt.items()}, str(tmp_path / "flux1.safetensors"))
    report = inspect(tmp_path / "flux1.safetensors")
    assert (report.format, report.family, report.architecture) == ("checkpoint", "flux", "BFL single file")
    assert report.dtypes == {"bfloat16": len(ckpt)}
    # norm_out.linear is stored with its halves swapped: merge / extract place it through the transform
    assert report.unmapped == []
    assert report.components == {"transformer": report.mapped}


def test_diffusers_component_pipeline_and_transformers_models(tmp_path):
    from test_arch_checkpoints import tiny_sdxl_unet
    from test_family_merge import tiny_flux
    from tiny_models import tiny_llama, tiny_unet

    tiny_unet().save_pretrained(tmp_path / "sd" / "unet")
    tiny_sdxl_unet().save_pretrained(tmp_path / "xl" / "unet")
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    tiny_flux().save_pretrained(tmp_path / "flux" / "transformer")
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "llama")
    llama.save_pretrained(tmp_path / "llama_sharded", max_shard_size="20KB")
    cases = [
        (tmp_path / "sd" / "unet", "component", "sd1", "UNet2DConditionModel"),
        (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors", "file", "sd1", "UNet2DConditionModel"),
        (tmp_path / "xl", "pipeline", "sdxl", "StableDiffusionXLPipeline"),
        (tmp_path / "xl" / "unet", "component", "sdxl", "UNet2DConditionModel"),
        (tmp_path / "flux" / "transformer", "component", "flux", "FluxTransformer2DModel"),
        (tmp_path / "llama", "component", "llm", "LlamaForCausalLM"),
        (tmp_path / "llama_sharded", "sharded", "llm", "LlamaForCausalLM"),
    ]
    n_llama = len(llama.state_dict())
    for path, kind, family, architecture in cases:
        report = inspect(path)
        assert (report.format, report.kind, report.family, report.architecture) == \
            ("checkpoint", kind, family, architecture), path
        assert report.tensor_count > 0 and report.size_bytes > 0 and report.mapped is None
    sharded = inspect(tmp_path / "llama_sharded")
    assert sharded.tensor_count == n_llama and len(sharded.files) > 2  # shards + index
    assert sharded.size_bytes == sum(p.stat().st_size for p in (tmp_path / "llama_sharded").glob("model*"))
    assert inspect(tmp_path / "llama_sharded" / "model.safetensors.index.json").kind == "sharded"


def test_cli_checkpoint_json_and_table(tmp_path, capsys):
    path, ckpt = _sd_single_file(tmp_path, "sdxl")
    assert main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "checkpoint" and data["family"] == "sdxl" and data["tensor_count"] == len(ckpt)
    assert data["kind"] == "file" and data["header_only"] and data["unmapped_count"] >= 1
    assert set(data) >= {"size_bytes", "dtypes", "parameter_count", "components", "architecture", "files"}
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "base checkpoint" in out and "sdxl" in out


def test_unknown_lora_like_file_is_still_an_error(tmp_path, capsys):
    save_file({"weird.lora_thing.weight": torch.zeros(2, 2)}, str(tmp_path / "odd.safetensors"))
    assert main(["info", str(tmp_path / "odd.safetensors")]) == 2
    assert "unknown LoRA layout" in capsys.readouterr().err


def test_single_file_sd3_checkpoint(tmp_path):
    from test_arch_sd3 import mmdit_state_dict, tiny_sd3

    ckpt = mmdit_state_dict(tiny_sd3().state_dict())
    ckpt["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(4, dtype=torch.float64)
    save_file(ckpt, str(tmp_path / "sd3.safetensors"))
    report = inspect(tmp_path / "sd3.safetensors")
    assert (report.format, report.family, report.architecture) == ("checkpoint", "sd3", "MMDiT single file")
    assert report.components["text_encoder"] == 1 and report.dtypes == {"float64": len(ckpt)}
