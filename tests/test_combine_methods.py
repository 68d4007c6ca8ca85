"""``stack --method ties|dare_ties|dare_linear|magnitude_prune``: the combined ΔW equals mergekit's own
``GeneralizedTaskArithmeticMerge`` on the dense ΔWs (float64, base = 0, the same torch seed for DARE's
masks), the factorization after it is optimal (≤ 1.01 × numpy's float64 SVD error) and reports the
error of the factors it wrote; ``--factor-space`` equals PEFT's ``add_weighted_adapter``.

Oracles: mergekit 0.1.5 (``mergekit.merge_methods.registry`` / ``GeneralizedTaskArithmeticMerge``),
PEFT 0.21 (``LoraModel.add_weighted_adapter``), numpy's SVD. mergekit's CPU DARE path rounds the
masked delta to float32 (``sparsify.bernoulli``), so DARE results agree to ~2e-7 (measured 1.5e-7)
while their masks agree exactly; TIES and magnitude agree to 1e-13.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.sparsify import SparsificationMethod
from safetensors.torch import save_file

from loratool.adapter import Adapter, LoraModule
from loratool.cli import main
from loratool.delta import delta_bias, delta_weight
from loratool.errors import UsageError
from loratool.ops.combine_methods import METHODS, CombineOptions, merge_deltas
from loratool.ops.rank_rules import RankRule
from loratool.ops.stack import stack

DARE_TOL = 1e-6
EXACT_TOL = 1e-12
WEIGHTS = [0.7, 1.2, -0.4]


def _rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mergekit(name: str):
    """The registered mergekit method; ``magnitude_prune`` (PEFT's name) is the same class with
    magnitude sparsification and neither sign election, normalize nor rescale."""
    if name == "magnitude_prune":
        return GeneralizedTaskArithmeticMerge(
            consensus_method=None, sparsification_method=SparsificationMethod.magnitude, default_normalize=False,
            default_rescale=False, method_name="magnitude_prune", method_pretty_name=None,
            method_reference_url=None)
    return registry.get(name)


def _mergekit_merge(name, deltas, weights, density, **params):
    group = TensorGroup.from_tensors([torch.zeros_like(deltas[0])] + list(deltas),
                                     ids=["base"] + list(range(len(deltas))), base_index=0)
    n = range(len(deltas))
    return _mergekit(name)([group], parameters={"weight": {i: weights[i] for i in n},
                                                "density": {i: density for i in n}, **params})[0]


def _inputs():
    """Three adapters: linear (ranks differ), conv k×k, embedding, GPT-2 Conv1D, a LoHa, a module only two
    inputs hold, and a PEFT lora_bias."""
    ads = []
    for a in range(3):
        ad = Adapter(source_format="kohya")
        s = 100 * a
        ad.add(LoraModule("unet", "lin", alpha=2.0 + a, tensors={"down": _rand(3 + a, 12, seed=s + 1),
                                                                 "up": _rand(10, 3 + a, seed=s + 2)}))
        ad.add(LoraModule("unet", "conv", layer="conv", alpha=4.0,
                          tensors={"down": _rand(4, 6, 3, 3, seed=s + 3), "up": _rand(8, 4, 1, 1, seed=s + 4)}))
        ad.add(LoraModule("unet", "emb", layer="embedding", alpha=2.0,
                          tensors={"down": _rand(2, 9, seed=s + 5), "up": _rand(7, 2, seed=s + 6)}))
        ad.add(LoraModule("unet", "c_attn", fan_in_fan_out=True, alpha=3.0,
                          tensors={"down": _rand(3, 8, seed=s + 7), "up": _rand(11, 3, seed=s + 8)}))
        ad.add(LoraModule("unet", "hada", kind="loha", alpha=2.0,
                          tensors={"w1a": _rand(9, 2, seed=s + 9), "w1b": _rand(2, 7, seed=s + 10),
                                   "w2a": _rand(9, 2, seed=s + 11), "w2b": _rand(2, 7, seed=s + 12)}))
        if a != 1:
            ad.add(LoraModule("unet", "some", alpha=1.0, tensors={"down": _rand(2, 5, seed=s + 13),
                                                                  "up": _rand(6, 2, seed=s + 14),
                                                                  "bias": _rand(6, seed=s + 15)}))
        ads.append(ad)
    return ads


def _dense(adapters, key):
    """Every input's ΔW of ``key`` (zero where the input lacks it), as mergekit would see them."""
    held = [ad.modules.get(key) for ad in adapters]
    shape = next(m for m in held if m is not None).weight_shape
    return [delta_weight(m, dtype=torch.float64) if m is not None else torch.zeros(shape, dtype=torch.float64)
            for m in held]


@pytest.mark.parametrize("method", list(METHODS))
def test_combined_delta_equals_mergekit_on_dense_deltas(method):
    ads = _inputs()
    density, seed = 0.5, 3
    res = stack(ads, WEIGHTS, method=method, rank=1000, device="cpu",
                options=CombineOptions(density=density, seed=seed))
    # mergekit consumes one torch stream for the whole run: the same modules in the same order
    torch.manual_seed(seed)
    tol = DARE_TOL if method.startswith("dare") else EXACT_TOL
    for key, out in res.adapter.modules.items():
        want = _mergekit_merge(method, _dense(ads, key), WEIGHTS, density)
        got = delta_weight(out, dtype=torch.float64)
        assert float((got - want).norm() / want.norm()) < tol, key
        if key == ("unet", "some"):  # the bias delta is a tensor of its own, next in the stream
            biases = [delta_bias(ad.modules[key], dtype=torch.float64) if key in ad.modules
                      else torch.zeros(6, dtype=torch.float64) for ad in ads]
            want_b = _mergekit_merge(method, biases, WEIGHTS, density)
            got_b = delta_bias(out, dtype=torch.float64)
            assert float((got_b - want_b).norm() / want_b.norm()) < tol
    report = {m.path: m for m in res.modules}
    assert report["lin"].error < 1e-9 * report["lin"].norm  # full rank kept: the factorization is exact


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_masks_are_mergekits_exactly(method):
    deltas = [_rand(40, 30, seed=i) for i in range(3)]
    gen = torch.Generator().manual_seed(11)
    ours = merge_deltas(deltas, WEIGHTS, METHODS[method], 0.3, "total", False, True, gen)
    torch.manual_seed(11)
    want = _mergekit_merge(method, deltas, WEIGHTS, 0.3)
    assert torch.equal(ours == 0, want == 0)
    assert float((ours - want).norm() / want.norm()) < DARE_TOL
    # another seed draws other masks
    other = merge_deltas(deltas, WEIGHTS, METHODS[method], 0.3, "total", False, True,
                         torch.Generator().manual_seed(12))
    assert not torch.equal(other == 0, ours == 0)


@pytest.mark.parametrize("majority,consensus", [("total", "sum"), ("frequency", "count")])
def test_ties_options_follow_mergekit(majority, consensus):
    deltas = [_rand(20, 16, seed=i + 5) for i in range(3)]
    gen = torch.Generator()
    for normalize in (True, False):
        ours = merge_deltas(deltas, WEIGHTS, METHODS["ties"], 0.4, majority, normalize, False, gen)
        mk = GeneralizedTaskArithmeticMerge(
            consensus_method=consensus, sparsification_method=SparsificationMethod.magnitude,
            default_normalize=normalize, default_rescale=False, method_name="t", method_pretty_name=None,
            method_reference_url=None)
        group = TensorGroup.from_tensors([torch.zeros_like(deltas[0])] + deltas, ids=["b", 0, 1, 2], base_index=0)
        want = mk([group], parameters={"weight": dict(enumerate(WEIGHTS)), "density": {0: 0.4, 1: 0.4, 2: 0.4}})[0]
        assert torch.allclose(ours, want, rtol=0, atol=1e-14)


def test_factorization_is_optimal_and_reports_the_written_error():
    """A 160×200 combined ΔW factored to rank 8 with the randomized solver: within 1 % of the
    float64 Eckart–Young error, and the reported error is that of the float32 factors written."""
    ads = []
    for a in range(2):
        ad = Adapter(source_format="kohya")
        ad.add(LoraModule("unet", "big", alpha=16.0, tensors={"down": _rand(16, 200, seed=a, dtype=torch.float32),
                                                              "up": _rand(160, 16, seed=a + 9, dtype=torch.float32)}))
        ads.append(ad)
    res = stack(ads, [1.0, 0.5], method="ties", rank=8, device="cpu", options=CombineOptions(density=0.6))
    rep = res.modules[0]
    assert rep.solver == "randomized" and rep.rank_out == 8
    torch.manual_seed(0)
    combined = _mergekit_merge("ties", _dense(ads, ("unet", "big")), [1.0, 0.5], 0.6).numpy()
    s = np.linalg.svd(combined, compute_uv=False)
    optimum = float(np.sqrt((s[8:] ** 2).sum()))
    out = res.adapter.modules[("unet", "big")]
    assert out.tensors["up"].dtype == torch.float32
    written = float(np.linalg.norm(delta_weight(out, dtype=torch.float64).numpy() - combined))
    assert written <= 1.01 * optimum
    assert rep.error == pytest.approx(written, rel=1e-6)
    assert rep.norm == pytest.approx(float(np.linalg.norm(combined)), rel=1e-12)


def test_dynamic_rank_rule():
    ads = _inputs()
    res = stack(ads, WEIGHTS, method="ties", device="cpu",
                options=CombineOptions(density=0.5, rule=RankRule("sv_fro", 0.9)))
    assert len({rep.rank_out for rep in res.modules}) > 1  # each module its own rank
    for rep in res.modules:
        assert rep.error <= np.sqrt(1 - 0.9 ** 2) * rep.norm * (1 + 1e-9)


@pytest.mark.parametrize("bad,match", [
    (dict(method="ties", rank=None, options=None), "needs --rank"),
    (dict(method="ties", rank=4, options=CombineOptions(density=1.5)), "--density"),
    (dict(method="ties", rank=4, options=CombineOptions(majority_sign="most")), "--majority-sign"),
    (dict(method="ties", rank=4, options=CombineOptions(factor_space=True)), "drop --rank"),
    (dict(method="concat", rank=None, options=CombineOptions()), "not to --method concat"),
])
def test_bad_options(bad, match):
    with pytest.raises(UsageError, match=match):
        stack(_inputs(), WEIGHTS, device="cpu", **bad)


def test_dora_is_refused():
    ads = _inputs()
    ads[0].modules[("unet", "lin")].magnitude = torch.ones(10, dtype=torch.float64)
    with pytest.raises(UsageError, match="DoRA"):
        stack(ads, WEIGHTS, method="ties", rank=4, device="cpu")


# ------------------------------------------------------------------ PEFT add_weighted_adapter
class _Tiny(torch.nn.Module):
    # Attributes in alphabetical order: PEFT walks named_modules, loratool the modules in file order.
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 10)
        self.b = torch.nn.Linear(10, 8)
        self.c = torch.nn.Conv2d(4, 6, 3)


@pytest.fixture(scope="module")
def peft_pair():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(_Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b", "c"]), adapter_name="x")
    pm.add_adapter("y", LoraConfig(r=4, lora_alpha=2, target_modules=["a", "b", "c"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_()
    adapters = []
    for adapter_name in ("x", "y"):
        ad = Adapter(source_format="peft")
        for path in ("a", "b", "c"):
            mod = pm.base_model.model.get_submodule(path)
            ad.add(LoraModule("model", path, layer="conv" if path == "c" else "linear",
                              alpha=float(mod.lora_alpha[adapter_name]),
                              tensors={"down": mod.lora_A[adapter_name].weight.detach().clone(),
                                       "up": mod.lora_B[adapter_name].weight.detach().clone()}))
        adapters.append(ad)
    return pm, adapters


@pytest.mark.parametrize("method", list(METHODS))
def test_factor_space_equals_peft_add_weighted_adapter(peft_pair, method, monkeypatch):
    from peft.tuners.lora.model import LoraModel

    pm, adapters = peft_pair
    weights, density, seed = [0.8, -0.5], 0.5, 11
    # add_weighted_adapter first initialises the new adapter (drawing from torch's RNG), then merges:
    # seed the RNG where the merge starts, which is where loratool's --seed stream starts.
    original = LoraModel._generalized_task_arithmetic_weighted_adapter
    first = [True]

    def seeded(self, *args, **kwargs):
        if first[0]:
            torch.manual_seed(seed)
            first[0] = False
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded)
    name = f"{method}_out"
    pm.add_weighted_adapter(["x", "y"], weights, name, combination_type=method, density=density)
    res = stack(adapters, weights, method=method, device="cpu",
                options=CombineOptions(density=density, seed=seed, factor_space=True))
    for path in ("a", "b", "c"):
        mod = pm.base_model.model.get_submodule(path)
        ours = res.adapter.modules[("model", path)]
        for slot, want in (("down", mod.lora_A[name].weight), ("up", mod.lora_B[name].weight)):
            want = want.detach().double()
            assert float((ours.tensors[slot].double() - want).norm() / want.norm()) < 1e-6, (path, slot)
        assert ours.scale == mod.scaling[name] == 1.0


def test_factor_space_needs_equal_ranks():
    with pytest.raises(UsageError, match="one rank"):
        stack(_inputs(), WEIGHTS, method="ties", device="cpu", options=CombineOptions(factor_space=True))


# ------------------------------------------------------------------ CLI
def _kohya(path, seed):
    tensors = {}
    for i, name in enumerate(("down_blocks_0_attentions_0_proj_in", "up_blocks_1_attentions_0_proj_out")):
        stem = f"lora_unet_{name}"
        tensors[f"{stem}.lora_down.weight"] = _rand(4, 32, seed=seed + i, dtype=torch.float32)
        tensors[f"{stem}.lora_up.weight"] = _rand(32, 4, seed=seed + 7 + i, dtype=torch.float32)
        tensors[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


def test_cli_reports_the_error_per_module(tmp_path, capsys):
    a, b = _kohya(tmp_path / "a.safetensors", 1), _kohya(tmp_path / "b.safetensors", 20)
    out = tmp_path / "out.safetensors"
    code = main(["stack", str(a), str(b), "-o", str(out), "--method", "dare_ties", "--density", "0.5",
                 "--rank", "3", "--seed", "5", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["combine"]["seed"] == 5 and doc["combine"]["rescale"] is True
    assert len(doc["modules"]) == 2
    for m in doc["modules"]:
        assert m["rank_out"] == 3 and 0 < m["rel_error"] < 1 and m["error"] > 0
    import loratool

    written = loratool.load(out)
    assert {m.rank for m in written} == {3}
    assert json.loads(written.metadata["loratool_stack"])["combine"]["density"] == 0.5


@pytest.mark.parametrize("args,message", [
    (["--method", "ties"], "needs --rank"),
    (["--method", "ties", "--rank", "2", "--density", "2"], "--density"),
    (["--method", "ties", "--factor-space", "--rank", "2"], "drop --rank"),
])
def test_cli_bad_options_exit_2(tmp_path, capsys, args, message):
    a, b = _kohya(tmp_path / "a.safetensors", 1), _kohya(tmp_path / "b.safetensors", 20)
    code = main(["stack", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_flattened_loha_combines_with_a_conv_lora():
    """LyCORIS stores a conv LoHa's product flattened ([out, in·k·k]); it combines with a conv LoRA of the
    same weight, and the output is a conv LoRA (density 1, magnitude_prune: the plain weighted sum)."""
    conv = Adapter()
    conv.add(LoraModule("unet", "c", layer="conv", alpha=4.0,
                        tensors={"down": _rand(4, 6, 3, 3, seed=1), "up": _rand(8, 4, 1, 1, seed=2)}))
    loha = Adapter()
    loha.add(LoraModule("unet", "c", kind="loha", alpha=2.0, tensors={
        "w1a": _rand(8, 2, seed=3), "w1b": _rand(2, 54, seed=4),
        "w2a": _rand(8, 2, seed=5), "w2b": _rand(2, 54, seed=6)}))
    res = stack([loha, conv], [1.0, 0.5], method="magnitude_prune", rank=100, device="cpu",
                options=CombineOptions(density=1.0))
    out = res.adapter.modules[("unet", "c")]
    want = 0.5 * delta_weight(conv.modules[("unet", "c")], dtype=torch.float64) + \
        delta_weight(loha.modules[("unet", "c")], dtype=torch.float64, shape=(8, 6, 3, 3))
    assert out.layer == "conv" and out.tensors["down"].shape == (8, 6, 3, 3)
    assert float((delta_weight(out, dtype=torch.float64) - want).norm() / want.norm()) < EXACT_TOL
