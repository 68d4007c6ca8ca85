"""LyCORIS DiagOFT / BOFT / GLoRA / norm modules, written by lycoris 4.1.3 itself (kohya-named keys:
``lycoris_<path>.oft_blocks``, ``.rescale``, ``.alpha``, ``.a1.weight`` … ``.b2.weight``, ``.w_norm``,
``.b_norm``; ``lycoris/modules/{diag_oft,boft,glora,norms}.py``), read and merged by loratool.

Oracle: lycoris' own ``merge_to(λ)`` (``get_merged_weight``) on the same model. OFT modules are merged
in float32 because lycoris inverts (I − Q) in float32 whatever the module's dtype (``get_r``:
``.float().inverse()``); GLoRA and norm deltas run in float64.
"""

from __future__ import annotations

import copy

import lycoris
import pytest
import torch
from merge_oracles import assert_merged, save_base

import loratool
from loratool.delta import delta_weight, merge_weight
from loratool.errors import MatchError
from loratool.ops.merge import merge


class Tiny(torch.nn.Module):
    """Linear and conv layers (power-of-two output widths: BOFT needs them) and the norms lycoris' norm
    module adapts; small, so lycoris' own per-module merges stay fast."""

    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(12, 32)
        self.conv = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.conv1x1 = torch.nn.Conv2d(16, 8, 1)
        self.proj_out = torch.nn.Linear(32, 64)
        self.norm = torch.nn.LayerNorm(32)
        self.group_norm = torch.nn.GroupNorm(4, 16)


@pytest.fixture(scope="module")
def _unet_once():
    torch.manual_seed(0)
    return Tiny()


def _network(model, algo: str, dtype, seed: int = 3, **kw):
    net = lycoris.create_lycoris(model, 1.0, linear_dim=kw.pop("dim", 4), linear_alpha=kw.pop("alpha", 2.0),
                                 algo=algo, **kw)
    net.apply_to()
    net.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lycoris starts OFT / GLoRA at the identity: give every tensor a value
        for name, p in net.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.02 if "oft_blocks" in name else 0.1))
    return net


def _save_model(tmp_path, model):
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    (tmp_path / "unet").mkdir()
    return base, save_base(base, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")


def _merge_case(tmp_path, unet, algo, dtype, strength, **kw):
    model = unet.to(dtype)
    base, base_path = _save_model(tmp_path, model)
    net = _network(model, algo, dtype, **kw)
    lyco = tmp_path / "lyco.safetensors"
    net.save_weights(str(lyco), dtype, {"ss_network_module": "lycoris.kohya"})
    net.merge_to(strength)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items() if k in base}
    out = tmp_path / "merged.safetensors"
    result = merge(base_path, [lyco], out, strengths=strength, device="cpu")
    assert not result.unmatched, result.unmatched[:5]
    assert result.matched == {"unet": len(net.loras)}
    return out, expected, base, net, lyco, base_path


def _changed(expected, base) -> int:
    """Weights the oracle changed (an OFT block of size 1 is the identity: R = I)."""
    n = sum(not torch.equal(expected[k], base[k]) for k in base)
    assert n
    return n


@pytest.mark.parametrize("kw,kind,strength", [
    (dict(algo="diag-oft", constraint=1e-4, rescaled=True), "oft", 1.0),  # constraint binds, rescale on
    (dict(algo="diag-oft"), "oft", 0.6),
    (dict(algo="boft", rescaled=True), "boft", 0.6),
    (dict(algo="boft"), "boft", 1.0),
], ids=["diag-oft-constrained-rescaled", "diag-oft-0.6", "boft-rescaled-0.6", "boft"])
def test_oft_merges_as_lycoris_merge_to(tmp_path, _unet_once, kw, kind, strength):
    out, expected, base, net, lyco, base_path = _merge_case(tmp_path, copy.deepcopy(_unet_once), dtype=torch.float32,
                                                            strength=strength, **kw)
    # measured ≤ 2.1e-6 relative to the update: lycoris' float32 inverse against loratool's float32 solve
    assert assert_merged(out, expected, base, tol=3e-6) == _changed(expected, base)
    adapter = loratool.load(lyco, base=base_path)
    assert {m.kind for m in adapter} == {kind}
    assert adapter.source_format == "lycoris"
    assert {m.layer for m in adapter} == ({"conv", "linear"} if kw.get("rescaled") else {"linear"})
    assert {m.weight_shape for m in adapter} >= {(32,), (16,)}  # OFT knows the output rows only
    _round_trips(tmp_path, lyco, base_path)


def _round_trips(tmp_path, lyco, base_path):
    """--to kohya writes the same LyCORIS keys back (kinds, tensors and the alpha / constraint)."""
    from safetensors.torch import load_file

    from loratool.ops.convert import convert

    convert(lyco, "kohya", tmp_path / "again.safetensors", base=base_path)
    assert {k: v.shape for k, v in load_file(tmp_path / "again.safetensors").items()} == \
        {k: v.shape for k, v in load_file(lyco).items()}
    a, b = loratool.load(lyco, base=base_path), loratool.load(tmp_path / "again.safetensors", base=base_path)
    for key, m in a.modules.items():
        n = b.modules[key]
        assert (m.kind, m.alpha) == (n.kind, n.alpha)
        assert all(torch.equal(t, n.tensors[k]) for k, t in m.tensors.items())


def test_glora_merges_as_lycoris_merge_to(tmp_path, _unet_once):
    out, expected, base, net, lyco, base_path = _merge_case(tmp_path, copy.deepcopy(_unet_once), dtype=torch.float64,
                                                            strength=0.8, algo="glora")
    assert assert_merged(out, expected, base, tol=1e-12) == _changed(expected, base) == len(net.loras)
    adapter = loratool.load(lyco, base=base_path)
    assert {m.kind for m in adapter} == {"glora"} and {m.layer for m in adapter} == {"conv", "linear"}
    _round_trips(tmp_path, lyco, base_path)


def test_norm_deltas_merge_as_lycoris_merge_to(tmp_path, _unet_once):
    """``train_norm`` gives every GroupNorm / LayerNorm a NormModule (``w_norm``, ``b_norm``):
    W + λ·w_norm, b + λ·b_norm."""
    out, expected, base, net, lyco, base_path = _merge_case(tmp_path, copy.deepcopy(_unet_once), dtype=torch.float64,
                                                            strength=0.5, algo="lora", train_norm=True)
    changed = assert_merged(out, expected, base, tol=1e-12)
    norms = [m for m in loratool.load(lyco, base=base_path) if m.kind == "norm"]
    assert norms and all(m.layer == "norm" and "b_norm" in m.tensors for m in norms)
    assert changed == len(net.loras) + len(norms)  # every norm changes its weight and its bias
    _round_trips(tmp_path, lyco, base_path)


def test_old_oft_diag_rotation_merges_as_the_module_it_came_from(tmp_path, _unet_once):
    """LyCORIS < 2.1 saved DiagOFT as ``oft_diag`` = get_r() (R itself; LyCORIS commit 11c4cd6^,
    ``custom_state_dict``): built here from lycoris 4.1.3's own ``get_r``, it must merge as that module does."""
    model = copy.deepcopy(_unet_once)
    net = _network(model, "diag-oft", torch.float32, constraint=1e-4)
    heads = {}
    for m in net.loras:
        heads[m.lora_name + ".oft_diag"] = m.get_r().detach().clone()
    from safetensors.torch import save_file

    save_file(heads, tmp_path / "old.safetensors", metadata={"ss_network_module": "lycoris.kohya"})
    adapter = loratool.load(tmp_path / "old.safetensors", base=_save_model(tmp_path, model)[1])
    assert {m.kind for m in adapter} == {"oft"} and all("rotation" in m.tensors for m in adapter)
    by = {m.hints["kohya_head"]: m for m in adapter}
    worst = 0.0
    for m in net.loras:
        w = m.org_module[0].weight.detach().clone()
        want, _ = m.get_merged_weight(0.7, w.shape, None)
        got = merge_weight(w, by[m.lora_name], 0.7, dtype=torch.float32)
        worst = max(worst, float((got - want).norm() / (want - w).norm()))
    assert worst < 1e-5, worst  # measured 1.6e-6 (float32 rounding of two equal computations)


def test_base_dependent_delta_needs_the_base(tmp_path, _unet_once):
    model = copy.deepcopy(_unet_once).double()
    net = _network(model, "glora", torch.float64)
    net.save_weights(str(tmp_path / "g.safetensors"), torch.float64, {})
    module = next(iter(loratool.load(tmp_path / "g.safetensors", base=_save_model(tmp_path, model)[1])))
    with pytest.raises(MatchError, match="exists only against a base weight"):
        delta_weight(module)
    lyco = next(m for m in net.loras if m.lora_name == module.hints["kohya_head"])
    w = lyco.org_module[0].weight.detach().clone()
    want, _ = lyco.get_diff_weight(1.0, w.shape)
    torch.testing.assert_close(delta_weight(module, dtype=torch.float64, base=w), want, rtol=1e-12, atol=1e-12)
