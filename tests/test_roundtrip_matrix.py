"""Every layout → every other layout → back: bit-exact factors and identical scales.

The sources are the fixtures made by the real libraries (PEFT ``save_pretrained``, diffusers
``save_lora_weights``, loralib ``lora_state_dict``, sd-scripts naming). Where the middle layout
cannot hold what the source holds, the conversion must refuse with a FormatError that says why,
never write something lossy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loratool
from loratool.errors import FormatError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SOURCES = {
    "peft": FIXTURES / "peft_tiny_llama",
    "diffusers": FIXTURES / "diffusers_tiny_sd" / "pytorch_lora_weights.safetensors",
    "kohya": FIXTURES / "kohya_tiny_sd.safetensors",
    "loralib": FIXTURES / "loralib_tiny.pt",
}
SUFFIX = {"kohya": ".safetensors", "diffusers": ".safetensors", "peft": "", "loralib": ".pt"}
# Pairs whose middle layout cannot hold the source, and the reason it must give.
REFUSED = {
    ("loralib", "diffusers"): "diffusers",  # a plain torch model has no diffusers component
    ("peft", "diffusers"): "diffusers",
    ("loralib", "kohya"): "embedding",  # kohya has no embedding LoRA keys
    ("kohya", "loralib"): "conv",  # loralib's ConvLoRA factorises differently
}
FAMILY = {"peft": "llm", "loralib": "llm", "diffusers": "sd1", "kohya": "sd1"}


def _save(adapter, path: Path, layout: str) -> Path:
    files = loratool.save(adapter, path, layout)
    assert files and all(Path(f).exists() for f in files)
    return path


def _load(path: Path, layout: str, family: str | None):
    # A multi-component PEFT output is one folder per component.
    if layout == "peft" and path.is_dir() and not (path / "adapter_config.json").exists():
        merged = None
        for part in sorted(p for p in path.iterdir() if p.is_dir()):
            a = loratool.load(part, layout)
            if merged is None:
                merged = a
            else:
                for m in a:
                    merged.add(m)
        return merged
    return loratool.load(path, layout, family=family)


# Same-layout round trips are covered by each layout's own tests.
PAIRS = [(s, m) for s in SOURCES for m in SUFFIX if s != m]


@pytest.mark.parametrize("source, middle", PAIRS)
def test_there_and_back_is_bit_exact(tmp_path, source, middle):
    original = loratool.load(SOURCES[source])
    family = FAMILY[source]
    there = tmp_path / f"there{SUFFIX[middle]}"
    if (source, middle) in REFUSED:
        with pytest.raises(FormatError, match=REFUSED[(source, middle)]):
            loratool.save(original, there, middle)
        assert not there.exists() and not list(tmp_path.iterdir())
        return
    _save(original, there, middle)
    mid = _load(there, middle, family)
    back_path = _save(mid, tmp_path / f"back{SUFFIX[source]}", source)
    back = _load(back_path, source, family)

    assert set(back.modules) == set(original.modules)
    for key, m in original.modules.items():
        b = back.modules[key]
        assert (b.kind, b.layer, b.fan_in_fan_out) == (m.kind, m.layer, m.fan_in_fan_out), key
        assert set(b.tensors) == set(m.tensors), key
        for name, t in m.tensors.items():
            assert b.tensors[name].dtype == t.dtype, (key, name)
            assert torch.equal(b.tensors[name], t), (key, name)
        assert b.scale == pytest.approx(m.scale, rel=1e-12, abs=0), key
        assert (b.magnitude is None) == (m.magnitude is None)
