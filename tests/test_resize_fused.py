"""Resizing a kohya Flux file honours ``--rank`` on the modules the file holds: a fused ``qkv`` /
``linear1`` comes back as one module of rank k that is the best rank-k approximation of the fused
ΔW (not its q, k, v parts at rank k each, joined block-diagonally into rank 3k).

Oracle: the written file's own factors (ΔW = alpha / r · up @ down, read with safetensors) against
``torch.linalg.svd`` of the original fused ΔW, float64; and diffusers' kohya Flux converter
(``_convert_kohya_flux_lora_to_diffusers``) reading the resized qkv file.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import lora_conversion_utils as diffusers_conv
from safetensors.torch import load_file, save_file
from test_arch_flux import block_diag_up, rnd

from loratool.ops.resize import resize_file

D = 16


# kohya head -> (down, up, alpha): fused modules with one down (rank 4 / 5) and split_qkv-trained ones
# (block-diagonal up, rank 3·2 / 4·2), plus an ordinary module
MODULES = {
    "lora_unet_double_blocks_0_img_attn_qkv": (rnd(4, D), rnd(3 * D, 4), 8.0),
    "lora_unet_double_blocks_0_txt_attn_qkv": (rnd(6, D), block_diag_up([D] * 3, 2), 3.0),
    "lora_unet_single_blocks_0_linear1": (rnd(5, D), rnd(7 * D, 5), 2.5),
    "lora_unet_single_blocks_1_linear1": (rnd(8, D), block_diag_up([D, D, D, 4 * D], 2), 6.0),
    "lora_unet_double_blocks_0_img_attn_proj": (rnd(4, D), rnd(D, 4), 4.0),
}


def _write(path):
    sd = {}
    for head, (down, up, alpha) in MODULES.items():
        sd[f"{head}.lora_down.weight"], sd[f"{head}.lora_up.weight"] = down, up
        sd[f"{head}.alpha"] = torch.tensor(alpha, dtype=torch.float64)
    save_file(sd, str(path), {"ss_base_model_version": "flux1", "ss_network_dim": "Dynamic"})


def _delta(sd, head):
    down, up = sd[f"{head}.lora_down.weight"], sd[f"{head}.lora_up.weight"]
    return float(sd[f"{head}.alpha"]) / down.shape[0] * (up @ down)


@pytest.mark.parametrize("rank", [2, 3])
def test_fused_modules_resize_to_the_rank_asked_for(tmp_path, rank):
    src, out = tmp_path / "flux.safetensors", tmp_path / "r.safetensors"
    _write(src)
    result = resize_file(src, out, rank, device="cpu")
    before, after = load_file(src), load_file(out)
    assert {k.split(".")[0] for k in after} == set(MODULES)
    for head in MODULES:
        assert after[f"{head}.lora_down.weight"].shape[0] == rank, head
        delta = _delta(before, head)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        err = float((_delta(after, head) - best).norm() / best.norm())
        assert err < 1e-12, (head, err)
    assert result.rank == rank and {m.rank_out for m in result.modules} == {rank}
    assert load_file(out) and result.adapter.metadata["ss_network_dim"] == str(rank)

    # diffusers reads the resized qkv as the truncated fused ΔW, split into q, k, v
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    sub = {k: v for k, v in after.items() if k.startswith(qkv)}
    converted = diffusers_conv._convert_kohya_flux_lora_to_diffusers(sub)
    parts = []
    for name in ("to_q", "to_k", "to_v"):
        key = f"transformer.transformer_blocks.0.attn.{name}"
        parts.append(converted[f"{key}.lora_B.weight"] @ converted[f"{key}.lora_A.weight"])
    delta = _delta(before, qkv)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(torch.cat(parts), (u[:, :rank] * s[:rank]) @ vh[:rank], rtol=1e-10, atol=1e-10)


def test_fused_module_already_at_rank_is_copied_bit_for_bit(tmp_path):
    src, out = tmp_path / "flux.safetensors", tmp_path / "r.safetensors"
    _write(src)
    resize_file(src, out, 8, device="cpu")
    before, after = load_file(src), load_file(out)
    for head in MODULES:  # every native module has rank ≤ 8
        for suffix in ("lora_down.weight", "lora_up.weight"):
            assert torch.equal(after[f"{head}.{suffix}"], before[f"{head}.{suffix}"]), (head, suffix)
