"""``loratool extract`` against real oracles: PEFT merges, float64 full SVDs, known LoRAs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import randomize_lora, tiny_gpt2, tiny_llama

from loratool.cli import main
from loratool.errors import MatchError, UsageError
from loratool.ops.extract import extract, extract_to_file
from loratool.ops.randomized_svd import frobenius_sq, randomized_svd

TARGETS = ["q_proj", "v_proj", "down_proj"]


def wide_llama(seed: int = 0):
    """Wide enough (288) that the randomized solver runs instead of the small-matrix exact path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=288, intermediate_size=320, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def finetune(model, steps: int = 4, lr: float = 3e-3, seed: int = 5):
    """A few Adam steps on random tokens: every parameter (norms, embeddings) moves."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def optimal_error(delta: torch.Tensor, k: int) -> float:
    """‖ΔW − ΔW_k‖_F of the best rank-k approximation (Eckart–Young, float64 full SVD)."""
    s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
    return float(s[k:].square().sum().sqrt())


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory):
    """A tiny llama and a copy merged by PEFT from a known rank-4 LoRA."""
    d = tmp_path_factory.mktemp("lora_pair")
    tiny_llama().save_pretrained(d / "base")
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_lora(peft_model)
    deltas = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            deltas[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").detach().clone()
    peft_model.merge_and_unload().save_pretrained(d / "ft")
    return d, deltas


@pytest.fixture(scope="module")
def finetuned_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetuned_pair")
    wide_llama().save_pretrained(d / "base")
    finetune(wide_llama()).save_pretrained(d / "ft")
    return d


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- solver
def _spectrum(name: str, k_all: int) -> torch.Tensor:
    i = torch.arange(1, k_all + 1, dtype=torch.float64)
    return {
        "i^-0.1": i ** -0.1, "i^-0.25": i ** -0.25, "i^-0.5": i ** -0.5, "i^-1": 1 / i, "i^-2": i ** -2.0,
        "exp": torch.exp(-i / 20), "knee": torch.where(i <= 20, 1.0, 0.3) * i ** -0.3,
        # more equal values than the sketch is wide: any 16 of them are optimal
        "plateau": torch.where(i <= 40, 1.0, 0.2 * i ** -0.5),
        "gap": torch.where(i <= 16, 1.0, 0.01 * i ** -0.3),  # a rank-16 fine-tune plus small noise
        "lora+noise": torch.where(i <= 8, 1.0, 0.0) + 1e-3,  # a merged LoRA and rounding noise
        "near-tie": torch.where(i <= 14, 1.0, 0.0) + torch.where((i > 14) & (i <= 20), 0.9, 0.0) + 0.02 * i ** -0.2,
    }[name]


def _with_spectrum(shape, s: torch.Tensor, seed: int = 3) -> torch.Tensor:
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, s.numel(), generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, s.numel(), generator=gen, dtype=torch.float64))[0]
    return (u * s) @ v.T


SPECTRA = ["i^-0.1", "i^-0.25", "i^-0.5", "i^-1", "i^-2", "exp", "knee", "plateau", "gap", "lora+noise", "near-tie"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("shape", [(300, 500), (640, 320)])
def test_randomized_svd_within_1pct_of_optimal_on_slow_spectra(spectrum, shape, dtype):
    """Error of the randomized solver vs the optimum from the planted (float64) spectrum."""
    s = _spectrum(spectrum, min(shape))
    a64 = _with_spectrum(shape, s)
    a = a64.to(dtype)
    for rank in (4, 16, 32):
        t = randomized_svd(a, rank, generator=torch.Generator().manual_seed(0))
        assert t.solver == "randomized" and t.U.dtype == dtype
        err = float(torch.linalg.vector_norm(a64 - (t.U.double() * t.S.double()) @ t.Vh.double()))
        opt = float(s[rank:].square().sum().sqrt())
        # float32: the input itself is rounded (‖a − a64‖ ≈ 6e-8·‖a‖), which no solver can undo
        slack = 0.0 if dtype == torch.float64 else 1e-6 * float(s.square().sum().sqrt())
        assert err <= 1.01 * opt + slack, (spectrum, rank, err / opt, t.power_iters)
        # the solver's own error identity ‖A‖² − Σ_{i≤k} σ̃ᵢ² (what its stopping test relies on)
        known = t.total_energy - float(t.S.double().square().sum())
        assert math.isclose(known, err ** 2, rel_tol=1e-3, abs_tol=1e-5 * t.total_energy if dtype == torch.float32
                            else 1e-12), (known, err ** 2)


def test_randomized_svd_fallbacks_and_energy():
    # Exactly rank 3 (the sketch is rank-deficient: CholeskyQR fails, Householder QR takes over).
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(400, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 300, generator=gen,
                                                                              dtype=torch.float64)
    t = randomized_svd(a, 4, generator=gen)
    assert t.solver == "randomized"
    assert torch.allclose((t.U * t.S) @ t.Vh, a, atol=1e-10)
    # Not settled within max_steps: the full SVD answers.
    b = _with_spectrum((300, 500), _spectrum("i^-0.25", 300))
    t = randomized_svd(b, 16, max_steps=4, min_steps=2, tol=1e-12, generator=gen)
    assert t.solver == "exact" and t.power_iters == 4
    want = torch.linalg.svdvals(b)[:16]
    assert torch.allclose(t.S, want, rtol=1e-10)
    # tol=0: exactly min_steps half steps
    assert randomized_svd(b, 16, min_steps=3, tol=0, generator=gen).power_iters == 3


@pytest.mark.parametrize("transpose", [False, True])
def test_frobenius_sq_is_float64_accurate_without_a_copy(transpose):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 1100, generator=gen) * 1e-2 + 3e-3
    a = a.T if transpose else a
    want = float(a.double().square().sum())
    assert math.isclose(frobenius_sq(a), want, rel_tol=1e-7)  # one float32 vector_norm is off by ~1e-4


# ----------------------------------------------------------------------------- exact recovery
def test_extract_recovers_the_merged_lora_delta(lora_pair, tmp_path):
    d, deltas = lora_pair
    for rank in (4, 6):
        res = extract(d / "ft", d / "base", rank=rank, dtype=torch.float64, out_dtype=torch.float64)
        got = {m.path: m for m in res.adapter}
        assert set(got) == set(deltas)
        for path, expected in deltas.items():
            mod = got[path]
            assert mod.rank == rank and mod.layer == "linear"
            approx = mod.tensors["up"] @ mod.tensors["down"] * mod.scale
            assert torch.allclose(approx, expected.double(), atol=1e-5, rtol=0)
        # every other float tensor is bit-identical: counted, not extracted, not reported
        assert res.unchanged == len(_weights(d / "base")) - len(deltas)
        assert res.not_extracted == []
    # The PEFT folder loads in PEFT and reproduces the fine-tune's logits.
    out = tmp_path / "lora"
    res = extract_to_file(d / "ft", d / "base", out, rank=4)
    assert res.format == "peft"
    ids = torch.arange(12).reshape(1, 12)
    ft = tiny_llama()
    ft.load_state_dict(_weights(d / "ft"), strict=False)
    with torch.no_grad():
        want = ft(input_ids=ids).logits
        got = PeftModel.from_pretrained(tiny_llama(), str(out))(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    assert set(cfg["target_modules"]) == {m.path for m in res.modules}, cfg["target_modules"]


# ----------------------------------------------------------------------------- optimality
def test_merging_back_is_within_1pct_of_the_optimal_rank_error(finetuned_pair, tmp_path):
    d = finetuned_pair
    rank = 4
    out = tmp_path / "lora"
    res = extract_to_file(d / "ft", d / "base", out, rank=rank, dtype=torch.float64, out_dtype=torch.float64)
    assert res.modules and all(m.solver == "randomized" for m in res.modules if min(m.shape) > 256)
    base_model = wide_llama().double()
    merged = PeftModel.from_pretrained(base_model, str(out)).merge_and_unload().state_dict()
    ft, base = _weights(d / "ft"), _weights(d / "base")
    checked = 0
    for m in res.modules:
        key = m.path + ".weight"
        delta = ft[key].double() - base[key].double()
        opt = optimal_error(delta, rank)
        err = float(torch.linalg.vector_norm(merged[key] - ft[key].double()))
        assert err <= 1.01 * opt + 1e-12, (key, err / opt)
        assert math.isclose(m.captured ** 2 + (opt / float(delta.norm())) ** 2, 1.0, rel_tol=1e-3)
        checked += 1
    assert checked == 8  # q, k, v, o, gate, up, down of the one layer, and lm_head
    reasons = {s.name: s.reason for s in res.not_extracted}
    assert "norm" in reasons["model.layers.0.input_layernorm.weight"]
    assert "--embeddings" in reasons["model.embed_tokens.weight"]


@pytest.mark.parametrize("rank", [4, 16, 32])
def test_float32_default_solver_on_a_real_finetune_is_within_1pct(finetuned_pair, rank):
    """The default path (float32 compute, randomized solver) against float64 full-SVD optima."""
    d = finetuned_pair
    res = extract(d / "ft", d / "base", rank=rank)
    ft, base = _weights(d / "ft"), _weights(d / "base")
    assert len(res.modules) == 8 and all(m.solver == "randomized" for m in res.modules if min(m.shape) > 256)
    for m in res.modules:
        mod = res.adapter.modules[("model", m.path)]
        delta = ft[m.path + ".weight"].double() - base[m.path + ".weight"].double()
        err = float(torch.linalg.vector_norm(delta - mod.tensors["up"].double() @ mod.tensors["down"].double()))
        assert err <= 1.01 * optimal_error(delta, rank) + 1e-6 * float(delta.norm()), (m.path, rank)
        assert math.isclose(m.rel_error, err / float(delta.norm()), rel_tol=1e-3)


def test_embeddings_flag_makes_peft_embedding_modules(tmp_path):
    base, ft = tiny_llama(), finetune(tiny_llama(), lr=1e-2)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    out = tmp_path / "lora"
    res = extract_to_file(tmp_path / "ft", tmp_path / "base", out, rank=8, embeddings=True,
                          dtype=torch.float64, out_dtype=torch.float64,
                          include=r"embed_tokens|q_proj")
    layers = {m.path: m.layer for m in res.modules}
    assert layers["model.embed_tokens"] == "embedding"
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    merged = PeftModel.from_pretrained(tiny_llama().double(), str(out)).merge_and_unload().state_dict()
    w_ft, w_base = _weights(tmp_path / "ft"), _weights(tmp_path / "base")
    for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"):
        delta = w_ft[key].double() - w_base[key].double()
        err = float(torch.linalg.vector_norm(merged[key] - w_ft[key].double()))
        assert err <= 1.01 * optimal_error(delta.T if "embed" in key else delta, 8) + 1e-12
    assert res.filtered > 0


def test_gpt2_conv1d_is_fan_in_fan_out(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"],
                                                fan_in_fan_out=True))
    randomize_lora(pm)
    ft = pm.merge_and_unload()
    ft.save_pretrained(tmp_path / "ft")
    out = tmp_path / "lora"
    res = extract_to_file(tmp_path / "ft", tmp_path / "base", out, rank=3)
    assert {m.path.rsplit(".", 1)[1] for m in res.modules} == {"c_attn", "c_fc"}
    assert all(m.rel_error < 1e-5 for m in res.modules)
    merged = PeftModel.from_pretrained(tiny_gpt2(), str(out)).merge_and_unload().state_dict()
    for key, value in ft.state_dict().items():
        if key.endswith("c_attn.weight") or key.endswith("c_fc.weight"):
            assert torch.allclose(merged[key], value, atol=1e-5)


# ----------------------------------------------------------------------------- conv (diffusers U-Net)
def test_unet_conv_modules_merge_back_through_peft(tmp_path):
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from tiny_models import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "base" / "unet")
    pm = get_peft_model(tiny_unet(), LoraConfig(r=4, lora_alpha=4, target_modules=["conv1", "conv_in", "to_q"]))
    randomize_lora(pm)
    ft = pm.merge_and_unload()
    ft.save_pretrained(tmp_path / "ft" / "unet")
    out = tmp_path / "lora"
    res = extract_to_file(tmp_path / "ft" / "unet", tmp_path / "base" / "unet", out, rank=4, to="peft",
                          dtype=torch.float64)
    assert {m.component for m in res.modules} == {"unet"}
    assert any(m.layer == "conv" and len(m.shape) == 4 and m.shape[2] == 3 for m in res.modules)
    # Oracle: PEFT's own layers, injected into the base U-Net, loaded and merged.
    cfg = LoraConfig.from_pretrained(str(out))
    model = inject_adapter_in_model(cfg, tiny_unet())
    sd = {k.removeprefix("base_model.model."): v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    set_peft_model_state_dict(model, sd)
    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
    merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    want = ft.state_dict()
    for m in res.modules:
        key = m.path + ".weight"
        assert torch.allclose(merged[key], want[key], atol=1e-5), key


# ----------------------------------------------------------------------------- options
def _pair_with(tmp_path, changes: dict[str, torch.Tensor]):
    base = _weights_of(tiny_llama())
    ft = {k: v.clone() for k, v in base.items()}
    for key, delta in changes.items():
        ft[key] = ft[key] + delta
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return tmp_path / "ft.safetensors", tmp_path / "base.safetensors"


def _weights_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def test_min_diff_include_exclude_and_reports(tmp_path):
    gen = torch.Generator().manual_seed(0)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    v, norm = "model.layers.1.self_attn.v_proj.weight", "model.norm.weight"
    ft, base = _pair_with(tmp_path, {
        q: torch.randn(32, 32, generator=gen), k: torch.full((16, 32), 1e-4), v: torch.randn(16, 32, generator=gen),
        norm: torch.ones(32),
    })
    res = extract(ft, base, rank=4, min_diff=1e-3)
    assert {m.path for m in res.modules} == {q[:-7], v[:-7]}
    assert res.unchanged == res.compared - 3  # q, v extracted; the norm reported
    assert [(s.name, s.max_abs_diff) for s in res.not_extracted] == [(norm, 1.0)]
    res = extract(ft, base, rank=4, include=r"layers\.0\.", exclude=r"k_proj")
    assert {m.path for m in res.modules} == {q[:-7]}
    assert res.filtered == len(_weights_of(tiny_llama())) - res.compared
    with pytest.raises(UsageError):
        extract(ft, base, include="(")


def test_dynamic_rank_rules_follow_the_known_spectrum(tmp_path):
    """A delta with a planted spectrum: each rule's rank is read off the spectrum by hand."""
    base = _weights_of(wide_llama())
    key = "model.layers.0.self_attn.q_proj.weight"
    gen = torch.Generator().manual_seed(1)
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5] + [0.05] * 40, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(288, 45, generator=gen, dtype=torch.float64))[0]
    w = torch.linalg.qr(torch.randn(288, 45, generator=gen, dtype=torch.float64))[0]
    ft = dict(base)
    ft[key] = (base[key].double() + (u * s) @ w.T).float()
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(ft, str(tmp_path / "f.safetensors"))
    f, b = tmp_path / "f.safetensors", tmp_path / "b.safetensors"

    def rank_for(**kw) -> int:
        res = extract(f, b, rank=16, include="q_proj", dtype=torch.float64, **kw)
        return res.modules[0].rank

    energy = (s.square().cumsum(0) / s.square().sum()).sqrt()
    assert rank_for(dynamic="sv_fro", param=0.995) == int((energy < 0.995).sum()) + 1 == 4
    assert rank_for(dynamic="sv_ratio", param=10.0) == 4  # σ ≥ 0.8: 8, 4, 2, 1
    cum = s.cumsum(0) / s.sum()
    assert rank_for(dynamic="sv_cumulative", param=0.885) == int((cum < 0.885).sum()) + 1 == 5
    assert rank_for(dynamic="sv_fro", param=1.0) == 16  # capped at --rank


def test_clamp_quantile_and_save_dtype(tmp_path):
    gen = torch.Generator().manual_seed(0)
    key = "model.layers.0.mlp.up_proj.weight"
    ft, base = _pair_with(tmp_path, {key: torch.randn(48, 32, generator=gen)})
    plain = extract(ft, base, rank=8).adapter.modules[("model", key[:-7])]
    res = extract(ft, base, rank=8, clamp_quantile=0.9, out_dtype=torch.float16)
    mod = res.adapter.modules[("model", key[:-7])]
    assert mod.tensors["up"].dtype == torch.float16
    both = torch.cat([plain.tensors["up"].flatten(), plain.tensors["down"].flatten()]).abs()
    hi = float(torch.quantile(both, 0.9))
    assert float(mod.tensors["up"].abs().max()) <= hi * 1.001
    assert float(mod.tensors["down"].abs().max()) <= hi * 1.001
    assert res.modules[0].rel_error > extract(ft, base, rank=8).modules[0].rel_error


# ----------------------------------------------------------------------------- CLI
def test_cli_json_contract_and_errors(lora_pair, tmp_path, capsys):
    d, deltas = lora_pair
    out = tmp_path / "lora"
    assert main(["extract", str(d / "ft"), str(d / "base"), "-o", str(out), "--rank", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "peft" and data["extracted"] == len(deltas)
    assert {m["path"] for m in data["modules"]} == set(deltas)
    assert all(m["captured"] > 0.999999 and m["rank"] == 4 for m in data["modules"])
    assert (out / "adapter_config.json").is_file()
    # an existing output, a mismatched pair and bad options: one line, exit 2, nothing written
    assert main(["extract", str(d / "ft"), str(d / "base"), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert main(["extract", str(tmp_path / "gpt2"), str(d / "base"), "-o", str(tmp_path / "x")]) == 2
    assert "share no weights" in capsys.readouterr().err
    assert main(["extract", str(d / "ft"), str(d / "base"), "-o", str(tmp_path / "y"), "--to", "lycoris"]) == 2
    assert main(["extract", str(d / "ft"), str(d / "base"), "-o", str(tmp_path / "y"), "--dynamic", "sv_fro"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(MatchError):
        extract(tmp_path / "gpt2", d / "base")
