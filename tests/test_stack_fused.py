"""``stack --method svd --rank k`` on kohya Flux files honours k on the modules the file holds: a fused
``qkv`` / ``linear1`` comes back as one module of rank k, the best rank-k approximation of the weighted
sum of the fused ΔWs (not q, k, v at rank k each, joined block-diagonally into rank 3k).

Oracle: ``torch.linalg.svd`` of Σ wᵢ ΔWᵢ formed densely from the input files' own factors (float64,
read with safetensors), against the written file's factors; and diffusers' kohya Flux converter
(``_convert_kohya_flux_lora_to_diffusers``) reading the stacked qkv.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import lora_conversion_utils as diffusers_conv
from safetensors.torch import load_file, save_file
from test_arch_flux import block_diag_up, rnd
from test_resize_fused import D, _delta

from loratool.ops.stack import stack_files

QKV = "lora_unet_double_blocks_0_img_attn_qkv"
LINEAR1 = "lora_unet_single_blocks_0_linear1"
PROJ = "lora_unet_double_blocks_0_img_attn_proj"


def _write(path, modules):
    sd = {}
    for head, (down, up, alpha) in modules.items():
        sd[f"{head}.lora_down.weight"], sd[f"{head}.lora_up.weight"] = down, up
        sd[f"{head}.alpha"] = torch.tensor(alpha, dtype=torch.float64)
    save_file(sd, str(path), {"ss_base_model_version": "flux1"})


def _files(tmp_path):
    a = {QKV: (rnd(4, D), rnd(3 * D, 4), 8.0), LINEAR1: (rnd(5, D), rnd(7 * D, 5), 2.5),
         PROJ: (rnd(4, D), rnd(D, 4), 4.0)}
    b = {QKV: (rnd(6, D), block_diag_up([D] * 3, 2), 3.0),  # trained with split_qkv: block-diagonal up
         LINEAR1: (rnd(8, D), block_diag_up([D, D, D, 4 * D], 2), 6.0)}
    _write(tmp_path / "a.safetensors", a)
    _write(tmp_path / "b.safetensors", b)
    return load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")


@pytest.mark.parametrize("rank", [2, 5])
def test_fused_modules_stack_to_the_rank_asked_for(tmp_path, rank):
    a, b = _files(tmp_path)
    weights = (0.7, -0.4)
    out = tmp_path / "s.safetensors"
    result = stack_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out, weights, method="svd",
                         rank=rank, device="cpu")
    after = load_file(out)
    assert {k.rsplit(".", 2)[0] for k in after} == {QKV, LINEAR1, PROJ}
    for head in (QKV, LINEAR1, PROJ):
        want = weights[0] * _delta(a, head) + (weights[1] * _delta(b, head) if f"{head}.alpha" in b else 0)
        u, s, vh = torch.linalg.svd(want, full_matrices=False)
        k = min(rank, int(torch.linalg.matrix_rank(want)))  # proj (input a only) has rank 4
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert after[f"{head}.lora_down.weight"].shape[0] == k, head
        err = float((_delta(after, head) - best).norm() / best.norm())
        assert err < 1e-13, (head, err)  # measured ≤ 3.2e-15
    assert {m.rank_out for m in result.modules if m.path != "transformer_blocks.0.attn.to_out.0"} == {rank}

    # diffusers reads the stacked qkv as the truncated fused sum, split into q, k, v
    converted = diffusers_conv._convert_kohya_flux_lora_to_diffusers({k: v for k, v in after.items()
                                                                      if k.startswith(QKV)})
    parts = [converted[f"transformer.transformer_blocks.0.attn.{n}.lora_B.weight"]
             @ converted[f"transformer.transformer_blocks.0.attn.{n}.lora_A.weight"] for n in ("to_q", "to_k", "to_v")]
    want = weights[0] * _delta(a, QKV) + weights[1] * _delta(b, QKV)
    u, s, vh = torch.linalg.svd(want, full_matrices=False)
    torch.testing.assert_close(torch.cat(parts), (u[:, :rank] * s[:rank]) @ vh[:rank], rtol=1e-10, atol=1e-10)


def test_concat_stays_exact_on_fused_modules(tmp_path):
    a, b = _files(tmp_path)
    out = tmp_path / "c.safetensors"
    stack_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out, (1.0, 0.5), device="cpu")
    after = load_file(out)
    want = _delta(a, QKV) + 0.5 * _delta(b, QKV)
    assert float((_delta(after, QKV) - want).norm() / want.norm()) < 1e-13
