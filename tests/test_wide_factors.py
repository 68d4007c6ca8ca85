"""Wide factors (a LoHa's r₁·r₂ Khatri–Rao factors, 144–256 wide): the Gram–eigen route of
``factor_svd`` and the face-splitting Grams, against independent float64 oracles.

Oracles: numpy's dense SVD of ΔW (never the factor routes under test), LyCORIS' own functional LoHa
ΔW, and Gram matrices of the explicit face-splitting product formed by numpy (not the pair
formula of ``face_split_gram``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loratool.adapter import LoraModule
from loratool.ops import linalg
from loratool.ops.factor_form import form_svd, singular_values, to_factor_form
from loratool.ops.linalg import face_split_gram, factor_svd
from loratool.ops.rank_rules import RankRule
from loratool.ops.resize import resize_module


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _decaying(m: int, r: int, decades: float, seed: int) -> torch.Tensor:
    """[m, r] with orthonormal columns scaled 1 … 10^-decades (a spectrum that decays)."""
    q, _ = torch.linalg.qr(_rand(m, r, seed=seed))
    return q * torch.logspace(0, -decades, r, dtype=torch.float64)


def _khatri_rao(a1, a2, b1, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """up[o, (p, p')] = a1[o, p]·a2[o, p'], down[(p, p'), j] = b1[p, j]·b2[p', j], by numpy loops over p."""
    a1, a2, b1, b2 = (t.numpy() for t in (a1, a2, b1, b2))
    up = np.concatenate([a1[:, p:p + 1] * a2 for p in range(a1.shape[1])], axis=1)
    down = np.concatenate([b1[p:p + 1] * b2 for p in range(b1.shape[0])], axis=0)
    return torch.from_numpy(up), torch.from_numpy(down)


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class _Calls:
    """Counts torch.linalg.svd / eigh calls (which route factor_svd took)."""

    def __init__(self, monkeypatch):
        self.svd = self.eigh = 0
        svd, eigh = torch.linalg.svd, torch.linalg.eigh

        def counted_svd(*a, **k):
            self.svd += 1
            return svd(*a, **k)

        def counted_eigh(*a, **k):
            self.eigh += 1
            return eigh(*a, **k)

        monkeypatch.setattr(torch.linalg, "svd", counted_svd)
        monkeypatch.setattr(torch.linalg, "eigh", counted_eigh)


@pytest.mark.parametrize("m,r1,r2", [(50, 3, 5), (40, 1, 4), (7, 6, 6)])
def test_face_split_gram_is_the_gram_of_the_explicit_product(m, r1, r2):
    a1, a2 = _rand(m, r1, seed=1), _rand(m, r2, seed=2)
    b1, b2 = _rand(r1, m + 3, seed=3), _rand(r2, m + 3, seed=4)
    up, down = _khatri_rao(a1, a2, b1, b2)
    want_u, want_d = up.numpy().T @ up.numpy(), down.numpy() @ down.numpy().T
    np.testing.assert_allclose(face_split_gram(a1, a2).numpy(), want_u, rtol=0, atol=1e-12 * np.abs(want_u).max())
    np.testing.assert_allclose(face_split_gram(b1.T, b2.T).numpy(), want_d, rtol=0, atol=1e-12 * np.abs(want_d).max())


@pytest.mark.parametrize("scale", [0.37, -1.3])
@pytest.mark.parametrize("how", ["rank", "choose"])
def test_wide_factors_take_the_eigen_route_and_match_a_dense_svd(monkeypatch, scale, how):
    a1, a2, b1, b2 = _rand(300, 12, seed=5), _rand(300, 12, seed=6), _rand(12, 260, seed=7), _rand(12, 260, seed=8)
    up, down = _khatri_rao(a1, a2, b1, b2)  # 144 wide ≥ EIGH_MIN_RANK
    delta = scale * up.numpy() @ down.numpy()
    u_ref, s_ref, vh_ref = np.linalg.svd(delta, full_matrices=False)
    seen = []
    calls = _Calls(monkeypatch)
    if how == "rank":
        svd = factor_svd(up, down, scale, rank=20)
    else:
        svd = factor_svd(up, down, scale, choose=lambda s: seen.append(s) or 20)
        np.testing.assert_allclose(seen[0].numpy(), s_ref[:144], rtol=1e-11, atol=1e-12 * s_ref[0])
    assert (calls.eigh, calls.svd) == (1, 0) and len(seen) == (how == "choose")
    k = 20
    assert svd.rank == k
    np.testing.assert_allclose(svd.S.numpy(), s_ref[:k], rtol=1e-11)
    eye = np.eye(k)
    np.testing.assert_allclose(svd.U.numpy().T @ svd.U.numpy(), eye, atol=1e-10)
    np.testing.assert_allclose(svd.Vh.numpy() @ svd.Vh.numpy().T, eye, atol=1e-10)
    best = (u_ref[:, :k] * s_ref[:k]) @ vh_ref[:k]
    assert _rel((svd.U * svd.S).numpy() @ svd.Vh.numpy(), best) < 1e-11
    assert svd.energy == pytest.approx(float(np.sum(s_ref ** 2)), rel=1e-12)


def test_the_eigen_route_falls_back_to_the_core_svd_where_small_singular_values_matter(monkeypatch):
    # factors whose spectra span 10², so ΔW's span ~10⁸: σ₀/σ₁₄₃ far past EIGH_MIN_RATIO.
    a1, a2 = _decaying(300, 12, 2, seed=9), _decaying(300, 12, 2, seed=10)
    b1, b2 = _decaying(260, 12, 2, seed=11).T, _decaying(260, 12, 2, seed=12).T
    up, down = _khatri_rao(a1, a2, b1, b2)
    delta = up.numpy() @ down.numpy()
    s_ref = np.linalg.svd(delta, compute_uv=False)
    assert s_ref[143] ** 2 < linalg.EIGH_MIN_RATIO * s_ref[0] ** 2 < s_ref[4] ** 2
    for how, k, route in (("rank", 4, (1, 0)), ("rank", 143, (1, 1)), ("choose", 4, (1, 1))):
        calls = _Calls(monkeypatch)
        seen = []
        if how == "rank":
            svd = factor_svd(up, down, 1.0, rank=k)
        else:
            svd = factor_svd(up, down, 1.0, choose=lambda s, seen=seen, k=k: seen.append(s) or k)
            assert len(seen) == 1  # choose sees only the spectrum of the route that was kept
            np.testing.assert_allclose(seen[0].numpy(), s_ref[:144], rtol=1e-9, atol=1e-13 * s_ref[0])
        assert (calls.eigh, calls.svd) == route, (how, k)
        np.testing.assert_allclose(svd.S.numpy(), s_ref[:k], rtol=1e-9, atol=1e-13 * s_ref[0])
        np.testing.assert_allclose(svd.Vh.numpy() @ svd.Vh.numpy().T, np.eye(k), atol=1e-10)
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        best_err = float(np.sqrt(np.sum(s[k:] ** 2)))
        err = float(np.linalg.norm((svd.U * svd.S).numpy() @ svd.Vh.numpy() - delta))
        assert err <= best_err * (1 + 1e-6) + 1e-12 * s[0]


def _wide_loha(seed: int, decades: float | None = None) -> LoraModule:
    dims, out_f, in_f = 12, 200, 180
    if decades is None:
        t = {"w1a": _rand(out_f, dims, seed=seed), "w1b": _rand(dims, in_f, seed=seed + 1),
             "w2a": _rand(out_f, dims, seed=seed + 2), "w2b": _rand(dims, in_f, seed=seed + 3)}
    else:
        t = {"w1a": _decaying(out_f, dims, decades, seed), "w1b": _decaying(in_f, dims, decades, seed + 1).T,
             "w2a": _decaying(out_f, dims, decades, seed + 2), "w2b": _decaying(in_f, dims, decades, seed + 3).T}
    return LoraModule("unet", f"wide{seed}", kind="loha", alpha=6.0, tensors=t)


def _lycoris_delta(module: LoraModule) -> np.ndarray:
    from lycoris.functional import loha as ly_loha

    t = module.tensors
    return ly_loha._diff_weight(t["w1b"], t["w1a"], t["w2b"], t["w2a"], None, None, module.scale).numpy()


@pytest.mark.parametrize("decades", [None, 1.0])
def test_wide_loha_form_uses_its_khatri_rao_grams_and_resizes_exactly(monkeypatch, decades):
    module = _wide_loha(20, decades)
    mat = _lycoris_delta(module)
    s_ref = np.linalg.svd(mat, compute_uv=False)
    form = to_factor_form(module, dtype=torch.float64)
    assert form.khatri_rao is not None and form.rank == 144
    grams = []
    gram = linalg.face_split_gram
    monkeypatch.setattr("loratool.ops.factor_form.face_split_gram", lambda a, b: grams.append(1) or gram(a, b))
    svd = form_svd(form, rank=8)
    assert len(grams) == 2
    np.testing.assert_allclose(svd.S.numpy(), s_ref[:8], rtol=1e-11)
    s = singular_values(form, dtype=torch.float64).numpy()
    np.testing.assert_allclose(s, s_ref[:144], rtol=1e-9, atol=1e-12 * s_ref[0])
    for rule in (None, RankRule("sv_fro", 0.9), RankRule("sv_ratio", 3.0)):
        out, report = resize_module(module, 40, rule)
        k = report.rank_out
        if rule is None:
            assert k == 40
        got = (out.scale * out.tensors["up"] @ out.tensors["down"]).numpy()
        err, best = float(np.linalg.norm(got - mat)), float(np.sqrt(np.sum(s_ref[k:] ** 2)))
        assert err <= best * (1 + 1e-6) + 1e-12 * s_ref[0], (rule, k, err, best)
        assert report.fro_kept == pytest.approx(float(np.sqrt(np.sum(s_ref[:k] ** 2)) / np.linalg.norm(mat)), rel=1e-9)
        assert report.norm == pytest.approx(float(np.linalg.norm(mat)), rel=1e-12)


def test_wide_factors_with_a_zero_scale_give_a_zero_spectrum():
    up, down = _khatri_rao(_rand(300, 12, seed=30), _rand(300, 12, seed=31), _rand(12, 260, seed=32),
                           _rand(12, 260, seed=33))
    svd = factor_svd(up, down, 0.0, rank=5)
    assert svd.rank == 5 and torch.isfinite(svd.U).all() and torch.isfinite(svd.Vh).all()
    assert float(svd.S.abs().max()) == 0.0 and svd.energy == 0.0
