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
    by_name = {m.name: m for m in report.modules}
    assert by_name["wte"].layer == "embedding" and by_name["wte"].shape == [20, 8]
    c_attn = by_name["h.0.attn.c_attn"]
    assert c_attn.rank == 4 and c_attn.scale == 2.5 and c_attn.shape == [8, 24] and c_attn.fan_in_fan_out
    assert by_name["h.0.mlp.fc"].alpha == 16 and by_name["h.0.mlp.fc"].scale == 4
    data = report.to_json()
    for key in ("format", "metadata", "modules", "components", "size_bytes", "family"):
        assert key in data
    assert data["size_bytes"] == path.stat().st_size + (tmp_path / "lora.safetensors.json").stat().st_size
    assert data["ranks"] == {"min": 2, "max": 4, "histogram": {"2": 1, "3": 1, "4": 2}}
    assert set(data["modules"][0]) >= {"name", "component", "rank", "alpha", "scale", "kind", "layer", "shape", "dtype"}


def test_loralib_stats_match_loralib_merge(tmp_path):
    model, path = _loralib_file(tmp_path)
    oracle = merged_deltas(model)
    report = inspect(path, "loralib", stats=True)
    assert report.stats and not report.header_only
    for m in report.modules:
        norm, erank, rank = _sv_oracle(oracle[m.name])
        assert m.stats.norm == pytest.approx(norm, rel=1e-10)
        assert m.stats.effective_rank == pytest.approx(erank, rel=1e-8)
        assert m.stats.numerical_rank == rank == m.rank


def test_peft_header_only_and_stats(tmp_path, data_reads):
    folder, deltas = _peft_folder(tmp_path)
    report = inspect(folder)
    assert data_reads == [] and report.format == "peft"
    by_name = {m.name: m for m in report.modules}
    assert set(by_name) == set(deltas)
    assert by_name["model.layers.0.mlp.up_proj"].rank == 2 and by_name["model.layers.0.mlp.up_proj"].scale == 4
    assert by_name["model.layers.1.self_attn.v_proj"].alpha == 3
    stats = inspect(folder, stats=True)
    for m in stats.modules:
        norm, erank, _ = _sv_oracle(deltas[m.name])
        assert m.stats.norm == pytest.approx(norm, rel=1e-10)
        assert m.stats.effective_rank == pytest.approx(erank, rel=1e-8)


def test_kohya_style_metadata_tags_and_alpha_scalars(tmp_path, data_reads):
    """Metadata tables and tags come from the header; alpha scalars are the only data read."""
    pytest.importorskip("loratool.formats.kohya")
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
