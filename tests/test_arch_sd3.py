"""SD3 / SD3.5: the MMDiT single-file map and kohya SD3 LoRA naming (sd-scripts ``lora_sd3.py``).

Oracles: diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (MMDiT → diffusers, on a tiny
SD3.5-shaped model with qk-norm and dual attention) for the key map and the row / half-swap layout,
and diffusers' LoRA loader + ``fuse_lora`` for what a converted LoRA does. A kohya LoRA merged into
the MMDiT weights by its definition (W + α/r · up @ down, as sd-scripts' ``merge_to`` does) and then
converted by diffusers must equal what diffusers fuses from loratool's diffusers-layout conversion.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file

import loratool
from loratool import arch
from loratool.arch import checkpoints, sd3

LAYERS, DUAL = 3, (0, 1)
PREFIX = "model.diffusion_model."


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=LAYERS, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=DUAL,
    ).double().eval()


def mmdit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MMDiT single file of a diffusers SD3 state dict, written from the MMDiT definition:
    q/k/v concatenated by rows, [shift; scale] halves for the final and last context modulations."""
    out = {}
    for native, targets in sd3.module_table(LAYERS, DUAL).items():
        for suffix in (".weight", ".bias"):
            t = torch.cat([state[p + suffix] for p in targets], dim=0)
            if native in (sd3.ALWAYS_SWAPPED, f"joint_blocks.{LAYERS - 1}.{sd3.CONTEXT_MOD}"):
                t = torch.cat(t.chunk(2)[::-1])
            out[PREFIX + native + suffix] = t
    for native, param in sd3.norm_table(LAYERS, DUAL).items():
        out[PREFIX + native] = state[param]
    return out


def test_mmdit_map_matches_diffusers_sd3_converter():
    model = tiny_sd3()
    want = model.state_dict()
    ckpt = mmdit_state_dict(want)
    ckpt["text_encoders.clip_g.transformer.text_model.final_layer_norm.weight"] = torch.ones(3)
    converted = sfu.convert_sd3_transformer_checkpoint_to_diffusers({k: v for k, v in ckpt.items()
                                                                     if not k.startswith("text_encoders.")})
    assert set(converted) == set(want)
    for k, v in converted.items():
        assert torch.equal(v, want[k]), k
    assert checkpoints.checkpoint_family(list(ckpt)) == "sd3"
    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    targets = checkpoints.canonical_targets(shapes, transforms=True)
    plain = checkpoints.canonical_targets(shapes)
    assert {k for c, k in targets if c == "transformer"} == set(want)
    assert targets[("text_encoder_2", "text_model.final_layer_norm.weight")].key.startswith("text_encoders.clip_g.")
    for k, v in want.items():
        t = targets[("transformer", k)]
        stored = ckpt[t.key] if t.rows is None else ckpt[t.key][t.rows[0]:t.rows[1]]
        assert torch.equal(checkpoints.to_stored(v, t), stored), k
        assert (plain.get(("transformer", k)) == t) == (t.transform is None), k
    swapped = {k for (c, k), t in targets.items() if t.transform == "swap_halves"}
    assert swapped == {"norm_out.linear.weight", "norm_out.linear.bias", f"transformer_blocks.{LAYERS - 1}."
                       "norm1_context.linear.weight", f"transformer_blocks.{LAYERS - 1}.norm1_context.linear.bias"}


def test_mmdit_map_covers_every_diffusers_sd3_layer():
    model = tiny_sd3()
    layers = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert layers == {t for ts in sd3.module_table(LAYERS, DUAL).values() for t in ts}


# ------------------------------------------------------------------------------------- kohya SD3 LoRAs

LORA_TARGETS = [
    "joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.1.x_block.attn2.proj",
    "joint_blocks.0.x_block.attn.proj", "joint_blocks.0.context_block.attn.proj", "joint_blocks.1.x_block.mlp.fc1",
    "joint_blocks.1.context_block.mlp.fc2", "joint_blocks.0.x_block.adaLN_modulation.1",
    f"joint_blocks.{LAYERS - 1}.context_block.adaLN_modulation.1", f"joint_blocks.{LAYERS - 1}.context_block.attn.qkv",
    "context_embedder", "x_embedder.proj", "t_embedder.mlp.0", "y_embedder.mlp.2", "final_layer.linear",
    "final_layer.adaLN_modulation.1",
]
SPLIT_QKV = "joint_blocks.1.context_block.attn.qkv"  # a split_qkv module: block-diagonal up


def kohya_sd3_lora(native: dict[str, torch.Tensor], targets: list[str] | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for n, path in enumerate(targets or LORA_TARGETS + [SPLIT_QKV]):
        w = native[PREFIX + path + ".weight"]
        key, r = "lora_unet_" + path.replace(".", "_"), 2 + n % 3
        kernel = tuple(w.shape[2:])
        sd[key + ".lora_down.weight"] = torch.randn(r, w.shape[1], *kernel, generator=gen, dtype=torch.float64) * 0.1
        up = torch.randn(w.shape[0], r, *([1] * len(kernel)), generator=gen, dtype=torch.float64) * 0.1
        if path == SPLIT_QKV:
            rr, d = r, w.shape[0] // 3
            sd[key + ".lora_down.weight"] = torch.randn(3 * rr, w.shape[1], generator=gen, dtype=torch.float64) * 0.1
            up = torch.zeros(w.shape[0], 3 * rr, dtype=torch.float64)
            for g in range(3):
                block = torch.randn(d, rr, generator=gen, dtype=torch.float64) * 0.1
                up[g * d:(g + 1) * d, g * rr:(g + 1) * rr] = block
        sd[key + ".lora_up.weight"] = up
        sd[key + ".alpha"] = torch.tensor(float(1 + n % 4), dtype=torch.float64)
    return sd


def merged_native(native: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sd-scripts' merge: W += alpha / r · up @ down (conv: flattened factors), on the MMDiT names."""
    out = dict(native)
    for k in lora:
        if not k.endswith(".lora_down.weight"):
            continue
        head = k[: -len(".lora_down.weight")]
        path = head.removeprefix("lora_unet_")
        native_key = next(n for n in native if n.removeprefix(PREFIX).replace(".", "_") == path + "_weight")
        down, up = lora[k], lora[head + ".lora_up.weight"]
        scale = float(lora[head + ".alpha"]) / down.shape[0]
        w = native[native_key]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        out[native_key] = w + scale * delta
    return out


def test_kohya_sd3_lora_names_detect_and_restore(tmp_path):
    native = mmdit_state_dict(tiny_sd3().state_dict())
    lora = kohya_sd3_lora(native)
    assert arch.detect(list(lora), {}).name == "sd3"
    save_file(lora, tmp_path / "k.safetensors")
    adapter = loratool.load(tmp_path / "k.safetensors")
    paths = {m.path for m in adapter}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn2.to_v", "pos_embed.proj",
            f"transformer_blocks.{LAYERS - 1}.norm1_context.linear", "norm_out.linear",
            "time_text_embed.text_embedder.linear_2"} <= paths
    assert {m.component for m in adapter} == {"transformer"}
    assert "joint_blocks.37.x_block.attn2.qkv" in sd3.native_paths("transformer")
    assert "encoder.block.23.layer.1.DenseReluDense.wi_1" in sd3.native_paths("text_encoder_3")


def test_kohya_sd3_to_diffusers_loads_and_fuses_like_the_mmdit_merge(tmp_path, monkeypatch):
    import diffusers.loaders.peft as dpeft
    from diffusers import StableDiffusion3Pipeline

    reports = []
    original = dpeft._maybe_warn_for_unhandled_keys

    def spy(keys, adapter_name):
        if keys is not None:
            reports.append([k for k in keys.unexpected_keys + keys.missing_keys if "lora_" in k and
                            (k in keys.unexpected_keys or adapter_name in k)])
        return original(keys, adapter_name)

    monkeypatch.setattr(dpeft, "_maybe_warn_for_unhandled_keys", spy)
    model = tiny_sd3()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    native = mmdit_state_dict(base)
    lora = kohya_sd3_lora(native)
    save_file(lora, tmp_path / "k.safetensors", metadata={"ss_base_model_version": "sd3"})
    oracle = sfu.convert_sd3_transformer_checkpoint_to_diffusers(merged_native(native, lora))

    adapter = loratool.load(tmp_path / "k.safetensors")
    (out,) = loratool.save(adapter, tmp_path / "d.safetensors", "diffusers")
    state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(out), return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(state, model, metadata=metadata)
    assert reports and all(not r for r in reports), reports
    n_lora = sum(1 for k in model.state_dict() if "lora_A" in k)
    assert n_lora == len(adapter) == sum(1 for k in load_file(out) if k.endswith("lora_A.weight"))
    model.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(fused) == set(oracle)
    touched = 0
    for k, want in oracle.items():
        if torch.equal(want, base[k]):
            assert torch.equal(fused[k], base[k]), k
            continue
        touched += 1
        err = ((fused[k] - want).norm() / want.norm()).item()
        assert err <= 1e-10, (k, err)
    assert touched == 25  # 17 modules, four of them fused q/k/v (+2 each)

    # diffusers layout -> kohya gives the original file back
    (kout,) = loratool.save(loratool.load(out), tmp_path / "back.safetensors", "kohya", family="sd3")
    back = load_file(kout)
    assert set(back) == set(lora)
    for k, v in lora.items():
        if k.endswith(".alpha"):
            assert float(back[k]) == pytest.approx(float(v), rel=1e-6), k
        else:
            assert torch.equal(back[k].to(v.dtype), v), k


SWAPPED_TARGETS = ["final_layer.adaLN_modulation.1", f"joint_blocks.{LAYERS - 1}.context_block.adaLN_modulation.1"]


@pytest.mark.parametrize("targets", [
    [t for t in LORA_TARGETS + [SPLIT_QKV] if t not in SWAPPED_TARGETS],
    SWAPPED_TARGETS,  # stored [shift; scale]: merged on the diffusers [scale; shift] orientation and swapped back
], ids=["rows", "swapped_halves"])
def test_kohya_sd3_lora_merged_into_mmdit_single_file(tmp_path, targets):
    """loratool ``merge`` into the MMDiT single file == the sd-scripts-style merge on the native names."""
    from loratool.ops.merge import merge

    native = mmdit_state_dict(tiny_sd3().state_dict())
    lora = kohya_sd3_lora(native, targets)
    save_file(native, tmp_path / "sd3.safetensors")
    save_file(lora, tmp_path / "k.safetensors", metadata={"ss_base_model_version": "sd3"})
    result = merge(tmp_path / "sd3.safetensors", [tmp_path / "k.safetensors"], tmp_path / "out.safetensors")
    assert not result.unmatched, result.unmatched
    merged = load_file(tmp_path / "out.safetensors")
    want = merged_native(native, lora)
    for k, v in want.items():
        err = ((merged[k] - v).norm() / v.norm().clamp_min(1e-30)).item()
        assert err <= 1e-10, (k, err)


def test_kohya_sd3_file_written_back_as_kohya_is_identical(tmp_path):
    """Fused q/k/v modules split on read and fuse on write: kohya → kohya gives the same tensors."""
    native = mmdit_state_dict(tiny_sd3().state_dict())
    lora = kohya_sd3_lora(native)
    save_file(lora, tmp_path / "k.safetensors", metadata={"ss_base_model_version": "sd3"})
    (written,) = loratool.save(loratool.load(tmp_path / "k.safetensors"), tmp_path / "kk.safetensors", "kohya")
    back = load_file(written)
    assert set(back) == set(lora)
    for key, t in lora.items():
        assert back[key].shape == t.shape and torch.equal(back[key].to(t.dtype), t), key
