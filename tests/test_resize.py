"""``resize``: every result against an independent float64 dense SVD of ΔW (numpy), and files that
still load in their layout's own library (PEFT ``PeftModel.from_pretrained`` + ``merge_and_unload``,
diffusers' kohya converter)."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_linalg import _brute, _modules, _rand

import loratool
from loratool.adapter import Adapter, LoraModule
from loratool.cli import main
from loratool.delta import delta_weight
from loratool.errors import UsageError
from loratool.ops.factor_form import transposed
from loratool.ops.rank_rules import RankRule
from loratool.ops.resize import resize, resize_module

TOL = 1e-5


def _matrix(module: LoraModule) -> np.ndarray:
    """ΔW in up @ down orientation, from delta_weight in float64."""
    d = delta_weight(module, dtype=torch.float64)
    return (d.T if transposed(module) else d.reshape(d.shape[0], -1)).numpy()


def _svd(module: LoraModule):
    return np.linalg.svd(_matrix(module), full_matrices=False)


def _truncated(module: LoraModule, k: int) -> np.ndarray:
    u, s, vh = _svd(module)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _rel_err(out: LoraModule, module: LoraModule, k: int) -> float:
    want = _truncated(module, k)
    return float(np.linalg.norm(_matrix(out) - want) / np.linalg.norm(_matrix(module)))


def _is_kxk(module: LoraModule) -> bool:
    return module.layer == "conv" and math.prod(delta_weight(module).shape[2:]) > 1


def _adapter() -> Adapter:
    a = Adapter(source_format="kohya", metadata={"ss_network_dim": "4", "ss_training_comment": "my lora",
                                                  "sshs_model_hash": "stale", "ss_output_name": "x"})
    for m in _modules():
        a.add(m)
    a.add(LoraModule("unet", "small", tensors={"down": _rand(2, 9, seed=60), "up": _rand(11, 2, seed=61)}, alpha=1.0))
    a.add(LoraModule("unet", "dora", alpha=6.0, magnitude=_rand(14, seed=62).abs(),
                     tensors={"down": _rand(6, 10, seed=63), "up": _rand(14, 6, seed=64)}))
    a.add(LoraModule("unet", "biased", alpha=3.0,
                     tensors={"down": _rand(5, 10, seed=65), "up": _rand(12, 5, seed=66), "bias": _rand(12, seed=67)}))
    return a


def _effective_rank(module: LoraModule) -> int:
    """How many singular values ΔW has that the resize can keep (rank of the exact factor form)."""
    s = _svd(module)[1]
    return int((s > s[0] * 1e-10).sum())


def test_fixed_rank_every_module_is_its_eckart_young_truncation():
    src = _adapter()
    res = resize(src, 3, device="cpu")
    assert len(res.adapter) == len(src)
    for rep, (key, module) in zip(res.modules, src.modules.items()):
        out = res.adapter.modules[key]
        k = min(3, module.rank) if module.kind == "lora" else 3
        assert out.kind == "lora" and out.rank == k == rep.rank_out, key
        assert _rel_err(out, module, k) < TOL, key
        s = _svd(module)[1]
        assert rep.fro_kept == pytest.approx(math.sqrt((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
        assert out.dtype == module.dtype
        assert tuple(out.weight_shape) == tuple(delta_weight(module).shape), key
        if module.kind == "lora" and module.scale > 0:
            assert out.scale == pytest.approx(module.scale), key  # alpha/r keeps its meaning
            assert out.rslora == module.rslora
    small = res.adapter.modules[("unet", "small")]
    assert small is src.modules[("unet", "small")]  # rank 2 ≤ 3: untouched
    dora = res.adapter.modules[("unet", "dora")]
    assert torch.equal(dora.magnitude, src.modules[("unet", "dora")].magnitude)
    assert res.warnings  # DoRA note
    # average and whole-adapter kept norm
    assert res.mean_fro_kept == pytest.approx(np.mean([r.fro_kept for r in res.modules]))
    num = sum(np.linalg.norm(_truncated(m, r.rank_out)) ** 2 for m, r in zip(src.modules.values(), res.modules))
    den = sum(np.linalg.norm(_matrix(m)) ** 2 for m in src.modules.values())
    assert res.total_fro_kept == pytest.approx(math.sqrt(num / den), rel=1e-9)


def test_bias_delta_survives_resize_as_peft_merges_it(tmp_path):
    """PEFT ``lora_bias``: Δb = s · lora_B.bias must come through a rank change unchanged. Oracle: PEFT's
    own merge of the original adapter for the bias (and for the weight, at full rank)."""
    from merge_oracles import assert_merged, relative_error, save_base
    from safetensors.torch import load_file
    from test_stack import _peft_biased
    from tiny_models import tiny_clip_text

    from loratool.ops.merge import merge
    from loratool.ops.resize import resize_file

    base = {k: v.detach().clone() for k, v in tiny_clip_text().double().state_dict().items()}
    src, expected = _peft_biased(tmp_path, "a", 3, r=4, lora_alpha=6)
    base_path = save_base(base, tmp_path / "model.safetensors")
    for rank in (4, 2):  # rank 4: nothing to cut; rank 2: weights truncated, biases exact
        out, merged = tmp_path / f"r{rank}", tmp_path / f"m{rank}.safetensors"
        resize_file(src, out, rank, device="cpu")
        merge(base_path, [out], merged, device="cpu")
        if rank == 4:
            assert assert_merged(merged, expected, base, tol=1e-12) == 8
            continue
        got = load_file(str(merged))
        biases = [k for k in base if k.endswith("bias") and not torch.equal(expected[k], base[k])]
        assert len(biases) == 4
        for k in biases:
            assert relative_error(got[k], expected[k], base[k]) < 1e-12, k


def test_input_is_not_modified():
    src = _adapter()
    before = {k: {n: t.clone() for n, t in m.tensors.items()} for k, m in src.modules.items()}
    resize(src, 2, device="cpu")
    for k, m in src.modules.items():
        for n, t in m.tensors.items():
            assert torch.equal(t, before[k][n])


def test_conv_rank_applies_to_kxk_convs_only():
    src = _adapter()
    res = resize(src, 3, conv_rank=1, device="cpu")
    for key, module in src.modules.items():
        out = res.adapter.modules[key]
        want = 1 if _is_kxk(module) else min(3, module.rank) if module.kind == "lora" else 3
        assert out.rank == want, key
        assert _rel_err(out, module, want) < TOL


@pytest.mark.parametrize("method,param,cap", [("sv_fro", 0.9, 64), ("sv_fro", 0.5, 2), ("sv_cumulative", 0.7, 64),
                                              ("sv_ratio", 3.0, 64), ("sv_ratio", 1.0, 64), ("sv_fro", 1.0, 64)])
def test_dynamic_ranks_are_exactly_as_defined(method, param, cap):
    src = _adapter()
    res = resize(src, cap, dynamic=method, param=param, device="cpu")
    for key, module in src.modules.items():
        s = list(_svd(module)[1][: _effective_rank(module)])
        k = max(1, min(_brute(s, method, param), cap, len(s)))
        out = res.adapter.modules[key]
        if module.kind == "lora" and "mid" not in module.tensors and k >= module.rank:
            assert out is module
            continue
        assert out.rank == k, (key, s)
        assert _rel_err(out, module, k) < TOL
    meta = res.adapter.metadata
    ranks = {m.rank for m in res.adapter.modules.values()}
    assert meta["ss_network_dim"] == ("Dynamic" if len(ranks) > 1 else str(ranks.pop()))
    prov = json.loads(meta["loratool_resize"])
    assert prov["dynamic"] == method and prov["param"] == param


def test_metadata_is_updated():
    res = resize(_adapter(), 3, device="cpu")
    meta = res.adapter.metadata
    assert "sshs_model_hash" not in meta  # stale: the writer recomputes it
    assert meta["ss_training_comment"].endswith("; my lora") and "rank 3" in meta["ss_training_comment"]
    assert meta["ss_output_name"] == "x"
    assert json.loads(meta["loratool_resize"])["rank"] == 3


def test_float32_and_float16_inputs():
    up, down = _rand(300, 32, seed=70, dtype=torch.float32), _rand(32, 200, seed=71, dtype=torch.float32)
    m32 = LoraModule("unet", "a", tensors={"down": down, "up": up}, alpha=16.0)
    out, rep = resize_module(m32, 8)
    assert out.dtype == torch.float32 and out.alpha == pytest.approx(4.0)
    assert _rel_err(out, m32, 8) < TOL
    m16 = LoraModule("unet", "b", tensors={"down": down.half(), "up": up.half()}, alpha=16.0)
    out16, _ = resize_module(m16, 8)
    assert out16.dtype == torch.float16
    assert _rel_err(out16, m16, 8) < 5e-3  # storage rounding of fp16 only


def test_zero_module_resizes_to_zero():
    m = LoraModule("unet", "z", tensors={"down": _rand(4, 10, seed=72), "up": torch.zeros(8, 4, dtype=torch.float64)})
    out, rep = resize_module(m, 2, RankRule("sv_fro", 0.9))
    assert out.rank == 1 and rep.fro_kept == 1.0
    assert not delta_weight(out).any()


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError):
        resize(_adapter(), 0)
    with pytest.raises(UsageError):
        resize(_adapter(), 4, dynamic="sv_fro", param=2.0)
    with pytest.raises(UsageError):
        resize(_adapter(), 4, conv_rank=0)


# ---------------------------------------------------------------- files


def _peft_case(tmp_path, **cfg):
    from peft import LoraConfig, get_peft_model
    from tiny_models import randomize_lora, tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(**cfg))
    randomize_lora(model)
    model.save_pretrained(tmp_path / "in")
    base = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    merged = model.merge_and_unload().state_dict()
    deltas = {k: (merged[k].double() - base[k].double()).numpy() for k in base if not torch.equal(merged[k], base[k])}
    return base, deltas


def _peft_merged(folder):
    from peft import PeftModel
    from tiny_models import tiny_llama

    return PeftModel.from_pretrained(tiny_llama(), str(folder)).merge_and_unload().state_dict()


@pytest.mark.parametrize("cfg", [
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    dict(r=6, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 4},
         alpha_pattern={"q_proj": 9}),
])
def test_peft_file_resized_loads_in_peft_and_merges_to_the_truncated_delta(tmp_path, cfg):
    base, deltas = _peft_case(tmp_path, **cfg)
    res = loratool.ops.resize.resize_file(tmp_path / "in", tmp_path / "out", 3, device="cpu")
    assert res.output_format == "peft"
    merged = _peft_merged(tmp_path / "out")
    assert deltas
    for key, delta in deltas.items():
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        want = (u[:, :3] * s[:3]) @ vh[:3]
        got = merged[key].double().numpy() - base[key].double().numpy()
        assert np.linalg.norm(got - want) / np.linalg.norm(delta) < TOL, key


def test_peft_dynamic_ranks_write_a_rank_pattern_peft_accepts(tmp_path):
    base, deltas = _peft_case(tmp_path, r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    code = main(["resize", str(tmp_path / "in"), "--rank", "8", "--dynamic", "sv_fro", "--param", "0.8",
                 "-o", str(tmp_path / "out"), "--json", "--device", "cpu"])
    assert code == 0
    merged = _peft_merged(tmp_path / "out")
    ranks = set()
    for key, delta in deltas.items():
        s = list(np.linalg.svd(delta, compute_uv=False)[:8])
        k = max(1, min(_brute(s, "sv_fro", 0.8), 8))
        ranks.add(k)
        u, sv, vh = np.linalg.svd(delta, full_matrices=False)
        want = (u[:, :k] * sv[:k]) @ vh[:k]
        got = merged[key].double().numpy() - base[key].double().numpy()
        assert np.linalg.norm(got - want) / np.linalg.norm(delta) < TOL, key
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    if len(ranks) > 1:
        assert cfg["rank_pattern"]


def _kohya_te_adapter() -> Adapter:
    a = Adapter(source_format="kohya", metadata={"ss_network_dim": "8", "ss_network_alpha": "4.0",
                                                  "ss_training_comment": "trained"})
    for i in range(2):
        for sub, out in (("self_attn.q_proj", 32), ("self_attn.v_proj", 32), ("mlp.fc1", 37)):
            a.add(LoraModule("text_encoder", f"text_model.encoder.layers.{i}.{sub}", alpha=4.0,
                             tensors={"down": _rand(8, 32, seed=i * 10 + out, dtype=torch.float32),
                                      "up": _rand(out, 8, seed=i * 10 + out + 1, dtype=torch.float32)}))
    return a


def test_kohya_file_cli_resize_loads_in_diffusers_converter(tmp_path, capsys):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    src = _kohya_te_adapter()
    loratool.save(src, tmp_path / "in.safetensors", "kohya")
    code = main(["resize", str(tmp_path / "in.safetensors"), "--rank", "3", "-o", str(tmp_path / "out.safetensors"),
                 "--json", "--device", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank_max"] == 3 and len(report["modules"]) == len(src)
    sd = load_file(str(tmp_path / "out.safetensors"))
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    checked = 0
    for key, module in src.modules.items():
        # diffusers' old text-encoder style: q_proj → to_q_lora, mlp.fc1 → fc1.lora_linear_layer
        path = key[1].replace("self_attn.q_proj", "self_attn.to_q_lora")
        path = path.replace("self_attn.v_proj", "self_attn.to_v_lora")
        stem = f"text_encoder.{path}" + (".lora_linear_layer" if path.endswith("fc1") else "")
        a = converted[f"{stem}.down.weight"].double()
        b = converted[f"{stem}.up.weight"].double()
        scale = alphas[f"{stem}.down.weight.alpha"] / a.shape[0]
        assert a.shape[0] == 3
        err = np.linalg.norm((scale * b @ a).numpy() - _truncated(module, 3)) / np.linalg.norm(_matrix(module))
        assert err < TOL, key
        checked += 1
    assert checked == 6
    # alpha/r keeps its meaning: 4/8 = 0.5 → alpha 1.5 at rank 3; header updated, hashes fresh.
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_dim"] == "3" and float(meta["ss_network_alpha"]) == pytest.approx(1.5)
    assert "trained" in meta["ss_training_comment"] and "loratool_resize" in meta
    raw = (tmp_path / "out.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()


def test_cli_refuses_overwriting_the_input_and_bad_params(tmp_path, capsys):
    loratool.save(_kohya_te_adapter(), tmp_path / "in.safetensors", "kohya")
    src = str(tmp_path / "in.safetensors")
    assert main(["resize", src, "--rank", "3", "-o", src]) == 2
    assert main(["resize", str(tmp_path / "in.safetensors"), "--rank", "3", "--dynamic", "sv_ratio", "--param", "0.5",
                 "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "sv_ratio" in err and not (tmp_path / "o.safetensors").exists()


def test_cli_table_output(tmp_path, capsys):
    loratool.save(_kohya_te_adapter(), tmp_path / "in.safetensors", "kohya")
    assert main(["resize", str(tmp_path / "in.safetensors"), "--rank", "2", "-o", str(tmp_path / "o.safetensors"),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "6 modules" in out and "mean" in out
