"""LoKr / LoHa / Tucker modules at factor cost: their SVDs come from their structure, never from a
dense ΔW (Kronecker: the SVD of kron(W₁, W₂) is the Kronecker product of the factors' SVDs; LoHa:
the Khatri–Rao factors of a Hadamard product; Tucker: the core folded into down).

Oracle: the ΔW LyCORIS 4.1.3's own modules add in their forward (``get_weight`` / ``make_weight``,
float64), and numpy's dense SVD of it. A resized module's error must be the Eckart–Young optimum:
‖ΔM − ΔM_k‖ ≤ optimal · (1 + 1e-6).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_format_lycoris import _by_lycoris_name, _network, _oracle_delta, _save_and_read
from tiny_models import tiny_unet

import loratool
from loratool.adapter import LoraModule
from loratool.ops import linalg
from loratool.ops.factor_form import explicit_factors, form_svd, singular_values, to_factor_form
from loratool.ops.inspect import module_stats
from loratool.ops.linalg import LowRankSVD, dense_svd, factor_svd, kron_svd
from loratool.ops.resize import resize, resize_module
from loratool.ops.stack import stack

NETWORKS = {
    "lokr_w1_whole": ("lokr", dict(factor=4)),
    "lokr_both_factorised": ("lokr", dict(factor=8, decompose_both=True, dim=1)),
    "lokr_full_matrix": ("lokr", dict(factor=4, full_matrix=True)),
    "lokr_tucker_conv": ("lokr", dict(factor=4, use_tucker=True, dim=2)),
    "loha": ("loha", dict(dim=2)),
    "loha_tucker": ("loha", dict(dim=2, use_tucker=True)),
    "locon_tucker": ("locon", dict(use_tucker=True)),
}


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """{name: [(loratool module, LyCORIS ΔW in float64 shaped like the weight)]}, read from files LyCORIS wrote."""
    unet = tiny_unet()
    out = {}
    for name, (algo, kw) in NETWORKS.items():
        kw = dict(kw)
        net = _network(copy.deepcopy(unet), algo, conv_dim=kw.get("dim", 4), conv_alpha=1.0, **kw)
        adapter, _ = _save_and_read(net, tmp_path_factory.mktemp(name))
        ours = _by_lycoris_name(adapter)
        for m in ours.values():  # float64 outputs too: the comparison is of maths, not of a float32 cast
            m.tensors = {k: v.double() for k, v in m.tensors.items()}
        pairs = [(ours[m.lora_name], _oracle_delta(m).reshape(tuple(m.org_module[0].weight.shape)))
                 for m in net.loras]
        out[name] = _some(pairs)
    return out


def _some(pairs: list, per_kind: int = 4) -> list:
    """A few linear, 1×1 and k×k modules of a network (all 121 would cost the suite minutes)."""
    groups: dict[str, list] = {}
    for module, delta in pairs:
        kind = "linear" if delta.dim() == 2 else "1x1" if delta.shape[2:].numel() == 1 else "kxk"
        groups.setdefault(kind, []).append((module, delta))
    return [p for group in groups.values() for p in group[:: max(1, len(group) // per_kind)][:per_kind]]


def _matrix(delta: torch.Tensor) -> np.ndarray:
    return delta.reshape(delta.shape[0], -1).numpy()


def _optimal(mat: np.ndarray, k: int) -> float:
    s = np.linalg.svd(mat, compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2)))


@pytest.mark.parametrize("name", list(NETWORKS))
def test_spectrum_and_resize_are_exact_against_lycoris(networks, name):
    kinds = set()
    for module, delta in networks[name]:
        mat = _matrix(delta)
        s_ref = np.linalg.svd(mat, compute_uv=False)
        form = to_factor_form(module, dtype=torch.float64)
        kinds.add("kron" if form.is_kron else "dense" if form.is_dense else "factor")
        s = singular_values(form, dtype=torch.float64).numpy()
        n = min(len(s), len(s_ref))
        np.testing.assert_allclose(s[:n], s_ref[:n], rtol=1e-11, atol=1e-12 * s_ref[0])  # measured ≤ 6e-13
        assert np.all(s[n:] <= 1e-12 * s_ref[0]) and np.all(s_ref[n:] <= 1e-12 * s_ref[0])
        stats = module_stats(module)
        assert stats.norm == pytest.approx(float(np.linalg.norm(mat)), rel=1e-12)
        assert stats.sigma_max == pytest.approx(float(s_ref[0]), rel=1e-12)
        for k in (1, 3):
            out, report = resize_module(module, k)
            # compared as [out, in·k·k] matrices, whatever layer the reader typed a conv product as
            got = _matrix(loratool.delta.delta_weight(out, dtype=torch.float64))
            err, best = float(np.linalg.norm(got - mat)), _optimal(mat, k)
            assert err <= best * (1 + 1e-6) + 1e-12 * s_ref[0], (module.path, k, err, best)
            assert report.fro_kept == pytest.approx(float(np.sqrt(np.sum(s_ref[:k] ** 2)) / np.linalg.norm(mat)),
                                                    rel=1e-9)
    if name.startswith("lokr"):
        assert kinds == {"kron"}
    elif name == "loha":
        assert "factor" in kinds


def test_kron_svd_is_the_svd_of_the_kronecker_product():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    bu = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    bd = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    scale = -0.7
    full = scale * np.kron(a.numpy(), bu.numpy() @ bd.numpy())
    u_ref, s_ref, vh_ref = np.linalg.svd(full, full_matrices=False)
    svd = kron_svd(dense_svd(a), factor_svd(bu, bd), scale)
    np.testing.assert_allclose(svd.S.numpy(), s_ref[: svd.rank], rtol=1e-12, atol=1e-13 * s_ref[0])
    assert svd.energy == pytest.approx(float(np.sum(full ** 2)), rel=1e-12)
    np.testing.assert_allclose((svd.U.T @ svd.U).numpy(), np.eye(svd.rank), atol=1e-12)
    np.testing.assert_allclose((svd.Vh @ svd.Vh.T).numpy(), np.eye(svd.rank), atol=1e-12)
    np.testing.assert_allclose(((svd.U * svd.S) @ svd.Vh).numpy(), full, atol=1e-12 * s_ref[0])
    for k in (1, 4, 9):
        t = kron_svd(dense_svd(a), factor_svd(bu, bd), scale, rank=k)
        err = np.linalg.norm(((t.U * t.S) @ t.Vh).numpy() - full)
        assert err <= np.sqrt(np.sum(s_ref[k:] ** 2)) * (1 + 1e-9) + 1e-12


def _sdxl_sized_lokr() -> LoraModule:
    """The LyCORIS LoKr shape of a 1280×1280 SDXL attention projection (factor -1: 1280 = 32·40;
    w1 whole [32, 32], w2 = w2a [40, 16] @ w2b [16, 40]): rank(ΔW) up to 32·16 = 512."""
    gen = torch.Generator().manual_seed(3)
    return LoraModule("unet", "attn.to_q", kind="lokr", alpha=8.0, tensors={
        "w1": torch.randn(32, 32, generator=gen), "w2a": torch.randn(40, 16, generator=gen),
        "w2b": torch.randn(16, 40, generator=gen)})


def test_an_sdxl_sized_lokr_never_meets_a_dense_svd(monkeypatch):
    seen: list[tuple[int, ...]] = []
    real_svd, real_svdvals = torch.linalg.svd, torch.linalg.svdvals

    def svd(a, *args, **kw):
        seen.append(tuple(a.shape))
        return real_svd(a, *args, **kw)

    def svdvals(a, *args, **kw):
        seen.append(tuple(a.shape))
        return real_svdvals(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(torch.linalg, "svdvals", svdvals)
    module = _sdxl_sized_lokr()
    out, report = resize_module(module, 16)
    module_stats(module)
    assert report.method == "kron" and out.rank == 16
    assert seen and max(max(s) for s in seen) <= 40  # the factors' SVDs only, never 1280 × 1280
    # ... and the result is still the optimum: the kept σ are the 16 largest products σᵢ(W₁)·σⱼ(W₂)
    s1 = np.linalg.svd(module.tensors["w1"].double().numpy(), compute_uv=False)
    w2 = (module.tensors["w2a"].double() @ module.tensors["w2b"].double()).numpy()
    s2 = np.linalg.svd(w2, compute_uv=False)
    want = np.sort(np.outer(s1, s2).ravel())[::-1] * module.scale
    assert report.fro_kept == pytest.approx(float(np.sqrt(np.sum(want[:16] ** 2) / np.sum(want ** 2))), rel=1e-9)


def test_stack_of_lokr_and_lora_is_exact(networks):
    # Linear layers only: how a reader types LoHa / LoKr convs stored flattened is another test's business
    lokr = [m for m, d in networks["lokr_w1_whole"] if d.dim() == 2]
    loha = [m for m, d in networks["loha"] if d.dim() == 2]
    a = loratool.Adapter()
    b = loratool.Adapter()
    for m in lokr:
        a.add(m)
    for m in loha:
        b.add(m)
    res = stack([a, b], [0.5, -1.25])
    deltas = {m.key: d for m, d in networks["lokr_w1_whole"]}
    deltas2 = {m.key: d for m, d in networks["loha"]}
    for key, m in res.adapter.modules.items():
        want = 0.5 * deltas.get(key, 0) - 1.25 * deltas2.get(key, 0)
        got = _matrix(loratool.delta.delta_weight(m, dtype=torch.float64))
        np.testing.assert_allclose(got, _matrix(want), rtol=0, atol=1e-5 * float(want.abs().max()))


def test_explicit_factors_are_exact_and_minimal(networks):
    for module, delta in networks["lokr_w1_whole"]:
        form = to_factor_form(module, dtype=torch.float64)
        up, down, s = explicit_factors(form)
        mat = _matrix(delta)
        np.testing.assert_allclose((s * up @ down).numpy(), mat, atol=1e-12 * np.abs(mat).max())
        assert up.shape[1] == np.linalg.matrix_rank(mat)


def test_form_svd_refuses_nonfinite_factors():
    module = _sdxl_sized_lokr()
    module.tensors["w1"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        form_svd(to_factor_form(module, dtype=torch.float64))
    adapter = loratool.Adapter()
    adapter.add(module)
    with pytest.raises(loratool.errors.NonFiniteError):
        resize(adapter, 4, device="cpu")


def test_low_rank_svd_energy_survives_truncation():
    svd = LowRankSVD(torch.eye(3, dtype=torch.float64), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64),
                     torch.eye(3, dtype=torch.float64))
    assert linalg.kron_svd(svd, svd, 2.0, rank=2).energy == pytest.approx(14.0 * 14.0 * 4.0)
