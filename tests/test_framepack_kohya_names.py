"""FramePack LoRAs keep diffusers' names in kohya files; plain HunyuanVideo LoRAs keep Tencent's.

musubi-tuner (kohya-ss/musubi-tuner) builds its FramePack LoRAs in src/musubi_tuner/networks/lora_framepack.py:
``lora.create_network(["HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"], "lora_unet", ...)``
with norms excluded, and src/musubi_tuner/networks/lora.py ``create_modules`` names each Linear
``f"{pfx}.{original_name}".replace(".", "_")``, ``original_name`` being its path in the diffusers-named model of
src/musubi_tuner/frame_pack/hunyuan_video_packed.py: ``lora_unet_transformer_blocks_0_attn_to_q``,
``lora_unet_transformer_blocks_0_attn_add_q_proj``, ``lora_unet_single_transformer_blocks_0_proj_mlp``.
Its metadata ``modelspec.architecture`` is ``framepack`` (src/musubi_tuner/utils/sai_model_spec.py ARCH_FRAMEPACK).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from loratool.ops.convert import convert

# musubi-tuner FramePack LoRA targets (diffusers paths, block 0): (out, in) features at width 16
MUSUBI_FRAMEPACK = {
    "transformer_blocks.0.attn.to_q": (16, 16),
    "transformer_blocks.0.attn.to_k": (16, 16),  # no to_v: a lone part must not become a fused img_attn_qkv
    "transformer_blocks.0.attn.add_q_proj": (16, 16),
    "transformer_blocks.0.attn.to_out.0": (16, 16),
    "transformer_blocks.0.attn.to_add_out": (16, 16),
    "transformer_blocks.0.ff.net.0.proj": (64, 16),
    "transformer_blocks.0.ff_context.net.2": (16, 64),
    "single_transformer_blocks.0.attn.to_q": (16, 16),
    "single_transformer_blocks.0.proj_mlp": (64, 16),
    "single_transformer_blocks.0.proj_out": (16, 80),
}


def musubi_file(path, metadata, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    lora = {}
    for module, (out, inp) in MUSUBI_FRAMEPACK.items():
        head = "lora_unet_" + module.replace(".", "_")
        lora[f"{head}.lora_down.weight"] = torch.randn(4, inp, generator=gen).to(dtype)
        lora[f"{head}.lora_up.weight"] = torch.randn(out, 4, generator=gen).to(dtype)
        lora[f"{head}.alpha"] = torch.tensor(2.0, dtype=dtype)
    save_file(lora, path, metadata=metadata)
    return lora


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def test_musubi_framepack_kohya_round_trips_key_for_key(tmp_path):
    lora = musubi_file(tmp_path / "fp.safetensors", {"modelspec.architecture": "framepack/lora"})
    convert(tmp_path / "fp.safetensors", "kohya", tmp_path / "out.safetensors")
    assert_bit_identical(load_file(tmp_path / "out.safetensors"), lora)
    # through diffusers and back: the metadata still says FramePack
    convert(tmp_path / "fp.safetensors", "diffusers", tmp_path / "d.safetensors")
    convert(tmp_path / "d.safetensors", "kohya", tmp_path / "back.safetensors")
    assert_bit_identical(load_file(tmp_path / "back.safetensors"), lora)


def test_diffusers_named_kohya_heads_are_remembered_on_read(tmp_path):
    """A kohya file of the family whose heads are diffusers names (metadata saying only HunyuanVideo) is written
    back in those names: the reader records them (hints["kohya_names"])."""
    lora = musubi_file(tmp_path / "fp.safetensors", {"modelspec.architecture": "hunyuan-video/lora"})
    convert(tmp_path / "fp.safetensors", "kohya", tmp_path / "out.safetensors")
    assert_bit_identical(load_file(tmp_path / "out.safetensors"), lora)


def test_diffusers_framepack_lora_gets_musubi_names(tmp_path):
    """A diffusers-layout LoRA with a module only FramePack has (image_projection) and no metadata."""
    gen = torch.Generator().manual_seed(4)
    paths = {**MUSUBI_FRAMEPACK, "image_projection.up": (48, 12)}
    peft, want = {}, {}
    for module, (out, inp) in paths.items():
        a = torch.randn(4, inp, generator=gen, dtype=torch.float32)
        b = torch.randn(out, 4, generator=gen, dtype=torch.float32)
        peft[f"transformer.{module}.lora_A.weight"] = a
        peft[f"transformer.{module}.lora_B.weight"] = b
        want[module] = b.double() @ a.double()  # diffusers: no alphas, scale 1
    save_file(peft, tmp_path / "d.safetensors")
    convert(tmp_path / "d.safetensors", "kohya", tmp_path / "k.safetensors")
    got = load_file(tmp_path / "k.safetensors")
    heads = {k.split(".", 1)[0] for k in got}
    assert heads == {"lora_unet_" + m.replace(".", "_") for m in paths}
    for module, delta in want.items():
        head = "lora_unet_" + module.replace(".", "_")
        down, up = got[f"{head}.lora_down.weight"], got[f"{head}.lora_up.weight"]
        alpha = float(got[f"{head}.alpha"]) if f"{head}.alpha" in got else down.shape[0]
        assert torch.equal(up.double() @ down.double() * (alpha / down.shape[0]), delta), module


def test_plain_hunyuan_video_lora_keeps_tencent_names(tmp_path):
    gen = torch.Generator().manual_seed(5)
    peft = {}
    modules = {"transformer_blocks.0.attn.to_q": (16, 16), "transformer_blocks.0.attn.to_k": (16, 16),
               "transformer_blocks.0.attn.to_v": (16, 16), "transformer_blocks.0.ff.net.0.proj": (64, 16),
               "context_embedder.token_refiner.refiner_blocks.0.attn.to_out.0": (16, 16)}
    for module, (out, inp) in modules.items():
        peft[f"transformer.{module}.lora_A.weight"] = torch.randn(4, inp, generator=gen)
        peft[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 4, generator=gen)
    save_file(peft, tmp_path / "hv.safetensors")
    convert(tmp_path / "hv.safetensors", "kohya", tmp_path / "k.safetensors")
    heads = {k.split(".", 1)[0] for k in load_file(tmp_path / "k.safetensors")}
    assert heads == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_mlp_fc1",
                     "lora_unet_txt_in_individual_token_refiner_blocks_0_self_attn_proj"}
    # and a Tencent-named kohya file round trips in Tencent names
    convert(tmp_path / "k.safetensors", "kohya", tmp_path / "k2.safetensors")
    assert_bit_identical(load_file(tmp_path / "k2.safetensors"), load_file(tmp_path / "k.safetensors"))
