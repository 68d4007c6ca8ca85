"""``loratool convert``: conversions keep every module's ΔW; loralib output merges like PEFT's own merge."""

from __future__ import annotations

import json
from pathlib import Path

import loralib as lora
import pytest
import torch

import loratool
from loratool.cli import main
from loratool.delta import delta_weight
from loratool.errors import FormatError, OutputError
from loratool.ops.convert import convert

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SUFFIX = {"kohya": ".safetensors", "diffusers": ".safetensors", "peft": "", "loralib": ".pt"}
# (fixture, target layout) pairs every layout can hold.
PAIRS = [
    ("peft_tiny_llama", "kohya"), ("peft_tiny_llama", "peft"), ("peft_tiny_llama", "loralib"),
    ("diffusers_tiny_sd/pytorch_lora_weights.safetensors", "kohya"),
    ("diffusers_tiny_sd/pytorch_lora_weights.safetensors", "peft"),
    ("diffusers_tiny_sd/pytorch_lora_weights.safetensors", "loralib"),
    ("kohya_tiny_sd.safetensors", "diffusers"), ("kohya_tiny_sd.safetensors", "peft"),
    ("kohya_tiny_sd.safetensors", "kohya"),
    ("loralib_tiny.pt", "loralib"),
    ("lycoris_loha_tiny_sd.safetensors", "kohya"),
]


def _deltas(adapter) -> dict[tuple[str, str], torch.Tensor]:
    return {m.key: delta_weight(m, dtype=torch.float64) for m in adapter}


@pytest.mark.parametrize("rel, to", PAIRS)
def test_conversion_keeps_every_delta(tmp_path, rel, to):
    out = tmp_path / f"out{SUFFIX[to]}"
    result = convert(FIXTURES / rel, to, out)
    assert result.target_format == to and all(Path(f).exists() for f in result.files)
    before = _deltas(loratool.load(FIXTURES / rel))
    after: dict = {}
    # PEFT output holds one folder per component when there are several.
    parts = sorted(p for p in out.iterdir() if p.is_dir()) if to == "peft" and out.is_dir() else [out]
    for part in parts or [out]:
        after.update(_deltas(loratool.load(part, to, family="sd1" if "sd" in rel and to == "kohya" else None)))
    assert set(after) == set(before) and result.modules == len(before)
    for key, delta in before.items():
        tol = 1e-3 if to == "kohya" and "lycoris" not in rel else 1e-12  # kohya may store alpha in fp16
        torch.testing.assert_close(after[key].reshape(delta.shape), delta, rtol=tol, atol=tol * delta.abs().max())


def test_peft_to_loralib_merges_like_peft(tmp_path):
    """PEFT's merge_and_unload (oracle) equals loralib's own eval() merge of the converted file."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import randomize_lora, tiny_llama

    base = tiny_llama().double()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                 rank_pattern={"up_proj": 2}, alpha_pattern={"q_proj": 3}))
    randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    merged = peft_model.merge_and_unload().state_dict()

    assert main(["convert", str(tmp_path / "peft"), "--to", "loralib", "-o", str(tmp_path / "l.pt")]) == 0
    state = torch.load(tmp_path / "l.pt", weights_only=True)
    side = json.loads((tmp_path / "l.pt.json").read_text())
    assert set(side["modules"]) == {k.removesuffix(".lora_A") for k in state if k.endswith(".lora_A")}
    for path, entry in side["modules"].items():
        w = weights[path + ".weight"]
        layer = lora.Linear(w.shape[1], w.shape[0], r=entry["r"], lora_alpha=entry["lora_alpha"], bias=False).double()
        with torch.no_grad():
            layer.weight.copy_(w)
        layer.load_state_dict({"lora_A": state[path + ".lora_A"], "lora_B": state[path + ".lora_B"]}, strict=False)
        layer.eval()  # loralib merges here
        torch.testing.assert_close(layer.weight.detach(), merged[path + ".weight"], rtol=1e-12, atol=1e-12)


def test_cli_json_force_and_input_protection(tmp_path, capsys):
    src = FIXTURES / "loralib_tiny.pt"
    out = tmp_path / "x.safetensors"
    assert main(["convert", str(src), "--to", "loralib", "-o", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["from"] == "loralib" and data["to"] == "loralib" and data["module_count"] == 4
    assert data["files"] == [str(out), str(out) + ".json"]
    assert main(["convert", str(src), "--to", "loralib", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(src), "--to", "loralib", "-o", str(out), "--force"]) == 0
    capsys.readouterr()
    with pytest.raises(OutputError, match="overwrite the input"):
        convert(src, "loralib", src)
    with pytest.raises(FormatError, match="loha"):
        convert(FIXTURES / "lycoris_loha_tiny_sd.safetensors", "loralib", tmp_path / "no.pt")
    assert not (tmp_path / "no.pt").exists() and not (tmp_path / "no.pt.json").exists()
    assert main(["convert", str(src), "--to", "lycoris", "-o", str(tmp_path / "y")]) == 2
    assert "writable layouts" in capsys.readouterr().err
