"""Header-only ``info`` on kohya Flux and SD3 LoRAs: fused q/k/v (and Flux ``linear1``) whose rank divides
by 3 or 4 are split without looking at tensor values (they are ``meta`` tensors then).

Key names are sd-scripts': ``networks/lora_flux.py`` (``lora_unet`` + BFL module path, CLIP-L
``lora_te1``, T5 ``lora_te3``; ``split_qkv`` saves down [3r, in] and a block-diagonal up, see its
``state_dict``) and ``networks/lora_sd3.py`` (``lora_unet`` + MMDiT path, ``lora_te1/2/3``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_arch_sd3 import kohya_sd3_lora, mmdit_state_dict, tiny_sd3
from test_family_diffusers import flux_kohya_file
from test_family_merge import tiny_flux
from test_info import data_reads  # noqa: F401  (the fixture)

from loratool.cli import main
from loratool.io.safetensors_file import SafetensorsFile
from loratool.ops.inspect import inspect

# sd-scripts text-encoder names (HF module paths with "." → "_") and the shapes of the tiny weights
TEXT_ENCODERS = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (24, 24),
}


def with_text_encoders(lora: dict[str, torch.Tensor], heads: list[str]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    out = dict(lora)
    for head in heads:
        o, i = TEXT_ENCODERS[head]
        out[head + ".lora_down.weight"] = torch.randn(3, i, generator=gen, dtype=lora[next(iter(lora))].dtype)
        out[head + ".lora_up.weight"] = torch.randn(o, 3, generator=gen, dtype=lora[next(iter(lora))].dtype)
        out[head + ".alpha"] = torch.tensor(3.0)
    return out


def kohya_flux(tmp_path, metadata: bool) -> str:
    _, lora = flux_kohya_file(tmp_path, tiny_flux())
    lora = with_text_encoders(lora, list(TEXT_ENCODERS))
    path = tmp_path / f"flux{int(metadata)}.safetensors"
    save_file(lora, path, metadata={"ss_base_model_version": "flux1"} if metadata else None)
    return path


def kohya_sd3(tmp_path, metadata: bool) -> str:
    lora = kohya_sd3_lora(mmdit_state_dict(tiny_sd3().state_dict()))
    lora = with_text_encoders(lora, ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"])
    path = tmp_path / f"sd3{int(metadata)}.safetensors"
    save_file(lora, path, metadata={"ss_base_model_version": "sd3"} if metadata else None)
    return path


@pytest.mark.parametrize("family, build", [("flux", kohya_flux), ("sd3", kohya_sd3)])
@pytest.mark.parametrize("metadata", [True, False], ids=["ss-metadata", "no-metadata"])
def test_header_only_info_reads_no_tensor_values(tmp_path, request, capsys, family, build, metadata):
    reads = request.getfixturevalue("data_reads")  # test_info's spy on tensor byte reads
    path = build(tmp_path, metadata)
    file = SafetensorsFile(path)
    fused = ("qkv.lora_down.weight", "linear1.lora_down.weight")
    ranks = {file.info(k).shape[0] for k in file.keys() if k.endswith(fused)}
    assert any(r % 3 == 0 for r in ranks)  # the case that crashed: a rank block_diagonal could split

    report = inspect(path)
    assert report.header_only and report.family == family
    assert reads and all(n <= 1 for _, n in reads), [k for k, n in reads if n > 1]  # alpha scalars only
    full = inspect(path, stats=True)
    assert not full.header_only and full.family == family
    # same modules, shapes and scales; each part of a fused module at the file's rank until values are read
    head = {(m.component, m.path): m for m in report.modules}
    assert set(head) == {(m.component, m.path) for m in full.modules}
    for m in full.modules:
        h = head[(m.component, m.path)]
        assert (h.shape, h.kind, h.layer) == (m.shape, m.kind, m.layer), m.path
        assert h.scale == pytest.approx(m.scale, rel=1e-12), m.path
        assert h.rank >= m.rank
    assert {m.component for m in report.modules} >= {"transformer", "text_encoder"}
    assert any(h.rank > m.rank for m in full.modules for h in [head[(m.component, m.path)]])  # split_qkv parts

    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == family
