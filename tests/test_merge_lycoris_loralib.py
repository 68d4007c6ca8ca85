"""Merging loralib and LyCORIS files equals what those libraries merge themselves:
loralib's ``eval()`` merge and lycoris' ``merge_to`` (LoCon incl. Tucker conv cores, LoHa, LoKr).

lycoris 4.1.3's ``merge_to`` applies the LoHa / LoKr scale twice (its ``forward`` applies it
once); those cases use alpha = dim (scale 1) so the oracle is unambiguous.
"""

from __future__ import annotations

import json

import loralib
import lycoris
import pytest
import torch
from loralib_models import SIDECAR, tiny_loralib
from merge_oracles import assert_merged, save_base
from tiny_models import randomize_lora, tiny_unet

from loratool.ops.merge import merge


def test_loralib_matches_eval_merge(tmp_path):
    model = tiny_loralib(dtype=torch.float64)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = {k: v for k, v in sd.items() if "lora_" not in k}
    torch.save(loralib.lora_state_dict(model), tmp_path / "lora.pt")
    (tmp_path / "lora.pt.json").write_text(json.dumps(SIDECAR))
    base_path = save_base(base, tmp_path / "model.safetensors")
    model.eval()  # loralib merges ΔW into the weights here
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = tmp_path / "merged.safetensors"
    result = merge(base_path, [tmp_path / "lora.pt"], out, device="cpu")
    assert result.matched == {"model": 4} and not result.unmatched
    assert assert_merged(out, expected, base) == 4


@pytest.mark.parametrize(
    "algo,kw,kinds",
    [
        ("locon", {"linear_alpha": 2.0, "conv_dim": 4, "conv_alpha": 1.0}, {"lora"}),
        ("locon", {"linear_alpha": 2.0, "conv_dim": 4, "conv_alpha": 1.0, "use_tucker": True}, {"lora"}),
        ("loha", {"linear_alpha": 4.0, "conv_dim": 4, "conv_alpha": 4.0}, {"loha"}),
        ("lokr", {"linear_alpha": 4.0, "conv_dim": 4, "conv_alpha": 4.0, "factor": 4}, {"lokr"}),
        ("lokr", {"linear_alpha": 4.0, "full_matrix": True, "factor": 8}, {"lokr"}),
    ],
    ids=["locon", "locon-tucker", "loha", "lokr", "lokr-full"],
)
def test_lycoris_matches_merge_to(tmp_path, algo, kw, kinds):
    model = tiny_unet().double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    (tmp_path / "unet").mkdir()
    base_path = save_base(base, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, algo=algo, **kw)
    net.apply_to()
    randomize_lora(net, seed=3, std=0.2)
    lyco = tmp_path / "lyco.safetensors"
    net.save_weights(str(lyco), torch.float32, {"ss_network_module": "lycoris.kohya"})
    net.merge_to(1.0)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items() if k in base}
    out = tmp_path / "merged.safetensors"
    result = merge(base_path, [lyco], out, device="cpu")
    assert not result.unmatched, result.unmatched[:5]
    assert result.matched == {"unet": len(net.loras)}
    assert assert_merged(out, expected, base) == len(net.loras)
    from loratool import load

    assert {m.kind for m in load(lyco, base=base_path)} == kinds
