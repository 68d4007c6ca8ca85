"""Single-file checkpoint key maps, checked against diffusers' single-file converters on tiny
models: build the LDM/SGM/OpenCLIP/BFL state dict, let diffusers convert it back, and require
every canonical parameter to be found by ``canonical_targets`` at the stored key (and rows)
diffusers took it from."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu

from loratool.arch import checkpoints, sdxl


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=56,
    )


def sd1_unet():
    from tiny_models import tiny_unet

    return tiny_unet()


def ldm_state_dict(unet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cfg = unet.config
    up_attn = {i for i, t in enumerate(cfg.up_block_types) if t.startswith("CrossAttn")}
    out = {}
    for k, v in state.items():
        sgm = sdxl.diffusers_to_sgm(k, cfg.layers_per_block, up_attn)
        assert sgm is not None, k
        out[checkpoints.UNET_PREFIX + sgm] = v
    return out


@pytest.mark.parametrize("factory", [tiny_sdxl_unet, sd1_unet], ids=["sgm", "ldm"])
def test_unet_map_matches_diffusers_ldm_converter(factory):
    unet = factory()
    want = unet.state_dict()
    ckpt = ldm_state_dict(unet, want)
    ckpt["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(2)
    converted = sfu.convert_ldm_unet_checkpoint(dict(ckpt), dict(unet.config))
    assert set(converted) == set(want)
    for k, v in converted.items():
        assert v is want[k], k
    targets = checkpoints.canonical_targets(list(ckpt))
    for k, v in want.items():
        key, rows = targets[("unet", k)]
        assert rows is None and ckpt[key] is v, k


def tiny_clip(hidden=32, layers=2, projection=True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def hf_state(model) -> dict[str, torch.Tensor]:
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in model.state_dict().items() if "position_ids" not in k}


def open_clip_state_dict(hf: dict[str, torch.Tensor], prefix: str, layers: int) -> dict[str, torch.Tensor]:
    """The OpenCLIP layout written by hand from its definition (open_clip ``TextTransformer``)."""
    out = {
        prefix + "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        prefix + "text_projection": hf["text_projection.weight"].T.contiguous(),
    }
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf[f"{src}self_attn.{p}.{kind}"] for p in "qkv"
                                                          for p in (p + "_proj",)])
            out[f"{dst}attn.out_proj.{kind}"] = hf[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = hf[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = hf[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = hf[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = hf[f"{src}mlp.fc2.{kind}"]
    return out


@pytest.mark.parametrize("prefix,component", [("conditioner.embedders.1.model.", "text_encoder_2"),
                                              ("cond_stage_model.model.", "text_encoder")])
def test_open_clip_map_matches_diffusers_converter(prefix, component):
    model = tiny_clip()
    hf = hf_state(model)
    ckpt = open_clip_state_dict(hf, prefix, 2)
    ckpt[checkpoints.UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(1)
    if component == "text_encoder_2":
        ckpt["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.zeros(1)
    else:  # SD 2.x files carry the projection, its diffusers text encoder has none
        hf.pop("text_projection.weight")
    converted = sfu.convert_open_clip_checkpoint(model, dict(ckpt), prefix=prefix)
    assert set(converted) == set(hf)
    for k in hf:
        assert torch.equal(converted[k], hf[k]), k
    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    targets = checkpoints.canonical_targets(shapes, transforms=True)
    plain = checkpoints.canonical_targets(list(ckpt), shapes)
    for k, v in hf.items():
        t = targets[(component, k)]
        stored = ckpt[t.key] if t.rows is None else ckpt[t.key][t.rows[0]:t.rows[1]]
        assert torch.equal(checkpoints.to_stored(v, t), stored), k
        if t.transform is None:
            assert plain[(component, k)] == t
        else:
            assert (component, k) not in plain  # only callers that apply transforms get it


def test_clip_l_map_matches_diffusers_converter():
    hf = hf_state(tiny_clip(projection=False))
    for prefix in checkpoints.CLIP_PREFIXES:
        ckpt = {prefix + k: v for k, v in hf.items()}
        ckpt[checkpoints.UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(1)
        converted = sfu.convert_ldm_clip_checkpoint(dict(ckpt))
        targets = checkpoints.canonical_targets(list(ckpt))
        assert set(converted) == set(hf)
        for k, v in converted.items():
            assert ckpt[targets[("text_encoder", k)].key] is v


def bfl_state_dict(num_double: int, num_single: int) -> tuple[dict, dict]:
    """A Flux.1-shaped BFL checkpoint with thin stand-in tensors: rows are real (diffusers'
    converter hard-codes 3072 / 12288), columns are 1; every row holds a distinct number."""
    counter = iter(range(10**9))
    rows = {"qkv": 3 * 3072, "linear1": 7 * 3072}
    sd, shapes = {}, {}

    def put(key, n, width=3072):
        start = next(counter) * 100000
        sd[key] = torch.arange(start, start + n, dtype=torch.float64).reshape(n, 1)
        shapes[key] = (n, width)

    for native in checkpoints.flux.module_table(num_double, num_single):
        n = rows.get(native.rsplit(".", 1)[-1], 6)
        put(native + ".weight", n)
        put(native + ".bias", n)
        shapes[native + ".bias"] = (n,)
    for native in checkpoints.flux.norm_table(num_double, num_single):
        put(native, 4)
        shapes[native] = (4,)
    return sd, shapes


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_map_matches_diffusers_converter(prefix):
    sd, shapes = bfl_state_dict(2, 2)
    sd = {prefix + k: v for k, v in sd.items()}
    shapes = {prefix + k: v for k, v in shapes.items()}
    converted = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert checkpoints.checkpoint_family(list(sd)) == "flux"
    for targets in (checkpoints.canonical_targets(shapes, transforms=True),
                    checkpoints.canonical_targets(list(sd), transforms=True)):  # default widths
        assert {k for c, k in targets} == set(converted)
        for k, v in converted.items():
            t = targets[("transformer", k)]
            stored = sd[t.key] if t.rows is None else sd[t.key][t.rows[0]:t.rows[1]]
            assert torch.equal(checkpoints.to_stored(v, t), stored), k


def test_family_detection():
    assert checkpoints.checkpoint_family(["model.diffusion_model.input_blocks.0.0.weight",
                                          "cond_stage_model.transformer.text_model.x"]) == "sd1"
    assert checkpoints.checkpoint_family(["cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert checkpoints.checkpoint_family(["conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert checkpoints.checkpoint_family(["conditioner.embedders.0.model.ln_final.weight"]) == "sdxl_refiner"
    assert checkpoints.checkpoint_family(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]) == "sd3"
    assert checkpoints.checkpoint_family(["model.layers.0.mlp.up_proj.weight"]) is None
    assert checkpoints.canonical_targets(["model.layers.0.mlp.up_proj.weight"]) is None
