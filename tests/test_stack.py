"""``stack``: concat is exactly Σ wᵢ ΔWᵢ (no cross terms, weights applied once), svd is the best
rank-N approximation of that sum; checked against numpy float64 dense sums / SVDs, and files that
still load in PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_linalg import _modules, _rand
from test_resize import _matrix

import loratool
from loratool.adapter import Adapter, LoraModule
from loratool.cli import main
from loratool.errors import MatchError, UsageError
from loratool.ops.stack import stack

TOL = 1e-5


def _pair():
    a = Adapter(source_format="kohya", metadata={"ss_network_dim": "4", "sshs_model_hash": "stale"})
    b = Adapter(source_format="kohya")
    a.add(LoraModule("unet", "lin", alpha=2.0, tensors={"down": _rand(4, 12, seed=1), "up": _rand(10, 4, seed=2)}))
    b.add(LoraModule("unet", "lin", alpha=16.0, tensors={"down": _rand(8, 12, seed=3), "up": _rand(10, 8, seed=4)}))
    a.add(LoraModule("unet", "conv", layer="conv", alpha=4.0,
                     tensors={"down": _rand(4, 6, 3, 3, seed=5), "up": _rand(8, 4, 1, 1, seed=6)}))
    b.add(LoraModule("unet", "conv", layer="conv", alpha=4.0,
                     tensors={"down": _rand(4, 6, 3, 3, seed=7), "up": _rand(8, 4, 1, 1, seed=8)}))
    a.add(LoraModule("unet", "only_a", alpha=1.0, tensors={"down": _rand(2, 5, seed=9), "up": _rand(7, 2, seed=10)}))
    b.add(LoraModule("unet", "only_b", alpha=3.0, tensors={"down": _rand(3, 5, seed=11), "up": _rand(6, 3, seed=12)}))
    return a, b


def _sum(adapters, weights, key):
    return sum(w * _matrix(ad.modules[key]) for ad, w in zip(adapters, weights) if key in ad.modules)


def test_concat_is_the_exact_weighted_sum_with_ranks_adding_up():
    a, b = _pair()
    weights = [0.7, -1.3]
    res = stack([a, b], weights, device="cpu")
    assert set(res.adapter.modules) == set(a.modules) | set(b.modules)
    for key, out in res.adapter.modules.items():
        want = _sum([a, b], weights, key)
        assert np.linalg.norm(_matrix(out) - want) / np.linalg.norm(want) < 1e-12, key
        assert out.rank == sum(ad.modules[key].rank for ad in (a, b) if key in ad.modules)
    # equal scales (conv: 4/4 = 1) keep alpha/r; different scales (lin: 0.5 vs 2) give scale 1
    assert res.adapter.modules[("unet", "conv")].scale == pytest.approx(1.0)
    assert res.adapter.modules[("unet", "lin")].alpha == pytest.approx(12.0)
    assert res.adapter.modules[("unet", "only_b")].scale == pytest.approx(1.0)
    meta = res.adapter.metadata
    assert "sshs_model_hash" not in meta and json.loads(meta["loratool_stack"])["method"] == "concat"


def test_concat_has_no_cross_terms_and_applies_the_weight_once():
    # The peer bugs: weighting both factors (w² ΔW) or summing factors of equal rank
    # ((up₁+up₂)(down₁+down₂) has cross terms up₁down₂ + up₂down₁).
    a, b = _pair()
    key = ("unet", "conv")
    res = stack([a, b], [2.0, 1.0], device="cpu")
    got = _matrix(res.adapter.modules[key])
    right = _sum([a, b], [2.0, 1.0], key)
    ma, mb = a.modules[key], b.modules[key]
    up_sum = (ma.tensors["up"] * 2 + mb.tensors["up"]).reshape(8, 4).numpy()
    down_sum = (ma.tensors["down"] + mb.tensors["down"]).reshape(4, -1).numpy()
    wrong_cross = up_sum @ down_sum
    wrong_squared = _sum([a, b], [4.0, 1.0], key)
    assert np.linalg.norm(got - right) / np.linalg.norm(right) < 1e-12
    assert np.linalg.norm(got - wrong_cross) / np.linalg.norm(right) > 0.1
    assert np.linalg.norm(got - wrong_squared) / np.linalg.norm(right) > 0.1


def test_negative_weight_subtracts_to_zero():
    a, _ = _pair()
    res = stack([a, a], [1.0, -1.0], device="cpu")
    for key in a.modules:
        assert np.abs(_matrix(res.adapter.modules[key])).max() < 1e-12


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_is_the_best_rank_n_approximation_of_the_sum(rank):
    a, b = _pair()
    weights = [1.0, 0.5]
    res = stack([a, b], weights, method="svd", rank=rank, device="cpu")
    for rep in res.modules:
        key = (rep.component, rep.path)
        want = _sum([a, b], weights, key)
        u, s, vh = np.linalg.svd(want, full_matrices=False)
        k = min(rank, int((s > s[0] * 1e-10).sum()))
        out = res.adapter.modules[key]
        assert out.rank == k
        trunc = (u[:, :k] * s[:k]) @ vh[:k]
        assert np.linalg.norm(_matrix(out) - trunc) / np.linalg.norm(want) < TOL, key
        assert rep.fro_kept == pytest.approx(np.sqrt((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-8)


def test_lycoris_and_full_modules_stack_exactly():
    mods = {m.path: m for m in _modules()}
    a, b = Adapter(source_format="lycoris"), Adapter(source_format="kohya")
    # same 40×36 target: LoHa (Khatri-Rao factor form) + LoRA
    a.add(mods["loha"])
    b.add(LoraModule("unet", "loha", alpha=1.0, tensors={"down": _rand(3, 36, seed=80), "up": _rand(40, 3, seed=81)}))
    # conv 16×12×3×3: LoKr (dense) + LoRA; a full module alone
    a.add(mods["lokr_conv"])
    b.add(LoraModule("unet", "lokr_conv", layer="conv", alpha=2.0,
                     tensors={"down": _rand(2, 12, 3, 3, seed=82), "up": _rand(16, 2, 1, 1, seed=83)}))
    a.add(mods["full"])
    res = stack([a, b], [1.5, -0.5], device="cpu")
    for key, out in res.adapter.modules.items():
        want = _sum([a, b], [1.5, -0.5], key)
        assert out.kind == "lora"
        assert np.linalg.norm(_matrix(out) - want) / np.linalg.norm(want) < 1e-10, key


def _peft_biased(tmp_path, name: str, seed: int, **cfg):
    """A PEFT ``lora_bias`` adapter on a CLIP text model (biased Linears), saved; and PEFT's merge of it."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import randomize_lora, tiny_clip_text

    model = tiny_clip_text().double()
    pm = get_peft_model(model, LoraConfig(target_modules=["q_proj", "fc1"], lora_bias=True, **cfg))
    randomize_lora(pm, seed=seed)
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name, {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def test_bias_deltas_are_summed_once(tmp_path):
    """Oracle: PEFT's merge of each adapter alone (W + s·B@A, b + s·lora_B.bias); the stack merges to
    base + 2·Δ_a + Δ_b, weights and biases."""
    from merge_oracles import assert_merged, save_base
    from tiny_models import tiny_clip_text

    from loratool.ops.merge import merge
    from loratool.ops.stack import stack_files

    base = {k: v.detach().clone() for k, v in tiny_clip_text().double().state_dict().items()}
    a, merged_a = _peft_biased(tmp_path, "a", 1, r=2, lora_alpha=4)
    b, merged_b = _peft_biased(tmp_path, "b", 2, r=3, lora_alpha=3)
    expected = {k: base[k] + 2.0 * (merged_a[k] - base[k]) + (merged_b[k] - base[k]) for k in base}
    out = tmp_path / "stacked"
    stack_files([a, b], out, [2.0, 1.0], device="cpu")
    merged = tmp_path / "merged.safetensors"
    merge(save_base(base, tmp_path / "model.safetensors"), [out], merged, device="cpu")
    biases = [k for k in base if k.endswith("bias") and not torch.equal(expected[k], base[k])]
    assert len(biases) == 4  # q_proj and fc1 of both layers
    assert assert_merged(merged, expected, base, tol=1e-12) == 8


def test_mismatched_shapes_dora_and_bad_arguments_are_errors():
    a, b = _pair()
    c = Adapter()
    c.add(LoraModule("unet", "lin", tensors={"down": _rand(4, 13, seed=96), "up": _rand(10, 4, seed=97)}))
    with pytest.raises(MatchError, match="unet:lin"):
        stack([a, c], device="cpu")
    d1, d2 = Adapter(), Adapter()
    for d in (d1, d2):
        d.add(LoraModule("unet", "lin", magnitude=torch.ones(10),
                         tensors={"down": _rand(4, 12, seed=98), "up": _rand(10, 4, seed=99)}))
    with pytest.raises(UsageError, match="DoRA"):
        stack([d1, d2], device="cpu")
    with pytest.raises(UsageError):
        stack([a, b], [1.0], device="cpu")
    with pytest.raises(UsageError):
        stack([a, b], method="svd", device="cpu")
    with pytest.raises(UsageError):
        stack([a, b], method="mean", device="cpu")


def test_peft_files_stack_and_load_in_peft(tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model
    from tiny_models import randomize_lora, tiny_llama

    base = tiny_llama().state_dict()
    deltas = []
    for i, cfg in enumerate([dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                             dict(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"])]):
        model = get_peft_model(tiny_llama(), LoraConfig(**cfg))
        randomize_lora(model, seed=i + 1)
        model.save_pretrained(tmp_path / f"in{i}")
        merged = model.merge_and_unload().state_dict()
        deltas.append({k: merged[k].double() - base[k].double() for k in base})
    weights = [0.8, -0.6]
    code = main(["stack", str(tmp_path / "in0"), str(tmp_path / "in1"), "-w", "0.8", "-w", "-0.6",
                 "-o", str(tmp_path / "out"), "--json", "--device", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "peft" and report["method"] == "concat"
    got = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).merge_and_unload().state_dict()
    changed = 0
    for k in base:
        want = weights[0] * deltas[0][k] + weights[1] * deltas[1][k]
        if not want.abs().max() > 0:
            continue
        changed += 1
        assert ((got[k].double() - base[k].double()) - want).norm() / want.norm() < TOL, k
    assert changed == 6  # q (both), v (first), down (second), two layers each


def test_kohya_and_diffusers_inputs_mix_and_svd_cli(tmp_path, capsys):
    from test_resize import _kohya_te_adapter

    a = _kohya_te_adapter()
    b = _kohya_te_adapter()
    for m in b.modules.values():  # a different second LoRA on the same modules
        m.tensors = {n: t.flip(0).contiguous() for n, t in m.tensors.items()}
    loratool.save(a, tmp_path / "a.safetensors", "kohya")
    loratool.save(b, tmp_path / "b.safetensors", "diffusers")
    code = main(["stack", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--method", "svd",
                 "--rank", "2", "-w", "1", "-w", "0.5", "-o", str(tmp_path / "o.safetensors"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "stacked" in capsys.readouterr().out
    out = loratool.load(tmp_path / "o.safetensors")
    assert out.source_format == "kohya"
    assert set(out.modules) == set(a.modules)
    for key, module in out.modules.items():
        assert module.rank == 2
        want = _sum([a, b], [1.0, 0.5], key)
        u, s, vh = np.linalg.svd(want, full_matrices=False)
        trunc = (u[:, :2] * s[:2]) @ vh[:2]
        assert np.linalg.norm(_matrix(module) - trunc) / np.linalg.norm(want) < TOL, key
    assert "loratool_stack" in out.metadata
