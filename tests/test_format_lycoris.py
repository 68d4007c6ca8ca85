"""LyCORIS files written by lycoris 4.1.3 itself, read by loratool, ΔW / merges compared in float64.

Oracle: each lycoris module's own rebuild (``get_weight`` / ``make_weight`` times its scale,
i.e. exactly what its ``forward`` adds to the base weight), the forward pass itself for a
Linear, ``get_merged_weight`` for DoRA, and the trained weight minus the original for ``full``.
lycoris 4.1.3's ``get_diff_weight`` (used by ``merge_to``) multiplies LoHa / LoKr by the scale
a second time, unlike its ``forward``; those cases compare against ``forward``'s ΔW.
"""

from __future__ import annotations

import copy

import lycoris
import pytest
import torch
from tiny_models import randomize_lora, tiny_clip_text, tiny_unet

import loratool
from loratool import formats
from loratool.delta import delta_weight, merge_weight
from loratool.formats.source import open_source


@pytest.fixture(scope="module")
def _unet_once():
    return tiny_unet()


@pytest.fixture
def unet(_unet_once):
    """A fresh copy per test (lycoris wraps the model's modules); building one is the slow part."""
    return copy.deepcopy(_unet_once)


def _network(model, algo: str, **kw):
    net = lycoris.create_lycoris(model, 1.0, linear_dim=kw.pop("dim", 4), linear_alpha=kw.pop("alpha", 2.0),
                                 algo=algo, **kw)
    net.apply_to()
    randomize_lora(net, seed=3, std=0.2)
    if algo == "full":
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for m in net.loras:
                m.weight.add_(torch.randn(m.weight.shape, generator=gen) * 0.1)
                if m.bias is not None:
                    m.bias.add_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return net


def _save_and_read(net, tmp_path, family="sd1"):
    path = tmp_path / "lyco.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    src = open_source(path)
    assert formats.detect(src) == "lycoris"
    return loratool.load(path, family=family), path


def _oracle_delta(m) -> torch.Tensor:
    """ΔW exactly as the lycoris module's forward adds it (scale applied once), in float64."""
    m.double()
    with torch.no_grad():
        if hasattr(m, "make_weight"):  # LoCon
            return (m.make_weight() * m.scale).double().reshape(m.shape)
        return m.get_weight(m.shape).double().reshape(m.shape)


def _by_lycoris_name(adapter):
    return {mod.hints["kohya_head"]: mod for mod in adapter}


def _compare_all(net, adapter, expected_kinds):
    mods = _by_lycoris_name(adapter)
    assert set(mods) == {m.lora_name for m in net.loras}
    kinds = set()
    for m in net.loras:
        ours = mods[m.lora_name]
        kinds.add(ours.kind)
        shape = tuple(m.org_module[0].weight.shape)
        got = delta_weight(ours, dtype=torch.float64, shape=shape)
        torch.testing.assert_close(got, _oracle_delta(net.loras[net.loras.index(m)]).double().reshape(shape),
                                   rtol=1e-9, atol=1e-9)
    assert kinds == expected_kinds


@pytest.mark.parametrize("tucker", [False, True])
def test_locon_matches_lycoris(tmp_path, tucker, unet):
    net = _network(unet, "locon", conv_dim=4, conv_alpha=1.0, use_tucker=tucker)
    adapter, _ = _save_and_read(net, tmp_path)
    _compare_all(net, adapter, {"lora"})
    has_mid = any("mid" in m.tensors for m in adapter)
    assert has_mid == tucker
    assert adapter.source_format == "lycoris"


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_matches_lycoris_forward(tmp_path, tucker, unet):
    net = _network(unet, "loha", conv_dim=4, conv_alpha=1.0, use_tucker=tucker)
    adapter, _ = _save_and_read(net, tmp_path)
    _compare_all(net, adapter, {"loha"})
    assert any("t1" in m.tensors for m in adapter) == tucker


@pytest.mark.parametrize("kw", [
    dict(factor=4),                                   # w1 whole, w2 factorised
    dict(factor=8, decompose_both=True, dim=1),       # w1 factorised too
    dict(factor=4, full_matrix=True),                 # both whole: scale 1
    dict(factor=4, use_tucker=True, dim=2),           # conv w2 through a Tucker core
])
def test_lokr_matches_lycoris_forward(tmp_path, kw, unet):
    net = _network(unet, "lokr", conv_dim=kw.get("dim", 4), conv_alpha=1.0, **kw)
    adapter, _ = _save_and_read(net, tmp_path)
    _compare_all(net, adapter, {"lokr"})
    names = set().union(*(m.tensors for m in adapter))
    if kw.get("decompose_both"):
        assert "w1a" in names
    if kw.get("full_matrix"):
        assert all("w1" in m.tensors and "w2" in m.tensors and m.scale == 1.0 for m in adapter)
    else:
        assert "w2a" in names


def test_full_matches_lycoris(tmp_path, unet):
    originals = {n: m.weight.detach().clone() for n, m in unet.named_modules() if hasattr(m, "weight")}
    net = _network(unet, "full")
    adapter, _ = _save_and_read(net, tmp_path)
    assert {m.kind for m in adapter} == {"full"}
    for m in net.loras:
        ours = _by_lycoris_name(adapter)[m.lora_name]
        orig = originals[ours.path] if ours.path in originals else None
        assert orig is not None, ours.path
        torch.testing.assert_close(delta_weight(ours, dtype=torch.float64), (m.weight.detach() - orig).double())


def test_loha_forward_on_linear_is_the_oracle(tmp_path):
    """The module's output change equals x @ ΔWᵀ with our ΔW (alpha ≠ rank, so the scale shows)."""
    te = tiny_clip_text()
    net = _network(te, "loha", dim=4, alpha=1.0)
    adapter, _ = _save_and_read(net, tmp_path)
    m = next(x for x in net.loras if x.module_type == "linear")
    ours = _by_lycoris_name(adapter)[m.lora_name]
    assert ours.component == "text_encoder" and ours.path.startswith("text_model.encoder.")
    x = torch.randn(3, m.shape[1], dtype=torch.float64)
    te.double()
    m.double()
    with torch.no_grad():
        y = m(x) - m.org_forward(x)
    torch.testing.assert_close(y, x @ delta_weight(ours, dtype=torch.float64).T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("wd_on_output", [True, False])
def test_dora_scale_merge_matches_lycoris(tmp_path, wd_on_output, unet):
    net = _network(unet, "locon", dora_wd=True, wd_on_output=wd_on_output)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in net.loras:
            m.dora_scale.mul_(1 + 0.1 * torch.rand(m.dora_scale.shape, generator=gen))
    adapter, _ = _save_and_read(net, tmp_path)
    mods = _by_lycoris_name(adapter)
    for m in net.loras[:20]:
        ours = mods[m.lora_name]
        assert ours.hints["dora_axis"] == ("out" if wd_on_output else "in")
        m.double()
        with torch.no_grad():
            expected, _ = m.get_merged_weight(1.0, tuple(m.org_module[0].weight.shape))
        base = m.org_module[0].weight.detach().double()
        torch.testing.assert_close(merge_weight(base, ours, dtype=torch.float64), expected.double(),
                                   rtol=1e-7, atol=1e-9)


def test_lycoris_kohya_roundtrip_keeps_every_key(tmp_path, unet):
    from safetensors.torch import load_file

    net = _network(unet, "loha", conv_dim=4, conv_alpha=1.0, use_tucker=True)
    adapter, path = _save_and_read(net, tmp_path)
    out = tmp_path / "again.safetensors"
    loratool.save(adapter, out, "kohya")
    a, b = load_file(path), load_file(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
