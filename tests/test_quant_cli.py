"""The CLI on quantized bases: --json carries the kept-update report, refusals exit 2 and write nothing."""

from __future__ import annotations

import json

import torch
from merge_oracles import save_base
from test_quant_gguf import mixed_base

from loratool.cli import main


def _fp8_case(tmp_path):
    gen = torch.Generator().manual_seed(0)
    save_base({"layers.0.proj.weight": (torch.randn(32, 64, generator=gen) * 0.05).to(torch.float8_e4m3fn)},
              tmp_path / "base.safetensors")
    lora = {"lora_unet_layers_0_proj.lora_down.weight": torch.randn(4, 64, generator=gen) * 0.1,
            "lora_unet_layers_0_proj.lora_up.weight": torch.randn(32, 4, generator=gen) * 0.1,
            "lora_unet_layers_0_proj.alpha": torch.tensor(4.0)}
    save_base(lora, tmp_path / "lora.safetensors")
    return str(tmp_path / "base.safetensors"), str(tmp_path / "lora.safetensors")


def test_merge_json_reports_the_update_kept(tmp_path, capsys):
    base, lora = _fp8_case(tmp_path)
    assert main(["merge", base, lora, "-o", str(tmp_path / "o.safetensors"), "--json", "--alpha", "0.001"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    kept = data["kept_update"]
    assert data["quantized"] == {"float8_e4m3fn": 1} and data["rounding"] == "nearest"
    assert kept["overall"] < 0.8 and kept["below_threshold"] and kept["tensors"][0]["tensor"] == "layers.0.proj.weight"
    assert "kept under 80%" in captured.err
    assert main(["merge", base, lora, "-o", str(tmp_path / "s.safetensors"), "--rounding", "stochastic",
                 "--seed", "3"]) == 0
    assert "update kept after rounding" in capsys.readouterr().out


def test_quantized_refusals_exit_2_and_write_nothing(tmp_path, capsys):
    base, lora = _fp8_case(tmp_path)
    out = tmp_path / "o.safetensors"
    assert main(["merge", base, lora, "-o", str(out), "--rounding", "up"]) == 2
    assert main(["merge", base, lora, "-o", str(out), "--requantize", "--dtype", "bf16"]) == 2
    mixed_base(tmp_path / "m.gguf")
    assert main(["merge", str(tmp_path / "m.gguf"), lora, "-o", str(tmp_path / "o.bin")]) == 2
    err = capsys.readouterr().err
    assert "--rounding up" in err and "--requantize" in err and "*.gguf" in err
    assert "Traceback" not in err and not out.exists() and not (tmp_path / "o.bin").exists()


def test_info_json_on_a_gguf_base(tmp_path, capsys):
    mixed_base(tmp_path / "m.gguf")
    assert main(["info", str(tmp_path / "m.gguf"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["container"] == "gguf" and data["quantization"]["gguf: Q8_0"] == 2
