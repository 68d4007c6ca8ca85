"""``diff A B``: the figures from the factors equal a float64 dense computation from ΔW itself
(``delta.delta_weight``, the definition), and the verdicts hold on constructed pairs: a layout conversion
(identical), every alpha halved (rescaled, factor 0.5), ``loratool resize`` (derived), an independent LoRA
(unrelated). ``--plot`` writes a PNG whose header, size and panels are checked."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from loratool.cli import main
from loratool.delta import delta_weight
from loratool.ops.diff import diff

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
KOHYA = FIXTURES / "kohya_tiny_sd.safetensors"
LOHA = FIXTURES / "lycoris_loha_tiny_sd.safetensors"
LOKR = FIXTURES / "lycoris_lokr_tiny_sd.safetensors"
PEFT = FIXTURES / "peft_tiny_llama"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from tiny_models import randomize_lora, tiny_llama

    root = tmp_path_factory.mktemp("diff")
    assert main(["convert", str(KOHYA), "--to", "diffusers", "-o", str(root / "as_diffusers.safetensors")]) == 0
    assert main(["resize", str(KOHYA), "--rank", "2", "-o", str(root / "resized.safetensors")]) == 0
    tensors = load_file(str(KOHYA))
    halved = {k: v * 0.5 if k.endswith(".alpha") else v for k, v in tensors.items()}
    save_file(halved, str(root / "half_alpha.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    config = json.loads((PEFT / "adapter_config.json").read_text())
    model = get_peft_model(tiny_llama(seed=7), LoraConfig(r=4, lora_alpha=8, target_modules=config["target_modules"],
                                                          rank_pattern={"v_proj": 2}))
    randomize_lora(model, seed=2024)
    model.save_pretrained(str(root / "independent"))
    return {"as_diffusers": root / "as_diffusers.safetensors", "resized": root / "resized.safetensors",
            "half_alpha": root / "half_alpha.safetensors", "independent": root / "independent"}


def _dense(module) -> torch.Tensor:
    d = delta_weight(module, dtype=torch.float64)
    return d.reshape(d.shape[0], -1)


def _basis(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = int((s > s[0] * max(m.shape) * torch.finfo(torch.float64).eps).sum()) if float(s[0]) > 0 else 0
    return u[:, :k], vh[:k].T


def _overlap(qa: torch.Tensor, qb: torch.Tensor) -> float:
    cosines = torch.linalg.svdvals(qa.T @ qb)  # cosines of the principal angles
    return float((cosines ** 2).sum()) / min(qa.shape[1], qb.shape[1])


@pytest.mark.parametrize(("a", "b"), [(KOHYA, "resized"), (KOHYA, LOHA), (LOKR, LOHA), (PEFT, "independent"),
                                      (KOHYA, "half_alpha")])
def test_figures_equal_a_float64_dense_computation(pairs, a, b):
    a, b = (pairs.get(x, x) if isinstance(x, str) else x for x in (a, b))
    report = diff(a, b)
    adapter_a, adapter_b = loratool.load(a), loratool.load(b)
    assert report.modules
    worst = 0.0
    for m in report.modules:
        da, db = _dense(adapter_a[m.component, m.path]), _dense(adapter_b[m.component, m.path])
        na, nb = float(da.norm()), float(db.norm())
        (ua, va), (ub, vb) = _basis(da), _basis(db)
        want = {"inner": float((da * db).sum()), "norm_a": na, "norm_b": nb,
                "cosine": float((da * db).sum()) / (na * nb), "norm_ratio": nb / na,
                "out_overlap": _overlap(ua, ub), "in_overlap": _overlap(va, vb)}
        assert (m.rank_a, m.rank_b) == (ua.shape[1], ub.shape[1]), m.path
        for name, value in want.items():
            err = abs(getattr(m, name) - value)
            worst = max(worst, err)
            assert err <= 1e-8, (m.path, name, getattr(m, name), value)
    # per block and overall: the modules' ΔW taken as one vector
    from loratool.ops.blocks import block_of, label

    groups = [(b, [m for m in report.modules if label(m.component, block_of(m.path)) == b.block])
              for b in report.blocks]
    for block, mods in [*groups, (report, report.modules)]:
        vec_a = torch.cat([_dense(adapter_a[m.component, m.path]).flatten() for m in mods])
        vec_b = torch.cat([_dense(adapter_b[m.component, m.path]).flatten() for m in mods])
        assert abs(block.cosine - float(vec_a @ vec_b / (vec_a.norm() * vec_b.norm()))) <= 1e-8
        assert abs(block.norm_ratio - float(vec_b.norm() / vec_a.norm())) <= 1e-8
    assert sum(len(mods) for _, mods in groups) == len(report.modules)
    assert worst < 1e-13  # the issue asks ≤ 1e-8; measured ≤ 5.2e-15 on these pairs


@pytest.mark.parametrize(("b", "verdict", "factor"), [
    ("as_diffusers", "identical", 1.0),
    ("half_alpha", "rescaled", 0.5),
    ("resized", "derived", None),
])
def test_verdicts_on_constructed_pairs(pairs, b, verdict, factor):
    report = diff(KOHYA, pairs[b])
    assert report.verdict == verdict, report.summary
    if factor is not None:
        assert math.isclose(report.factor, factor, rel_tol=1e-6), report.factor
    if verdict == "rescaled":
        assert "B = 0.5 × A" in report.summary
    assert not report.only_a and not report.only_b


def test_independent_loras_are_unrelated(pairs):
    report = diff(PEFT, pairs["independent"])
    assert report.verdict == "unrelated", report.summary
    assert len(report.modules) == 8 and abs(report.cosine) < 0.2


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_json_plot_and_missing_matplotlib(pairs, tmp_path, capsys, monkeypatch):
    png = tmp_path / "d.png"
    assert main(["diff", str(KOHYA), str(pairs["half_alpha"]), "--json", "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == "diff" and data["verdict"] == "rescaled" and data["factor"] == pytest.approx(0.5)
    assert data["plot"]["panels"] == ["cosine of ΔW per block (rescaled)", "norm ratio ‖ΔW_B‖ / ‖ΔW_A‖ per block",
                                      "subspace overlap per block (mean cos² of the principal angles)"]
    assert _png_size(png.read_bytes()) == (data["plot"]["width"], data["plot"]["height"]) == (720, 624)
    assert [b["block"] for b in data["blocks"]] == ["down.0", "down.1", "mid", "up.0", "up.1", "te:layer.0",
                                                     "te:layer.1"]
    assert main(["diff", str(KOHYA), str(LOHA), "--plot", str(png)]) == 2  # exists: --force replaces it
    assert "already exists" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # as if matplotlib were absent
    assert main(["diff", str(KOHYA), str(LOHA), "--plot", str(png), "--force"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --plot needs matplotlib, an optional extra: pip install 'loratool[plot]'\n"


def test_info_plot_draws_blocks_and_spectra(tmp_path, capsys):
    png = tmp_path / "info.png"
    assert main(["info", str(KOHYA), "--plot", str(png), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plot"]["panels"] == ["kohya_tiny_sd.safetensors: ‖ΔW‖F per block", "mean effective rank per block",
                                      "singular values of the 6 largest modules"]
    assert _png_size(png.read_bytes()) == (720, 624)
    blocks = {b["block"]: b for b in data["block_stats"]}
    norms = {}
    for m in data["modules"]:
        norms.setdefault("mid" if m["path"].startswith("mid_block") else None, []).append(m["stats"]["norm"])
    assert blocks["mid"]["norm"] == pytest.approx(math.sqrt(sum(x * x for x in norms["mid"])), rel=1e-12)
    assert sum(b["module_count"] for b in data["block_stats"]) == data["module_count"]
    assert main(["info", str(KOHYA), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "‖ΔW‖F per block" in out and "█" in out and "mid " in out


def test_readme_shows_a_committed_plot():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "![info --plot on the tiny SD LoRA](docs/info-plot.png)" in readme
    data = (Path(__file__).resolve().parent.parent / "docs" / "info-plot.png").read_bytes()
    assert _png_size(data) == (720, 624) and len(data) < 100_000
