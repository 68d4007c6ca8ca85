"""The factor-SVD core, exact factor forms and rank rules, against independent float64 oracles.

Oracles: numpy's dense SVD of ΔW (never the QR path under test), the ``lycoris`` package's own
functional ΔW code for LoHa / LoKr, and brute-force rank rules written straight from their
definitions (one candidate k at a time, no cumulative sums).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.adapter import LoraModule
from loratool.delta import delta_weight
from loratool.errors import UsageError
from loratool.ops.factor_form import to_factor_form, to_module, transposed
from loratool.ops.linalg import dense_svd, factor_svd, numerical_rank, split_factors, stacked_factor_svd
from loratool.ops.rank_rules import RankRule, select_rank

TOL = 1e-5


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _np_truncated(delta: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("m,n,r", [(40, 30, 8), (7, 50, 12), (64, 5, 9), (33, 33, 33)])
def test_factor_svd_matches_dense_numpy_svd(m, n, r):
    up, down = _rand(m, r, seed=1), _rand(r, n, seed=2)
    scale = 0.37
    delta = (scale * up.numpy() @ down.numpy())
    svd = factor_svd(up, down, scale)
    s_ref = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(svd.S.numpy(), s_ref[: svd.rank], rtol=1e-9, atol=1e-12 * s_ref[0])
    assert _rel((svd.U * svd.S) @ svd.Vh, delta) < 1e-12
    for k in (1, min(m, n, r) // 2 or 1):
        approx = svd.truncate(k)
        assert _rel((approx.U * approx.S) @ approx.Vh, _np_truncated(delta, k)) < TOL
    # U and V have orthonormal columns: it is a true SVD, not just a factorisation.
    eye = torch.eye(svd.rank, dtype=torch.float64)
    assert torch.allclose(svd.U.T @ svd.U, eye, atol=1e-10)
    assert torch.allclose(svd.Vh @ svd.Vh.T, eye, atol=1e-10)


def test_factor_svd_in_float32_meets_the_tolerance():
    up, down = _rand(1280, 64, seed=3, dtype=torch.float32), _rand(64, 640, seed=4, dtype=torch.float32)
    delta = up.double().numpy() @ down.double().numpy()
    svd = factor_svd(up, down, 1.0, rank=16, dtype=torch.float32)
    assert svd.U.dtype == torch.float32
    assert _rel(((svd.U * svd.S) @ svd.Vh).double(), _np_truncated(delta, 16)) < TOL


def test_negative_scale_is_kept_in_the_singular_vectors():
    up, down = _rand(10, 3, seed=5), _rand(3, 12, seed=6)
    svd = factor_svd(up, down, -2.0)
    assert (svd.S >= 0).all()
    assert _rel((svd.U * svd.S) @ svd.Vh, -2.0 * up.numpy() @ down.numpy()) < 1e-12


def test_stacked_factor_svd_is_the_svd_of_the_weighted_sum():
    ups = [_rand(30, 4, seed=7), _rand(30, 6, seed=8)]
    downs = [_rand(4, 20, seed=9), _rand(6, 20, seed=10)]
    scales = [0.5, -1.5]
    total = sum(s * u.numpy() @ d.numpy() for u, d, s in zip(ups, downs, scales))
    svd = stacked_factor_svd(ups, downs, scales, rank=5)
    assert _rel((svd.U * svd.S) @ svd.Vh, _np_truncated(total, 5)) < TOL


def test_split_factors_keeps_the_product_and_balances_the_sides():
    up, down = _rand(20, 5, seed=11), _rand(5, 15, seed=12)
    svd = factor_svd(up, down, 1.0)
    new_up, new_down = split_factors(svd, 0.25)
    assert _rel(0.25 * (new_up @ new_down).numpy(), up.numpy() @ down.numpy()) < 1e-12
    # kohya's convention: √σ on each side, so the column norms of up equal the row norms of down.
    assert torch.allclose(new_up.norm(dim=0), new_down.norm(dim=1), rtol=1e-10)


def test_numerical_rank_of_an_exactly_low_rank_dense_matrix():
    a = _rand(40, 3, seed=13).numpy() @ _rand(3, 25, seed=14).numpy()
    svd = dense_svd(torch.from_numpy(a))
    assert numerical_rank(svd, a.shape) == 3


# ---------------------------------------------------------------- rank rules


def _brute(s: list[float], method: str, p: float) -> int:
    """Straight from the definitions, one candidate k at a time."""
    n = len(s)
    if method == "sv_ratio":
        return sum(1 for x in s if x >= s[0] / p)
    for k in range(1, n + 1):
        if method == "sv_fro":
            val = math.sqrt(math.fsum(x * x for x in s[:k]) / math.fsum(x * x for x in s))
        else:
            val = math.fsum(s[:k]) / math.fsum(s)
        if val >= p:
            return k
    return n


def test_rank_rules_on_exact_boundaries():
    # sv_fro: √(1/4) = 0.5 exactly, so P = 0.5 keeps one value (not two).
    assert select_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 10, RankRule("sv_fro", 0.5)) == 1
    # sv_cumulative: 3 / 4 = 0.75 exactly.
    assert select_rank(torch.tensor([3.0, 1.0]), 10, RankRule("sv_cumulative", 0.75)) == 1
    assert select_rank(torch.tensor([3.0, 1.0]), 10, RankRule("sv_cumulative", 0.7500001)) == 2
    # sv_ratio keeps σ ≥ σ₀ / P: the value equal to the threshold stays.
    assert select_rank(torch.tensor([8.0, 4.0, 2.0, 1.0]), 10, RankRule("sv_ratio", 4.0)) == 3
    # capped at the maximum rank, and at least one value.
    assert select_rank(torch.tensor([8.0, 4.0, 2.0, 1.0]), 2, RankRule("sv_ratio", 100.0)) == 2
    assert select_rank(torch.zeros(4), 3, RankRule("sv_fro", 0.9)) == 1
    assert select_rank(torch.tensor([5.0, 4.0, 3.0]), 2) == 2
    assert select_rank(torch.tensor([5.0, 4.0, 3.0]), 9) == 3


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=24),
    method=st.sampled_from(["sv_fro", "sv_cumulative", "sv_ratio"]),
    frac=st.floats(min_value=0.01, max_value=1.0),
    cap=st.integers(min_value=1, max_value=30),
)
def test_rank_rules_match_their_definitions(values, method, frac, cap):
    s = sorted(values, reverse=True)
    p = 1.0 + 99.0 * frac if method == "sv_ratio" else frac
    want = max(1, min(_brute(s, method, p), cap, len(s)))
    assert select_rank(torch.tensor(s, dtype=torch.float64), cap, RankRule(method, p)) == want


@pytest.mark.parametrize("method,param", [("sv_fro", 0.0), ("sv_fro", 1.5), ("sv_cumulative", -1), ("sv_ratio", 0.5),
                                          ("sv_top", 0.5), ("sv_fro", None), (None, 0.5)])
def test_bad_rank_rules_are_usage_errors(method, param):
    with pytest.raises(UsageError):
        RankRule(method, param)


# ---------------------------------------------------------------- exact factor forms


def _modules() -> list[LoraModule]:
    mods = [
        LoraModule("unet", "lin", tensors={"down": _rand(4, 12, seed=20), "up": _rand(10, 4, seed=21)}, alpha=2.0),
        LoraModule("unet", "conv", layer="conv", alpha=3.0,
                   tensors={"down": _rand(4, 6, 3, 3, seed=22), "up": _rand(8, 4, 1, 1, seed=23)}),
        LoraModule("unet", "tucker", layer="conv", alpha=1.0,
                   tensors={"down": _rand(3, 6, 1, 1, seed=24), "up": _rand(8, 3, 1, 1, seed=25),
                            "mid": _rand(3, 3, 3, 3, seed=26)}),
        LoraModule("model", "emb", layer="embedding", alpha=8.0,
                   tensors={"down": _rand(4, 50, seed=27), "up": _rand(16, 4, seed=28)}),
        LoraModule("model", "c_attn", fan_in_fan_out=True, rslora=True, alpha=4.0,
                   tensors={"down": _rand(4, 16, seed=29), "up": _rand(48, 4, seed=30)}),
        LoraModule("unet", "loha", kind="loha", alpha=2.0,
                   tensors={"w1a": _rand(40, 2, seed=31), "w1b": _rand(2, 36, seed=32),
                            "w2a": _rand(40, 3, seed=33), "w2b": _rand(3, 36, seed=34)}),
        LoraModule("unet", "loha_tucker", kind="loha", layer="conv", alpha=2.0,
                   tensors={"w1a": _rand(30, 2, seed=35), "w1b": _rand(2, 20, seed=36),
                            "t1": _rand(2, 2, 3, 3, seed=37), "w2a": _rand(30, 2, seed=38),
                            "w2b": _rand(2, 20, seed=39), "t2": _rand(2, 2, 3, 3, seed=40)}),
        LoraModule("unet", "lokr", kind="lokr", alpha=3.0,
                   tensors={"w1": _rand(4, 8, seed=41), "w2a": _rand(12, 3, seed=42), "w2b": _rand(3, 10, seed=43)}),
        LoraModule("unet", "lokr_conv", kind="lokr", layer="conv",
                   tensors={"w1": _rand(2, 2, seed=44), "w2": _rand(8, 6, 3, 3, seed=45)}),
        LoraModule("unet", "lokr_tucker", kind="lokr", layer="conv", alpha=2.0,
                   tensors={"w1": _rand(2, 4, seed=46), "w2a": _rand(10, 2, seed=47), "w2b": _rand(2, 6, seed=48),
                            "t2": _rand(2, 2, 3, 3, seed=49)}),
        LoraModule("unet", "full", kind="full", tensors={"diff": _rand(9, 7, seed=50)}),
        LoraModule("unet", "loha_big", kind="loha", alpha=1.0,
                   tensors={"w1a": _rand(6, 4, seed=51), "w1b": _rand(4, 6, seed=52),
                            "w2a": _rand(6, 4, seed=53), "w2b": _rand(4, 6, seed=54)}),
    ]
    return mods


@pytest.mark.parametrize("module", _modules(), ids=lambda m: m.path)
def test_factor_form_agrees_with_delta_weight(module):
    form = to_factor_form(module, dtype=torch.float64)
    delta = delta_weight(module, dtype=torch.float64)
    want = delta.T if transposed(module) else delta.reshape(delta.shape[0], -1)
    assert form.shape == tuple(want.shape)
    assert _rel(form.matrix(), want) < 1e-12
    if module.kind == "lora" or module.path == "loha":
        assert not form.is_dense and not form.is_kron  # products with a small exact factor form never go dense
    if module.kind == "lokr":  # kept as kron(W₁, W₂), whatever its rank
        assert form.is_kron
    if module.path in ("full", "loha_big"):  # product rank reaches min(out, in·k·k)
        assert form.is_dense


def test_factor_forms_agree_with_lycoris_functional_code():
    from lycoris.functional import loha as ly_loha
    from lycoris.functional import lokr as ly_lokr

    loha = _modules()[5]
    t = loha.tensors
    want = ly_loha._diff_weight(t["w1b"], t["w1a"], t["w2b"], t["w2a"], None, None, loha.scale)
    assert _rel(to_factor_form(loha, dtype=torch.float64).matrix(), want) < 1e-12

    lokr = _modules()[7]
    t = lokr.tensors
    want = ly_lokr.diff_weight(t["w1"], None, None, None, t["w2a"], t["w2b"], None, gamma=lokr.alpha, backend="torch")
    assert _rel(to_factor_form(lokr, dtype=torch.float64).matrix(), want) < 1e-12


@pytest.mark.parametrize("module", _modules()[:5], ids=lambda m: m.path)
def test_to_module_round_trips_through_delta_weight(module):
    form = to_factor_form(module, dtype=torch.float64)
    svd = factor_svd(form.up, form.down, form.scale)
    up, down = split_factors(svd, 0.5)
    out = to_module(module, form.weight_shape, up, down, scale=0.5, rslora=module.rslora, dtype=torch.float64)
    assert out.scale == pytest.approx(0.5)
    assert out.layer == module.layer and out.fan_in_fan_out == module.fan_in_fan_out
    assert tuple(out.weight_shape) == tuple(delta_weight(module).shape)
    assert _rel(delta_weight(out, dtype=torch.float64), delta_weight(module, dtype=torch.float64)) < 1e-12


def test_rank_deficient_factors_take_the_qr_route_and_stay_exact():
    # Duplicate columns make the Gram matrix singular: the Householder QR route must take over.
    up = _rand(50, 6, seed=15)
    up[:, 3] = up[:, 0]
    up[:, 5] = 2 * up[:, 1]
    down = _rand(6, 40, seed=16)
    delta = up.numpy() @ down.numpy()
    for k in (2, 4):
        svd = factor_svd(up, down, 1.0, rank=k)
        assert _rel((svd.U * svd.S) @ svd.Vh, _np_truncated(delta, k)) < TOL
    chosen = factor_svd(up, down, 1.0, choose=lambda s: 3)
    assert chosen.rank == 3 and chosen.fro_kept(3) == pytest.approx(
        math.sqrt(sum(np.linalg.svd(delta, compute_uv=False)[:3] ** 2) / np.linalg.norm(delta) ** 2))
