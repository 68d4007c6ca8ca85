"""Flux.1 LoRAs in the dialects trainers and loaders write, read into the canonical schema.

Key names (each test names its source): BFL control LoRAs (FLUX.1-Depth / Canny: bare BFL names,
PEFT suffixes, ``lora_B.bias``, ``*_norm.scale``, a widened ``img_in``), fal.ai Kontext
(``base_model.model.`` + BFL names), XLabs-AI/x-flux ``src/flux/modules/layers.py`` processors,
ComfyUI ``comfy_extras/nodes_lora_extract.py`` (``diffusion_model.`` / ``text_encoders.``), ai-toolkit
``toolkit/network_mixins.py`` mixes (``transformer.`` + kohya suffixes), OneTrainer
``modules/util/convert_lora_util.py`` (``lora_transformer_``, ``lora_te{i}_``; ``FluxModel.py``: te2 is
T5), SimpleTuner ``save_hooks.py`` (``transformer.base_model.model.``, ``lycoris_``).

Oracles: diffusers 0.42's own converters (``_convert_bfl_flux_control_lora_to_diffusers``,
``_convert_fal_kontext_lora_to_diffusers``, ``_convert_xlabs_flux_lora_to_diffusers``,
``_convert_kohya_flux_lora_to_diffusers``; they hard-code Flux.1's 19 / 38 blocks and 3072 width, so
those comparisons use full-size rank-2 files) for ``convert --to diffusers`` key for key and ΔW for
ΔW; diffusers' loaders + ``fuse_lora`` on a tiny Flux transformer for ``merge``; PEFT's
``merge_and_unload`` and lycoris' ``merge_to`` where the file comes from those libraries.
"""

from __future__ import annotations

import copy
import json
import re

import lycoris
import pytest
import torch
from dialect_helpers import FULL_FLUX, as_loaded, assert_same_lora, bfl_norms, bfl_shapes, factors, read_diffusers_file
from safetensors.torch import load_file, save_file
from test_family_merge import bfl_from_diffusers, compare, fused_state, tiny_flux

import loratool
from loratool.arch import checkpoints
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge

TINY = dict(dim=16, mlp=64, context=16, vec=8, time=256, img=8, double=1, single=1)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_flux()


@pytest.fixture
def flux(tiny_model, tmp_path):
    """(fresh tiny model, its state, the BFL single file of it)."""
    model = copy.deepcopy(tiny_model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(bfl_from_diffusers(state), tmp_path / "flux.safetensors")
    return model, state, tmp_path / "flux.safetensors"


def _merged_vs(model_fused: dict, base_state: dict, out) -> set[str]:
    merged = load_file(out)
    targets = checkpoints.canonical_targets({k: tuple(v.shape) for k, v in merged.items()}, transforms=True)
    touched = {k for k in model_fused if k not in base_state or not torch.equal(model_fused[k], base_state[k])}
    compare(merged, targets, {k: v for k, v in model_fused.items() if k in touched}, "transformer", touched)
    return touched


def _info(path, **kw) -> dict:
    return inspect(path, **kw).to_json()


def _diffusers_fuse(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``FluxPipeline.load_lora_weights`` + ``fuse_lora`` do to the transformer, step for step
    (diffusers.loaders.lora_pipeline.FluxLoraLoaderMixin.load_lora_weights), on a bare transformer."""
    from diffusers import FluxPipeline

    norm_keys = FluxPipeline._control_lora_supported_norm_keys
    lora = {k: v for k, v in state.items() if k.startswith("transformer.") and "lora" in k}
    norms = {k: v for k, v in state.items() if k.startswith("transformer.") and any(n in k for n in norm_keys)
             and "lora" not in k}
    FluxPipeline._maybe_expand_transformer_param_shape_or_error_(model, lora, norms)
    lora = FluxPipeline._maybe_expand_lora_state_dict(model, lora)
    model.load_lora_adapter(lora, prefix="transformer")
    if norms:
        FluxPipeline._load_norm_into_transformer(dict(norms), model)
    model.fuse_lora()
    return fused_state(model)


# ------------------------------------------------------------------ BFL control LoRAs


def control_lora(shapes: dict[str, tuple[int, int]], heads: int, double: int, single: int, seed: int):
    """FLUX.1-Depth-dev-lora's key set: every BFL module as lora_A / lora_B / lora_B.bias, every qk-norm
    scale stored whole, img_in twice as wide as the base (latents + control latents)."""
    sd = factors(shapes, 2, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for path, (o, _) in shapes.items():
        sd[f"{path}.lora_B.bias"] = torch.randn(o, generator=gen) * 0.01
    for k, n in bfl_norms(heads, double, single).items():
        sd[k] = 1 + torch.randn(n, generator=gen) * 0.1
    return sd


def test_bfl_control_lora_converts_as_diffusers_does(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers, swap_scale_shift

    shapes = bfl_shapes(**FULL_FLUX)
    shapes["img_in"] = (3072, 128)
    sd = control_lora(shapes, 128, 19, 38, seed=0)
    save_file(sd, tmp_path / "depth.safetensors")

    info = _info(tmp_path / "depth.safetensors")
    assert (info["format"], info["dialect"], info["family"]) == ("kohya", "bfl-control", "flux")
    assert info["kinds"] == {"lora": 19 * 14 + 38 * 6 + 10, "set": 19 * 4 + 38 * 2}  # fused q/k/v, linear1 split
    assert {m["path"] for m in info["modules"] if m["kind"] == "set"} >= {"transformer_blocks.0.attn.norm_q",
                                                                           "single_transformer_blocks.37.attn.norm_k"}
    x = next(m for m in info["modules"] if m["path"] == "x_embedder")
    assert x["shape"] == [3072, 128]

    result = convert(tmp_path / "depth.safetensors", "diffusers", tmp_path / "out.safetensors")
    assert result.modules == len(info["modules"])
    ours, scales = read_diffusers_file(tmp_path / "out.safetensors")
    theirs = _convert_bfl_flux_control_lora_to_diffusers(dict(sd))
    # diffusers swaps the halves of final_layer.adaLN_modulation.1's lora_A too, i.e. the rank rows,
    # which changes ΔW (it should swap lora_B's rows only); ComfyUI applies the file as stored. Corrected here.
    k = "transformer.norm_out.linear.lora_A.weight"
    theirs[k] = swap_scale_shift(theirs[k])
    assert assert_same_lora(ours, scales, theirs) == 19 * 14 + 38 * 6 + 10


def test_bfl_control_lora_merges_as_diffusers_loads_it(tmp_path, flux):
    """Widening img_in ([D, 8] -> [D, 16]), lora_B.bias and the set norms, against FluxLoraLoaderMixin's own
    steps (``_maybe_expand_transformer_param_shape_or_error_``, ``_load_norm_into_transformer``, ``fuse_lora``).
    diffusers reads the LoRA as our ``convert --to diffusers`` writes it (checked against diffusers' converter
    at full size above: its converter hard-codes Flux.1's depth)."""
    model, state, base = flux
    shapes = bfl_shapes(**TINY)
    shapes["img_in"] = (16, 16)
    sd = control_lora(shapes, 8, 1, 1, seed=4)
    save_file(sd, tmp_path / "ctrl.safetensors")
    convert(tmp_path / "ctrl.safetensors", "diffusers", tmp_path / "ctrl_diffusers.safetensors")

    result = merge(base, [tmp_path / "ctrl.safetensors"], tmp_path / "out.safetensors")
    assert not result.unmatched
    merged = load_file(tmp_path / "out.safetensors")
    assert merged["model.diffusion_model.img_in.weight"].shape == (16, 16)

    oracle = _diffusers_fuse(model, load_file(tmp_path / "ctrl_diffusers.safetensors"))
    assert oracle["x_embedder.weight"].shape == (16, 16) and model.config.in_channels == 16
    touched = _merged_vs(oracle, state, tmp_path / "out.safetensors")
    assert {"x_embedder.weight", "x_embedder.bias", "transformer_blocks.0.attn.norm_q.weight",
            "single_transformer_blocks.0.attn.to_v.bias"} <= touched


def test_bfl_control_lora_merged_into_a_diffusers_folder_loads_in_diffusers(tmp_path, flux):
    """A diffusers ``transformer/`` folder: the widened ``x_embedder`` is written whole and ``config.json`` gets
    ``in_channels`` 16 (``out_channels`` pinned to 8), as diffusers sets them; diffusers loads the result."""
    from diffusers import FluxTransformer2DModel

    model, state, _ = flux
    model.save_pretrained(tmp_path / "base" / "transformer")
    shapes = bfl_shapes(**TINY)
    shapes["img_in"] = (16, 16)
    save_file(control_lora(shapes, 8, 1, 1, seed=6), tmp_path / "ctrl.safetensors")
    convert(tmp_path / "ctrl.safetensors", "diffusers", tmp_path / "ctrl_diffusers.safetensors")
    merge(tmp_path / "base" / "transformer", [tmp_path / "ctrl.safetensors"], tmp_path / "transformer")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert (loaded.config.in_channels, loaded.config.out_channels) == (16, 8)
    oracle = _diffusers_fuse(model, load_file(tmp_path / "ctrl_diffusers.safetensors"))
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, oracle[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ fal Kontext (PEFT-wrapped BFL names)


def test_fal_kontext_peft_wrapped_lora_converts_as_diffusers_does(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_fal_kontext_lora_to_diffusers

    shapes = {k: v for k, v in bfl_shapes(**FULL_FLUX).items()
              if k.startswith(("double_blocks.", "single_blocks.")) or k == "final_layer.linear"}
    sd = factors(shapes, 2, seed=1, prefix="base_model.model.")
    save_file(sd, tmp_path / "kontext.safetensors")
    info = _info(tmp_path / "kontext.safetensors")
    assert (info["format"], info["dialect"], info["family"]) == ("peft", "peft-wrapped", "flux")
    convert(tmp_path / "kontext.safetensors", "diffusers", tmp_path / "out.safetensors")
    ours, scales = read_diffusers_file(tmp_path / "out.safetensors")
    assert assert_same_lora(ours, scales, _convert_fal_kontext_lora_to_diffusers(dict(sd))) == info["module_count"]


# ------------------------------------------------------------------ XLabs


def xlabs_lora(dim: int, double: int, single: int, mlp: int, seed: int, prefix: str = ""):
    """x-flux's LoRA processors (DoubleStreamBlockLoraProcessor qkv_lora1/2 [3D, D], proj_lora1/2 [D, D];
    SingleStreamBlockLoraProcessor qkv_lora [3D, D], proj_lora [D, D + MLP]); no alpha is saved."""
    shapes = {}
    for i in range(double):
        for n in (1, 2):
            shapes[f"double_blocks.{i}.processor.qkv_lora{n}"] = (3 * dim, dim)
            shapes[f"double_blocks.{i}.processor.proj_lora{n}"] = (dim, dim)
    for i in range(single):
        shapes[f"single_blocks.{i}.processor.qkv_lora"] = (3 * dim, dim)
        shapes[f"single_blocks.{i}.processor.proj_lora"] = (dim, dim + mlp)
    return factors(shapes, 2, seed, names=("down.weight", "up.weight"), prefix=prefix)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_lora_converts_and_merges_as_diffusers(tmp_path, flux, prefix):
    from diffusers import FluxPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    model, state, base = flux
    sd = xlabs_lora(16, 1, 1, 64, seed=2, prefix=prefix)
    save_file(sd, tmp_path / "xlabs.safetensors")
    info = _info(tmp_path / "xlabs.safetensors")
    assert (info["format"], info["dialect"], info["family"]) == ("kohya", "xlabs", "flux")
    assert info["module_count"] == 3 + 3 + 2 + 3 + 1  # q/k/v of each qkv split, the projections whole

    convert(tmp_path / "xlabs.safetensors", "diffusers", tmp_path / "out.safetensors")
    ours, scales = read_diffusers_file(tmp_path / "out.safetensors")
    assert assert_same_lora(ours, scales, _convert_xlabs_flux_lora_to_diffusers(dict(sd))) == info["module_count"]

    result = merge(base, [tmp_path / "xlabs.safetensors"], tmp_path / "merged.safetensors")
    assert not result.unmatched and result.matched == {"transformer": 12}
    oracle_state = FluxPipeline.lora_state_dict(dict(sd))
    touched = _merged_vs(_diffusers_fuse(model, oracle_state), state, tmp_path / "merged.safetensors")
    assert len(touched) == 12


# ------------------------------------------------------------------ ComfyUI / ai-toolkit BFL-named files


def test_comfyui_flux_lora_converts_as_diffusers_does(tmp_path):
    """ComfyUI LoraSave keys (``diffusion_model.`` + BFL path + kohya suffixes; CLIP-L under
    ``text_encoders.clip_l.transformer.``), which diffusers reads through its kohya Flux converter."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    shapes = bfl_shapes(**FULL_FLUX, guidance=False)
    sd = factors(shapes, 2, seed=3, names=("lora_down.weight", "lora_up.weight"), prefix="diffusion_model.")
    gen = torch.Generator().manual_seed(9)
    for k in [k for k in sd if k.endswith("lora_down.weight")]:
        # diffusers ignores the alpha of final_layer modules (its own TODO): alpha = r there
        sd[k.replace("lora_down.weight", "alpha")] = torch.tensor(
            2.0 if "final_layer" in k else float(torch.randint(1, 8, (), generator=gen)))
    clip = {f"text_model.encoder.layers.{i}.{m}": s for i in range(2) for m, s in
            (("self_attn.q_proj", (768, 768)), ("self_attn.out_proj", (768, 768)), ("mlp.fc1", (3072, 768)))}
    sd.update(factors(clip, 2, seed=4, names=("lora_down.weight", "lora_up.weight"),
                      prefix="text_encoders.clip_l.transformer.", alpha=1.0))
    save_file(sd, tmp_path / "comfy.safetensors")

    info = _info(tmp_path / "comfy.safetensors")
    # with text encoders beside it, the native layout hands the file to the comfyui dialect
    assert (info["format"], info["dialect"], info["family"]) == ("native", "comfyui", "flux")
    assert info["component_modules"] == {"transformer": 19 * 14 + 38 * 6 + 8, "text_encoder": 6}
    convert(tmp_path / "comfy.safetensors", "diffusers", tmp_path / "out.safetensors")
    ours, scales = read_diffusers_file(tmp_path / "out.safetensors")
    theirs = as_loaded(_convert_kohya_flux_lora_to_diffusers(dict(sd)))  # factors pre-scaled by alpha / r
    assert assert_same_lora(ours, scales, theirs) == info["module_count"]


@pytest.mark.parametrize("prefix, dialect", [("diffusion_model.", None), ("", "original"),
                                             ("transformer.", "original")])
def test_comfyui_flux_peft_suffixes_mean_what_the_kohya_suffixes_mean(tmp_path, flux, prefix, dialect):
    """OneTrainer's COMFY and ORIGINAL formats (convert_lora_util: BFL names behind ``diffusion_model.`` or
    none, lora_A / lora_B, alpha kept) and ai-toolkit's BFL-model saves (``transformer.``). ComfyUI's
    comfy/lora.py reads ``<x>.lora_B.weight`` exactly as ``<x>.lora_up.weight``; so the oracle is diffusers
    fusing the kohya-suffixed twin of the file."""
    from diffusers import FluxPipeline

    model, state, base = flux
    shapes = {k: v for k, v in bfl_shapes(**TINY).items() if not k.endswith("linear1")}  # diffusers: 3072 only
    peft_sd = factors(shapes, 3, seed=5, prefix=prefix, alpha=1.5)
    for k in [k for k in peft_sd if "final_layer" in k and k.endswith("alpha")]:
        peft_sd[k] = torch.tensor(3.0)  # diffusers ignores final_layer alphas
    kohya_sd = {"diffusion_model." + k[len(prefix):].replace("lora_A.weight", "lora_down.weight")
                .replace("lora_B.weight", "lora_up.weight"): v for k, v in peft_sd.items()}
    save_file(peft_sd, tmp_path / "comfy_ab.safetensors")
    save_file(kohya_sd, tmp_path / "comfy_kohya.safetensors")
    a, b = loratool.load(tmp_path / "comfy_ab.safetensors"), loratool.load(tmp_path / "comfy_kohya.safetensors")
    # a transformer-only ComfyUI file is the native layout's plain form (loratool.formats.native)
    assert (a.dialect, b.dialect, a.family, b.source_format) == (dialect, None, "flux", "native")
    assert set(a.modules) == set(b.modules)

    result = merge(base, [tmp_path / "comfy_ab.safetensors"], tmp_path / "out.safetensors")
    assert not result.unmatched
    touched = _merged_vs(_diffusers_fuse(model, as_loaded(FluxPipeline.lora_state_dict(dict(kohya_sd)))), state,
                         tmp_path / "out.safetensors")
    assert len(touched) == len(a)


def test_ai_toolkit_mix_converts_and_merges_as_diffusers(tmp_path, flux):
    """ai-toolkit mixes: diffusers names behind ``transformer.`` with kohya suffixes (diffusers'
    ``_convert_kohya_flux_lora_to_diffusers``, branch ``has_peft_state_dict``)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    model, state, base = flux
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff.net.2",
             "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn.to_v", "x_embedder"]
    shapes = {n: tuple(state[n + ".weight"].shape) for n in names}
    sd = factors(shapes, 2, seed=6, names=("lora_down.weight", "lora_up.weight"), prefix="transformer.")
    save_file(sd, tmp_path / "ait.safetensors")
    info = _info(tmp_path / "ait.safetensors")
    assert (info["format"], info["dialect"], info["family"], info["module_count"]) == \
        ("diffusers", "ai-toolkit", "flux", len(names))
    convert(tmp_path / "ait.safetensors", "diffusers", tmp_path / "out.safetensors")
    ours, scales = read_diffusers_file(tmp_path / "out.safetensors")
    theirs = as_loaded(_convert_kohya_flux_lora_to_diffusers(dict(sd)))
    assert assert_same_lora(ours, scales, theirs) == len(names)
    merge(base, [tmp_path / "ait.safetensors"], tmp_path / "merged.safetensors")
    assert len(_merged_vs(_diffusers_fuse(model, theirs), state, tmp_path / "merged.safetensors")) == len(names)


# ------------------------------------------------------------------ OneTrainer


def test_onetrainer_mixture_converts_and_merges_as_diffusers(tmp_path, flux):
    """OneTrainer's older Flux output (convert_to_mixture): ``lora_transformer_`` + diffusers names flattened,
    ``lora_te1_`` CLIP-L, an alpha per module; diffusers reads it with ``_convert_mixture_state_dict_to_diffusers``
    (which maps only attention and the top-level modules, so the file holds those)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    model, state, base = flux
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
             "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn.add_v_proj",
             "single_transformer_blocks.0.attn.to_k", "x_embedder",
             "context_embedder", "norm_out.linear", "proj_out", "time_text_embed.timestep_embedder.linear_1"]
    shapes = {"lora_transformer_" + n.replace(".", "_"): tuple(state[n + ".weight"].shape) for n in names}
    sd = factors(shapes, 4, seed=7, names=("lora_down.weight", "lora_up.weight"), alpha=2.0)
    te_names = {"text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
                "text_model.encoder.layers.1.mlp.fc2": (32, 37)}
    sd.update(factors({"lora_te1_" + n.replace(".", "_"): s for n, s in te_names.items()},
                      4, seed=8, names=("lora_down.weight", "lora_up.weight"), alpha=3.0))
    save_file(sd, tmp_path / "ot.safetensors")
    info = _info(tmp_path / "ot.safetensors")
    assert (info["format"], info["dialect"], info["family"]) == ("kohya", "onetrainer", "flux")
    assert info["component_modules"] == {"transformer": len(names), "text_encoder": 2}

    convert(tmp_path / "ot.safetensors", "diffusers", tmp_path / "out.safetensors")
    ours, scales = read_diffusers_file(tmp_path / "out.safetensors")
    theirs = as_loaded(_convert_kohya_flux_lora_to_diffusers(dict(sd)))
    assert assert_same_lora(ours, scales, theirs) == len(names) + 2

    merge(base, [tmp_path / "ot.safetensors"], tmp_path / "merged.safetensors")
    assert len(_merged_vs(_diffusers_fuse(model, theirs), state, tmp_path / "merged.safetensors")) == len(names)


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(3)
    return T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4))


def test_onetrainer_kohya_flux_with_t5_as_te2_and_dora(tmp_path, flux):
    """OneTrainer's KOHYA Flux format: BFL names under ``lora_unet_``, CLIP-L under ``lora_te1_`` and T5 under
    ``lora_te2_`` (FluxModel.lora_text_encoders: KOHYA_LORA "lora_te2"; kohya itself says lora_te3), DoRA as
    OneTrainer's default per-input ``dora_scale`` [1, in]. DoRA merge oracle: lycoris' LoCon with
    ``weight_decompose=True, wd_on_out=False`` holding the same tensors (ComfyUI's weight_decompose reads
    the [1, in] scale the same way)."""
    from lycoris.modules.locon import LoConModule

    model, state, base = flux
    t5 = tiny_t5()
    t5_paths = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.1.DenseReluDense.wo"]
    t5_state = t5.state_dict()
    sd = factors({"lora_unet_double_blocks_0_img_attn_proj": (16, 16), "lora_unet_single_blocks_0_linear2": (16, 80)},
                 2, seed=9, names=("lora_down.weight", "lora_up.weight"), alpha=1.0)
    sd.update(factors({"lora_te2_" + p.replace(".", "_"): tuple(t5_state[p + ".weight"].shape) for p in t5_paths},
                      2, seed=10, names=("lora_down.weight", "lora_up.weight"), alpha=2.0))
    gen = torch.Generator().manual_seed(11)
    sd["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = 1 + torch.rand(1, 16, generator=gen)
    save_file(sd, tmp_path / "ot_kohya.safetensors", metadata={"modelspec.architecture": "flux-1-dev/lora"})
    adapter = loratool.load(tmp_path / "ot_kohya.safetensors")
    assert (adapter.dialect, adapter.family) == ("onetrainer", "flux")
    assert {m.key for m in adapter} == {("transformer", "transformer_blocks.0.attn.to_out.0"),
                                        ("transformer", "single_transformer_blocks.0.proj_out"),
                                        *(("text_encoder_2", p) for p in t5_paths)}
    dora = adapter.modules[("transformer", "transformer_blocks.0.attn.to_out.0")]
    assert dora.hints["dora_axis"] == "in"

    result = merge(base, [tmp_path / "ot_kohya.safetensors"], tmp_path / "merged.safetensors")
    assert result.matched == {"transformer": 2} and len(result.unmatched) == 2  # no T5 in a transformer file
    merged = load_file(tmp_path / "merged.safetensors")
    org = torch.nn.Linear(16, 16, bias=False)
    org.weight.data.copy_(state["transformer_blocks.0.attn.to_out.0.weight"])
    lyco = LoConModule("x", org, 1.0, lora_dim=2, alpha=1.0, weight_decompose=True, wd_on_out=False)
    lyco.lora_down.weight.data.copy_(sd["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"])
    lyco.lora_up.weight.data.copy_(sd["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"])
    lyco.dora_scale.data.copy_(sd["lora_unet_double_blocks_0_img_attn_proj.dora_scale"])
    want, _ = lyco.get_merged_weight(1.0, org.weight.shape, None)
    got = merged["model.diffusion_model.double_blocks.0.img_attn.proj.weight"]
    assert float((got - want).norm() / (want - org.weight).norm()) < 1e-6


def test_trailing_underscore_heads_read_as_the_onetrainer_names(tmp_path):
    """SimpleTuner LoRAs converted to kohya style (ComfyUI issue #4347): ``lora_unet_`` + diffusers names + a
    trailing ``_`` (``lora_unet_single_transformer_blocks_12_attn_to_v_.lora_up.weight``)."""
    names = {"single_transformer_blocks_0_attn_to_v": (16, 16), "transformer_blocks_0_norm1_linear": (96, 16)}
    plain = factors({"lora_transformer_" + n: s for n, s in names.items()}, 2, seed=12,
                    names=("lora_down.weight", "lora_up.weight"), alpha=1.0)
    odd = {k.replace("lora_transformer_", "lora_unet_").replace(".", "_.", 1): v for k, v in plain.items()}
    save_file(plain, tmp_path / "plain.safetensors")
    save_file(odd, tmp_path / "odd.safetensors")
    a, b = loratool.load(tmp_path / "plain.safetensors"), loratool.load(tmp_path / "odd.safetensors")
    assert (b.dialect, b.family) == ("simpletuner", "flux")
    assert set(a.modules) == set(b.modules) == {("transformer", "single_transformer_blocks.0.attn.to_v"),
                                                ("transformer", "transformer_blocks.0.norm1.linear")}
    for key, m in a.modules.items():
        assert all(torch.equal(t, b.modules[key].tensors[n]) for n, t in m.tensors.items()) and m.alpha == 1.0


# ------------------------------------------------------------------ SimpleTuner


def test_simpletuner_peft_wrapped_transformer_merges_as_peft(tmp_path, flux):
    """SimpleTuner's PEFT saves of a wrapped transformer: ``transformer.base_model.model.<path>.lora_A.weight``
    (ComfyUI issue #4347), the LoraConfig packed in ``lora_adapter_metadata`` as diffusers writes it."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from tiny_models import randomize_lora

    model, state, base = flux
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "proj_out", "ff.net.2"])
    peft_model = get_peft_model(model, cfg)
    randomize_lora(peft_model, seed=13)
    sd = {"transformer." + k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert all(k.startswith("transformer.base_model.model.") for k in sd)
    packed = {f"transformer.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
    save_file(sd, tmp_path / "st.safetensors", metadata={"lora_adapter_metadata": json.dumps(packed)})
    adapter = loratool.load(tmp_path / "st.safetensors")
    assert (adapter.dialect, adapter.family, adapter.source_format) == ("simpletuner", "flux", "diffusers")
    assert {m.scale for m in adapter} == {1.5}

    merge(base, [tmp_path / "st.safetensors"], tmp_path / "merged.safetensors")
    oracle = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    touched = _merged_vs(oracle, state, tmp_path / "merged.safetensors")
    assert len(touched) == len(adapter)


def test_simpletuner_lycoris_transformer_merges_as_lycoris(tmp_path, flux):
    """SimpleTuner's LyCORIS saves: ``lycoris_<diffusers path>`` names over the transformer, header
    ``lycoris_config`` (save_hooks._save_lycoris). Oracle: lycoris' merge_to (alpha = dim: lycoris 4.1.3
    squares the LoHa scale in merge_to)."""
    model, state, base = flux
    net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=2.0, algo="loha")
    net.apply_to()
    gen = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32,
                     {"lycoris_config": json.dumps({"algo": "loha", "linear_dim": 2, "linear_alpha": 2})})
    info = _info(tmp_path / "lyco.safetensors")
    assert (info["format"], info["dialect"], info["family"], info["kinds"]) == \
        ("lycoris", "simpletuner", "flux", {"loha": len(net.loras)})
    merge(base, [tmp_path / "lyco.safetensors"], tmp_path / "merged.safetensors")
    net.merge_to(1.0)
    oracle = {k: v.detach().clone() for k, v in model.state_dict().items()}
    touched = _merged_vs(oracle, state, tmp_path / "merged.safetensors")
    assert len(touched) == len(net.loras)


@pytest.mark.parametrize("extra, says", [
    ("diffusion_model.double_blocks.0.not_a_module.lora_A.weight", "not_a_module"),  # no such module
    ("diffusion_model.double_blocks.0.img_attn.qkv.lora_Z.weight", "lora_Z"),  # no such tensor
    ("diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight_", "weight_"),
])
def test_a_key_no_rule_places_fails_the_read_naming_it(tmp_path, extra, says):
    from loratool.errors import LoratoolError

    sd = factors({"double_blocks.0.img_attn.qkv": (48, 16)}, 2, seed=0, prefix="diffusion_model.")
    sd[extra] = torch.zeros(2, 16)
    save_file(sd, tmp_path / "odd.safetensors")
    with pytest.raises(LoratoolError, match=re.escape(says)):
        loratool.load(tmp_path / "odd.safetensors")
