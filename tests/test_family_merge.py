"""End to end: a kohya SDXL / Flux LoRA (native SGM / BFL names) merged by loratool into a
single-file checkpoint equals, key for key after mapping, what diffusers fuses into its own
model from the same file (diffusers' kohya loaders + ``fuse_lora`` are the oracle)."""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file, save_file
from test_arch_checkpoints import ldm_state_dict, tiny_sdxl_unet  # noqa: E402

from loratool.arch import checkpoints, flux
from loratool.ops.merge import merge


def fused_state(model) -> dict[str, torch.Tensor]:
    """The model's weights after ``fuse_lora``, under the plain (adapter-free) names."""
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer", "")] = v
    return out


def flux_fused_by_diffusers(model, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The oracle: diffusers converts the kohya Flux LoRA, loads it into ``model`` and fuses it."""
    from diffusers import FluxPipeline

    state = FluxPipeline.lora_state_dict(dict(lora))
    # diffusers' converter leaves the embedders (txt_in, time_in, ...) without the component prefix
    state = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in state.items()}
    model.load_lora_adapter(state, prefix="transformer")
    model.fuse_lora()
    return fused_state(model)


def kohya_lora(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for n, (path, shape) in enumerate(shapes.items()):
        key, r = "lora_unet_" + path.replace(".", "_"), 2 + n % 3
        out, inp = shape[0], shape[1]
        kernel = tuple(shape[2:])
        sd[key + ".lora_down.weight"] = torch.randn(r, inp, *kernel, generator=gen) * 0.1
        sd[key + ".lora_up.weight"] = torch.randn(out, r, *([1] * len(kernel)), generator=gen) * 0.1
        # diffusers ignores alpha on Flux final_layer (its own TODO): alpha = r there
        sd[key + ".alpha"] = torch.tensor(float(r if path.startswith("final_layer") else 1 + n % 4))
    return sd


def fix_alpha_names(alphas: dict[str, float]) -> dict[str, float]:
    """Work around a diffusers bug: for kohya SDXL attention q/k/v/out its alpha keys keep the old
    ``processor.to_q_lora.down.weight`` spelling, match no module, and the alpha is silently lost."""
    def fix(k: str) -> str:
        m = re.search(r"\.processor\.(to_[qkv]|to_out)_lora\.down\.weight\.alpha$", k)
        if m is None:
            return k
        name = "to_out.0" if m.group(1) == "to_out" else m.group(1)
        return k[: m.start()] + f".{name}.alpha"
    return {fix(k): v for k, v in alphas.items()}


def compare(merged: dict, targets: dict, oracle: dict, component: str, touched: set[str]) -> None:
    for name, want in oracle.items():
        t = targets[(component, name)]
        got = merged[t.key] if t.rows is None else merged[t.key][t.rows[0]:t.rows[1]]
        want = checkpoints.to_stored(want, t)
        err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()
        assert err <= 1e-5, (name, err)
    assert touched  # the LoRA did change something


SDXL_TARGETS = [
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.5.1.transformer_blocks.1.attn2.to_k",
    "input_blocks.4.1.proj_in",
    "output_blocks.0.1.proj_out",
    "output_blocks.2.2.conv",
    "input_blocks.1.0.in_layers.2",
    "input_blocks.3.0.op",
    "middle_block.1.transformer_blocks.0.ff.net.2",
    "output_blocks.4.0.skip_connection",
    "label_emb.0.0",
]


def test_kohya_sdxl_lora_into_sgm_single_file_equals_diffusers_fuse(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = tiny_sdxl_unet()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    ckpt = ldm_state_dict(unet, base_state)
    ckpt["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    save_file(ckpt, tmp_path / "base.safetensors")
    table = {k.removeprefix(checkpoints.UNET_PREFIX): v for k, v in ckpt.items()}
    lora = kohya_lora({p: tuple(table[p + ".weight"].shape) for p in SDXL_TARGETS}, seed=3)
    save_file(lora, tmp_path / "lora.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})

    merge(tmp_path / "base.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    merged = load_file(tmp_path / "out.safetensors")

    state, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(lora), unet_config=unet.config)
    unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
    unet.load_lora_adapter(unet_state, prefix="unet", network_alphas=fix_alpha_names(alphas))
    unet.fuse_lora()
    oracle = fused_state(unet)
    targets = checkpoints.canonical_targets(list(merged))
    touched = {k for k in oracle if not torch.equal(oracle[k], base_state[k])}
    assert len(touched) == len(SDXL_TARGETS)
    compare(merged, targets, oracle, "unet", touched)
    assert torch.equal(merged["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"],
                       torch.ones(4))


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                                  in_channels=8)


def bfl_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The BFL single file of a diffusers Flux state dict: fused parts concatenated by rows,
    final modulation halves swapped (the layout diffusers' own converter reads back)."""
    out = {}
    for native, targets in flux.module_table(1, 1).items():
        for suffix in (".weight", ".bias"):
            parts = [state[t + suffix] for t in targets]
            t = torch.cat(parts, dim=0)
            out["model.diffusion_model." + native + suffix] = flux.swap_halves(t) if native in flux.SWAPPED else t
    for native, param in flux.norm_table(1, 1).items():
        out["model.diffusion_model." + native] = state[param]
    return out


FLUX_TARGETS = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
                "double_blocks.0.img_mlp.0", "single_blocks.0.linear2", "single_blocks.0.modulation.lin",
                "txt_in", "time_in.in_layer", "final_layer.linear"]


def test_kohya_flux_lora_into_bfl_single_file_equals_diffusers_fuse(tmp_path):

    model = tiny_flux()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = bfl_from_diffusers(base_state)
    save_file(ckpt, tmp_path / "flux.safetensors")
    shapes = {p: tuple(ckpt["model.diffusion_model." + p + ".weight"].shape) for p in FLUX_TARGETS}
    lora = kohya_lora(shapes, seed=5)
    # a split_qkv module: block-diagonal up of rank 3·2
    key = "lora_unet_double_blocks_0_txt_attn_qkv"
    up = torch.zeros(48, 6)
    for g in range(3):
        up[g * 16:(g + 1) * 16, g * 2:(g + 1) * 2] = torch.randn(16, 2) * 0.1
    lora[key + ".lora_down.weight"] = torch.randn(6, 16) * 0.1
    lora[key + ".lora_up.weight"] = up
    save_file(lora, tmp_path / "lora.safetensors", metadata={"ss_base_model_version": "flux1"})

    merge(tmp_path / "flux.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    merged = load_file(tmp_path / "out.safetensors")

    oracle = flux_fused_by_diffusers(model, lora)
    targets = checkpoints.canonical_targets({k: tuple(v.shape) for k, v in merged.items()}, transforms=True)
    touched = {k for k in oracle if not torch.equal(oracle[k], base_state[k])}
    assert len(touched) == 13  # 9 modules, two of them fused q/k/v (3 each)
    compare(merged, targets, oracle, "transformer", touched)


# ------------------------------------------------------------------ weights stored transposed / halves swapped

def test_kohya_flux_final_modulation_into_bfl_single_file_equals_diffusers_fuse(tmp_path):
    """BFL stores ``final_layer.adaLN_modulation.1`` as [shift; scale], diffusers' ``norm_out.linear`` as
    [scale; shift]: the merge happens on the diffusers orientation and is swapped back."""

    model = tiny_flux()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = bfl_from_diffusers(base_state)
    save_file(ckpt, tmp_path / "flux.safetensors")
    paths = ["final_layer.adaLN_modulation.1", "final_layer.linear"]
    lora = kohya_lora({p: tuple(ckpt["model.diffusion_model." + p + ".weight"].shape) for p in paths}, seed=7)
    save_file(lora, tmp_path / "lora.safetensors", metadata={"ss_base_model_version": "flux1"})

    result = merge(tmp_path / "flux.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    assert not result.unmatched and sum(result.matched.values()) == 2, result.unmatched
    merged = load_file(tmp_path / "out.safetensors")

    oracle = flux_fused_by_diffusers(model, lora)
    targets = checkpoints.canonical_targets({k: tuple(v.shape) for k, v in merged.items()}, transforms=True)
    touched = {k for k in oracle if not torch.equal(oracle[k], base_state[k])}
    assert touched == {"norm_out.linear.weight", "proj_out.weight"}
    assert targets[("transformer", "norm_out.linear.weight")].transform == "swap_halves"
    compare(merged, targets, oracle, "transformer", touched)
    # by the BFL definition too: the stored [shift; scale] rows are diffusers' [scale; shift] swapped
    stored = merged["model.diffusion_model.final_layer.adaLN_modulation.1.weight"]
    scale, shift = oracle["norm_out.linear.weight"].chunk(2)
    assert torch.allclose(stored, torch.cat([shift, scale]), atol=1e-6)
    for k in ckpt:  # everything else is copied as it was
        if "final_layer" not in k:
            assert torch.equal(merged[k], ckpt[k]), k


OPEN_CLIP_G = "conditioner.embedders.1.model."


def tiny_clip_g():
    """A CLIP text encoder with projection whose projection is not square ([24, 32]): a transposed
    placement would fail on shapes, not only on values."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(2)
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=24)
    return CLIPTextModelWithProjection(cfg).double().eval()


def sgm_file_with_open_clip_g(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from test_arch_checkpoints import open_clip_state_dict

    ckpt = open_clip_state_dict(hf, OPEN_CLIP_G, 2)  # text_projection stored [in, out]
    ckpt["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(4, dtype=torch.float64)
    return ckpt


def te2_kohya_lora(hf: dict[str, torch.Tensor], paths: list[str], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for n, path in enumerate(paths):
        out, inp = hf[path + ".weight"].shape
        key, r = "lora_te2_" + path.replace(".", "_"), 2  # one rank for all (see diffusers_fused_te2)
        sd[key + ".lora_down.weight"] = torch.randn(r, inp, generator=gen, dtype=torch.float64) * 0.1
        sd[key + ".lora_up.weight"] = torch.randn(out, r, generator=gen, dtype=torch.float64) * 0.1
        sd[key + ".alpha"] = torch.tensor(float(1 + n), dtype=torch.float64)
    return sd


def diffusers_fused_te2(te2, lora: dict[str, torch.Tensor], paths: list[str]) -> dict[str, torch.Tensor]:
    """diffusers' SDXL text-encoder loader puts the ``lora_te2_*`` modules into ``text_encoder_2``; PEFT merges them.

    diffusers' kohya converter leaves ``lora_te2_text_projection`` as ``text_projection.lora.down``,
    a name its loader then cannot place; so the test renames kohya's keys to diffusers' own spelling
    (lora_down -> lora_linear_layer.down, lora_up -> lora_linear_layer.up, alpha per module), which
    the loader turns into PEFT's lora_A / lora_B. Its text-encoder loader reads ranks only from
    q/k/v/out_proj/fc1/fc2 modules, so ``text_projection`` needs one of those beside it, of the same rank."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    state, alphas = {}, {}
    for path in paths:
        head = "lora_te2_" + path.replace(".", "_")
        state[f"text_encoder_2.{path}.lora_linear_layer.down.weight"] = lora[head + ".lora_down.weight"]
        state[f"text_encoder_2.{path}.lora_linear_layer.up.weight"] = lora[head + ".lora_up.weight"]
        alphas[f"text_encoder_2.{path}.alpha"] = float(lora[head + ".alpha"])
    StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, te2, prefix="text_encoder_2")
    layers = [m for m in te2.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == len([k for k in lora if k.endswith(".lora_down.weight")])
    for layer in layers:
        layer.merge()
    from test_arch_checkpoints import hf_state

    return {k.replace(".base_layer", ""): v for k, v in hf_state(te2).items() if "lora_" not in k}


def test_kohya_sdxl_te2_text_projection_into_sgm_single_file_equals_diffusers_fuse(tmp_path):
    """OpenCLIP-G stores ``text_projection`` as [in, out], HF's ``text_projection.weight`` as [out, in]."""
    from test_arch_checkpoints import hf_state

    te2 = tiny_clip_g()
    hf = {k: v.clone() for k, v in hf_state(te2).items()}
    ckpt = sgm_file_with_open_clip_g(hf)
    save_file(ckpt, tmp_path / "sdxl.safetensors")
    paths = ["text_projection", "text_model.encoder.layers.1.self_attn.k_proj"]
    lora = te2_kohya_lora(hf, paths, seed=11)
    save_file(lora, tmp_path / "lora.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})

    result = merge(tmp_path / "sdxl.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    assert not result.unmatched and result.matched == {"text_encoder_2": 2}, (result.unmatched, result.matched)
    merged = load_file(tmp_path / "out.safetensors")

    oracle = diffusers_fused_te2(te2, lora, paths)
    touched = {k for k in oracle if not torch.equal(oracle[k], hf[k])}
    assert touched == {"text_projection.weight", "text_model.encoder.layers.1.self_attn.k_proj.weight"}
    targets = checkpoints.canonical_targets({k: tuple(v.shape) for k, v in merged.items()}, transforms=True)
    compare(merged, targets, {k: oracle[k] for k in hf}, "text_encoder_2", touched)
    # by the OpenCLIP definition: the stored projection is the HF weight transposed
    assert merged[OPEN_CLIP_G + "text_projection"].shape == (32, 24)
    err = (merged[OPEN_CLIP_G + "text_projection"] - oracle["text_projection.weight"].T).abs().max().item()
    assert err <= 1e-12, err
