"""``loratool convert``: the target layout's library reads every module's ΔW from the output exactly
as the source layout's library reads it from the input (PEFT, diffusers, lycoris, loralib: see
``tests/library_deltas.py``); loralib output merges like PEFT's own merge."""

from __future__ import annotations

import json
from pathlib import Path

import library_deltas as ld
import loralib as lora
import pytest
import torch

from loratool.cli import main
from loratool.errors import FormatError, OutputError
from loratool.ops.convert import convert

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SUFFIX = {"kohya": ".safetensors", "diffusers": ".safetensors", "peft": "", "loralib": ".pt"}
SOURCE_LAYOUT = {"peft_tiny_llama": "peft", "diffusers_tiny_sd": "diffusers", "kohya_tiny_sd.safetensors": "kohya",
                 "loralib_tiny.pt": "loralib", "lycoris_loha_tiny_sd.safetensors": "kohya"}
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


def library_deltas(path: Path, layout: str) -> dict[tuple[str, str], torch.Tensor]:
    """ΔW per module as the layout's own library reads ``path`` (tests/library_deltas.py)."""
    if layout == "peft":
        if (path / "adapter_config.json").exists():
            comp = path.name if path.name in ld.BASES else "model"
            return ld.peft_deltas(path, comp)
        out = {}
        for part in sorted(p for p in path.iterdir() if p.is_dir()):  # one folder per component
            out.update(ld.peft_deltas(part, part.name))
        return out
    if layout == "diffusers":
        return ld.diffusers_deltas(path if path.is_file() else path / "pytorch_lora_weights.safetensors")
    if layout == "loralib":
        return ld.loralib_deltas(path)
    return ld.kohya_deltas(path)


# rel. error ‖ΔW_target − ΔW_source‖ / ‖ΔW_source‖ per module: measured 0.0 on every pair (the factors
# are copied bit for bit and both libraries form the same float64 products); one rounding allowed
TOL = 1e-15


@pytest.mark.parametrize("rel, to", PAIRS)
def test_conversion_keeps_every_delta(tmp_path, rel, to):
    """The target layout's library reads the output as the source layout's library reads the input."""
    out = tmp_path / f"out{SUFFIX[to]}"
    result = convert(FIXTURES / rel, to, out)
    assert result.target_format == to and all(Path(f).exists() for f in result.files)
    source = FIXTURES / rel
    before = library_deltas(source, SOURCE_LAYOUT[source.parts[-1] if source.is_dir() else rel.split("/")[0]])
    after = library_deltas(out, to)
    assert set(after) == set(before) and result.modules == len(before)
    for key, delta in before.items():
        got = after[key].reshape(delta.shape)
        err = float((got - delta).norm() / delta.norm())
        assert err <= TOL, (key, err)


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
