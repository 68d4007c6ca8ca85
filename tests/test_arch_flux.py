"""Flux BFL <-> diffusers LoRA naming and fused-weight splitting, checked against diffusers'
``_convert_kohya_flux_lora_to_diffusers`` (float64, ΔW per canonical module)."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import lora_conversion_utils as diffusers_conv

from loratool.adapter import LoraModule
from loratool.arch import flux
from loratool.delta import delta_weight

D = 3072  # diffusers hard-codes Flux.1's widths for linear1, so the fused modules use them
GEN = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def block_diag_up(rows: list[int], r: int) -> torch.Tensor:
    up = torch.zeros(sum(rows), r * len(rows), dtype=torch.float64)
    at = 0
    for g, n in enumerate(rows):
        up[at:at + n, g * r:(g + 1) * r] = rnd(n, r)
        at += n
    return up


# native path -> (down, up, alpha); alpha None = absent (= rank)
def kohya_modules() -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    return {
        "double_blocks.0.img_attn.qkv": (rnd(4, D), rnd(3 * D, 4), 8.0),
        "double_blocks.0.txt_attn.qkv": (rnd(6, D), block_diag_up([D] * 3, 2), 3.0),  # split_qkv file
        "double_blocks.0.img_attn.proj": (rnd(2, 16), rnd(16, 2), 1.0),
        "double_blocks.0.img_mlp.0": (rnd(2, 16), rnd(24, 2), None),
        "double_blocks.0.txt_mlp.2": (rnd(2, 24), rnd(16, 2), 4.0),
        "double_blocks.0.img_mod.lin": (rnd(2, 16), rnd(32, 2), 2.0),
        "double_blocks.1.txt_attn.proj": (rnd(2, 16), rnd(16, 2), 2.0),
        "single_blocks.0.linear1": (rnd(3, D), rnd(7 * D, 3), 1.5),
        "single_blocks.1.linear1": (rnd(8, D), block_diag_up([D, D, D, 4 * D], 2), 6.0),  # split
        "single_blocks.0.linear2": (rnd(2, 40), rnd(16, 2), 1.0),
        "single_blocks.0.modulation.lin": (rnd(2, 16), rnd(48, 2), 1.0),
        "img_in": (rnd(2, 8), rnd(16, 2), 1.0),
        "txt_in": (rnd(2, 12), rnd(16, 2), 1.0),
        "time_in.in_layer": (rnd(2, 8), rnd(16, 2), 1.0),
        "vector_in.out_layer": (rnd(2, 16), rnd(16, 2), 1.0),
        "guidance_in.in_layer": (rnd(2, 8), rnd(16, 2), 1.0),
        # diffusers ignores alpha on final_layer (its own TODO): keep alpha = rank there
        "final_layer.linear": (rnd(2, 16), rnd(8, 2), None),
        "final_layer.adaLN_modulation.1": (rnd(2, 16), rnd(32, 2), None),
    }


def as_loramodules(spec) -> list[LoraModule]:
    return [LoraModule("transformer", p, tensors={"down": d, "up": u}, alpha=a) for p, (d, u, a) in spec.items()]


def oracle_deltas(spec) -> dict[str, torch.Tensor]:
    sd = {}
    for path, (down, up, alpha) in spec.items():
        key = "lora_unet_" + path.replace(".", "_")
        sd[key + ".lora_down.weight"] = down.clone()
        sd[key + ".lora_up.weight"] = up.clone()
        if alpha is not None:
            sd[key + ".alpha"] = torch.tensor(alpha, dtype=torch.float64)
    converted = diffusers_conv._convert_kohya_flux_lora_to_diffusers(sd)
    out = {}
    for k, a in converted.items():
        if k.endswith(".lora_A.weight"):
            name = k[: -len(".lora_A.weight")].removeprefix("transformer.")
            out[name] = converted[k.replace(".lora_A.", ".lora_B.")] @ (a @ probe(a.shape[1]))
    return out


def probe(n: int) -> torch.Tensor:
    """ΔW is compared through its action on a fixed random block (dense Flux ΔWs are 21504×3072)."""
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64)


def action(m: LoraModule) -> torch.Tensor:
    """ΔW @ X from the factors (scale as :attr:`LoraModule.scale` defines it)."""
    return m.scale * (m.tensors["up"] @ (m.tensors["down"] @ probe(m.tensors["down"].shape[1])))


def test_to_canonical_matches_diffusers_kohya_flux_converter():
    spec = kohya_modules()
    expected = oracle_deltas(spec)
    canon = flux.to_canonical(as_loramodules(spec))
    got = {m.path: action(m) for m in canon}
    assert set(got) == set(expected)
    for name, want in expected.items():
        err = (got[name] - want).norm() / want.norm()
        assert err <= 1e-12, name


def test_split_qkv_files_split_block_diagonally_at_lower_rank():
    spec = kohya_modules()
    canon = {m.path: m for m in flux.to_canonical(as_loramodules(spec))}
    m = canon["transformer_blocks.0.attn.add_k_proj"]
    assert m.rank == 2 and m.scale == pytest.approx(3.0 / 6)
    plain = canon["transformer_blocks.0.attn.to_k"]
    assert plain.rank == 4 and torch.equal(plain.tensors["down"], spec["double_blocks.0.img_attn.qkv"][0])
    assert canon["single_transformer_blocks.1.proj_mlp"].tensors["up"].shape == (4 * D, 2)


def native_deltas(modules) -> dict[str, torch.Tensor]:
    return {m.path: action(m) for m in modules}


def test_from_canonical_round_trip_is_exact():
    spec = kohya_modules()
    mods = as_loramodules(spec)
    back = flux.from_canonical(flux.to_canonical(mods))
    want, got = native_deltas(mods), native_deltas(back)
    assert set(want) == set(got)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-12), k
    by = {m.path: m for m in back}
    # shared-down files come back in their compact form, split files block-diagonal
    assert by["double_blocks.0.img_attn.qkv"].rank == 4
    assert torch.equal(by["double_blocks.0.img_attn.qkv"].tensors["up"], spec["double_blocks.0.img_attn.qkv"][1])
    assert by["single_blocks.1.linear1"].rank == 8


def test_from_canonical_fuses_differing_parts_and_missing_parts():
    q = LoraModule("transformer", "single_transformer_blocks.0.attn.to_q",
                   tensors={"down": rnd(2, 32), "up": rnd(32, 2)}, alpha=4.0)
    v = LoraModule("transformer", "single_transformer_blocks.0.attn.to_v",
                   tensors={"down": rnd(3, 32), "up": rnd(32, 3)}, alpha=1.0)
    mlp = LoraModule("transformer", "single_transformer_blocks.0.proj_mlp",
                     tensors={"down": rnd(1, 32), "up": rnd(128, 1)}, rslora=True, alpha=2.0)
    norm = LoraModule("transformer", "norm_out.linear", tensors={"down": rnd(2, 32), "up": rnd(64, 2)}, alpha=1.0)
    (fused, final) = flux.from_canonical([q, v, mlp, norm])
    assert fused.path == "single_blocks.0.linear1"
    dw = delta_weight(fused, dtype=torch.float64)
    assert dw.shape == (32 * 7, 32)
    assert torch.allclose(dw[:32], delta_weight(q, dtype=torch.float64), atol=1e-12)
    assert not dw[32:64].any()
    assert torch.allclose(dw[64:96], delta_weight(v, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(dw[96:], delta_weight(mlp, dtype=torch.float64), atol=1e-12)
    # BFL final modulation stores [shift; scale], diffusers [scale; shift]
    n = delta_weight(norm, dtype=torch.float64)
    f = delta_weight(final, dtype=torch.float64)
    assert final.path == "final_layer.adaLN_modulation.1"
    assert torch.allclose(f, torch.cat([n[32:], n[:32]]), atol=1e-12)


def test_native_paths_and_detect():
    paths = flux.native_paths("transformer")
    assert {"double_blocks.18.img_attn.qkv", "single_blocks.37.linear1", "final_layer.adaLN_modulation.1"} <= paths
    assert "encoder.block.23.layer.1.DenseReluDense.wi_0" in flux.native_paths("text_encoder_2")
    assert flux.detect(["lora_unet_double_blocks_0_img_attn_qkv.alpha"], {}) > 0
    assert flux.detect(["lora_unet_input_blocks_4_1_proj_in.alpha"], {}) == 0


def test_module_table_covers_every_diffusers_flux_linear():
    import diffusers
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(num_layers=2, num_single_layers=2, attention_head_dim=8,
                                                 num_attention_heads=2, joint_attention_dim=16,
                                                 pooled_projection_dim=8, guidance_embeds=True, in_channels=8)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    covered = {t for targets in flux.module_table(2, 2).values() for t in targets}
    assert linears == covered
