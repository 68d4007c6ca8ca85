"""PEFT AdaLoRA folders: read into plain LoRA (ΔW = B·(A⊙E)·scaling/(ranknum + 1e-5)), merged as PEFT's
``AdaLoraModel.merge_and_unload`` merges them, and written as plain LoRA that PEFT loads.

Oracle: PEFT 0.21 itself: AdaLoRA adapters saved by ``save_pretrained`` after a ``rank_pattern`` (so the
saved tensors are pruned and ranknum stays init_r, as after real training), loaded by
``PeftModel.from_pretrained`` in float64, merged by ``merge_and_unload``.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import tiny_gpt2, tiny_llama

import loratool
from loratool.cli import main
from loratool.delta import delta_weight
from loratool.formats.peft_adalora import ZERO_RANK_KEY
from loratool.ops.merge import merge

# The saved factors are float32: E folded into A is stored back in float32 (one rounding, measured
# ≤ 6e-8 relative on ΔW), and merges accumulate in float32 (measured 2.1e-8 relative to the update).
FOLD_TOL = 2e-7
MERGE_TOL = 2e-7
FACTORIES = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"])}


def _adalora(tmp_path, arch, lora_alpha=12):
    factory, targets = FACTORIES[arch]
    model = factory()
    pm = get_peft_model(model, AdaLoraConfig(init_r=6, target_r=3, lora_alpha=lora_alpha, target_modules=targets,
                                             total_step=100))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    # a rank pattern as RankAllocator leaves it: some rows kept, one module pruned away, one untouched
    pattern = {}
    names = [n for n, m in pm.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E]
    for i, name in enumerate(names[:-1]):
        key = name.removeprefix("base_model.model.") + ".lora_E"
        pattern[key] = [False] * 6 if i == 1 else [j % (i + 2) != 1 for j in range(6)]
    pm.peft_config["default"].rank_pattern = pattern
    folder = tmp_path / f"adalora_{arch}"
    pm.save_pretrained(str(folder))
    base = tmp_path / f"base_{arch}.safetensors"
    save_file({k: v.double().contiguous() for k, v in factory().state_dict().items()
               if k != "lm_head.weight" or arch != "gpt2"}, str(base))
    return folder, base, names


def _peft_merged(arch, folder) -> dict[str, torch.Tensor]:
    factory, _ = FACTORIES[arch]
    pm = PeftModel.from_pretrained(factory().double(), str(folder))
    return pm.merge_and_unload().state_dict()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_peft_merge_and_unload(tmp_path, arch):
    folder, base, names = _adalora(tmp_path, arch)
    adapter = loratool.load(folder)
    assert {m.kind for m in adapter} == {"lora"}
    assert len(adapter) == len(names) - 1  # the fully pruned module is left out ...
    assert adapter.metadata[ZERO_RANK_KEY] == names[1].removeprefix("base_model.model.")  # ... and named
    ranks = sorted(m.rank for m in adapter)
    assert 6 in ranks and min(ranks) < 6  # one untouched module, pruned ones
    want = _peft_merged(arch, folder)
    out = tmp_path / "merged.safetensors"
    merge(base, [folder], out, device="cpu")
    got = load_file(str(out))
    base_state = load_file(str(base))
    changed = 0
    for key, w in base_state.items():
        expected = want[key].double()
        update = float((expected - w).norm())
        if update == 0:
            assert torch.equal(got[key], w), key
            continue
        changed += 1
        assert float((got[key] - expected).norm()) / update < MERGE_TOL, key
    assert changed == len(names) - 1


@pytest.mark.parametrize("arch,lora_alpha", [("llama", 12), ("gpt2", 12), ("llama", 0)])
def test_delta_equals_peft_get_delta_weight(tmp_path, arch, lora_alpha):
    """(lora_alpha 0: PEFT's scaling is then the rank)"""
    folder, _, _ = _adalora(tmp_path, arch, lora_alpha=lora_alpha)
    factory, _ = FACTORIES[arch]
    pm = PeftModel.from_pretrained(factory().double(), str(folder))
    ours = loratool.load(folder)
    for n, m in pm.named_modules():
        if hasattr(m, "lora_E") and "default" in m.lora_E and m.r["default"] > 0:
            want = m.get_delta_weight("default").detach()
            got = delta_weight(ours.modules[("model", n.removeprefix("base_model.model."))], dtype=torch.float64)
            assert float((got - want).norm() / want.norm()) < FOLD_TOL, n


def test_written_as_plain_lora_loads_in_peft(tmp_path):
    folder, _, _ = _adalora(tmp_path, "llama")
    pm = PeftModel.from_pretrained(tiny_llama().double(), str(folder))
    want = {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach()
            for n, m in pm.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E and m.r["default"] > 0}
    out = tmp_path / "plain"
    assert main(["convert", str(folder), "--to", "peft", "-o", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "init_r" not in cfg
    plain = PeftModel.from_pretrained(tiny_llama().double(), str(out))
    got = {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach()
           for n, m in plain.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert set(got) == set(want)
    for name, delta in want.items():
        assert float((got[name] - delta).norm() / delta.norm()) < 1e-6, name  # float32 factors in the file


def test_info_reads_adalora(tmp_path, capsys):
    folder, _, _ = _adalora(tmp_path, "llama")
    assert main(["info", str(folder), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "peft" and doc["modules"]
