"""The committed fixtures are what ``fixtures/make_fixtures.py`` produces, and each reads as its layout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import loratool
from loratool import formats
from loratool.formats.source import open_source
from loratool.io.pickle_safe import load_pickle_state_dict
from loratool.io.safetensors_file import load_safetensors
from loratool.ops.inspect import inspect

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LAYOUT_OF = {
    "peft_tiny_llama": "peft",
    "diffusers_tiny_sd/pytorch_lora_weights.safetensors": "diffusers",
    "kohya_tiny_sd.safetensors": "kohya",
    "loralib_tiny.pt": "loralib",
    "lycoris_loha_tiny_sd.safetensors": "lycoris",
    "lycoris_lokr_tiny_sd.safetensors": "lycoris",
}
MAX_BYTES = 1024 * 1024


def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    _make_fixtures().build(out)
    return out


def _tensor_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix in (".safetensors", ".pt"))


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".pt":
        return load_pickle_state_dict(path), {}
    return load_safetensors(path)


@pytest.mark.parametrize("rel, layout", list(LAYOUT_OF.items()))
def test_detected_and_loadable(rel, layout):
    src = open_source(FIXTURES / rel)
    assert formats.detect(src) == layout
    adapter = loratool.load(FIXTURES / rel)
    assert len(adapter) > 0 and adapter.source_format == layout


def test_files_are_small():
    for path in FIXTURES.rglob("*"):
        if path.is_file():
            assert path.stat().st_size < MAX_BYTES, path


def test_committed_match_regenerated(regenerated):
    committed = _tensor_files(FIXTURES)
    assert committed == _tensor_files(regenerated)
    for rel in committed:
        ours, meta = _load(FIXTURES / rel)
        theirs, meta2 = _load(regenerated / rel)
        assert list(ours) == list(theirs), rel
        for key, tensor in ours.items():
            assert tensor.dtype == theirs[key].dtype and torch.equal(tensor, theirs[key]), (rel, key)
        assert meta == meta2, rel
    for rel in ("loralib_tiny.pt.json", "peft_tiny_llama/adapter_config.json", "base/tiny_sd/model_index.json"):
        assert _json(FIXTURES / rel) == _json(regenerated / rel), rel


def _json(path: Path) -> dict:
    """The JSON with PEFT's target_modules as a set (PEFT writes a set, in hash order)."""
    obj = json.loads(path.read_text())
    if isinstance(obj.get("target_modules"), list):
        obj["target_modules"] = set(obj["target_modules"])
    return obj


def test_kohya_fixture_metadata():
    report = inspect(FIXTURES / "kohya_tiny_sd.safetensors")
    assert report.family == "sd1" and report.tags[0] == ("cat", 45)
    assert report.metadata["sshs_model_hash"] and set(report.components) == {"unet", "text_encoder"}
    assert {m.layer for m in report.modules} == {"linear", "conv"}
