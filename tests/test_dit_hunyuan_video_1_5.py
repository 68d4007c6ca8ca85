"""HunyuanVideo 1.5 single files beyond the DiT matrix (tests/test_dit_families.py runs Tencent's release layout):
ComfyUI's repackaged ``hunyuanvideo1.5_*.safetensors``, the super-resolution models' extra keys, and LoRAs on the
1×1×1 patch embedder.

Sources of the names and of the oracles:

* Tencent-Hunyuan/HunyuanVideo-1.5 ``hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py``: the release
  names (``double_blocks.N.img_attn_q`` / ``_k`` / ``_v`` separate, ``time_r_in`` when ``use_meanflow``);
* huggingface/diffusers ``scripts/convert_hunyuan_video1_5_to_diffusers.py``: Tencent -> diffusers
  (``tiny_dit_models.convert_hv15_by_script``, a transcription: the script is not part of the diffusers package);
* musubi-tuner ``hunyuan_video_1_5/hunyuan_video_1_5_models.py``: ComfyUI's repackaged files store the double blocks'
  q / k / v fused (``img_attn_qkv``), split back by torch.chunk(3) (``tiny_dit_models.split_comfy_qkv``);
* ComfyUI ``comfy/model_detection.py`` (``time_r_in.`` -> meanflow, ``vision_in.proj.0`` -> 1.5) and
  ``comfy/supported_models.py`` (``HunyuanVideo15_SR_Distilled``: 98 input channels).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_dit_models import (
    CASES,
    HV15_TINY,
    convert_hv15_by_script,
    diffusers_fuse,
    lora_factors,
    native_checkpoint,
    native_lora,
    one_thread,  # noqa: F401  (autouse fixture)
    pipeline_class,
    split_comfy_qkv,
    tiny_model,
)

from loratool.arch import checkpoints
from loratool.ops.extract import extract_to_file
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge

CASE = CASES["hunyuan_video_1_5"]


def fuse_comfy_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tencent's file -> ComfyUI's repackaged one: each double block's ``_q`` / ``_k`` / ``_v`` weight and bias stacked
    by rows into ``_qkv`` (what musubi-tuner's split hook takes apart)."""
    out = {}
    for key, value in sd.items():
        if any(f"{s}_attn_q.{p}" in key for s in ("img", "txt") for p in ("weight", "bias")):
            out[key.replace("_attn_q.", "_attn_qkv.")] = torch.cat(
                [value, sd[key.replace("_attn_q.", "_attn_k.")], sd[key.replace("_attn_q.", "_attn_v.")]])
        elif not any(f"{s}_attn_{p}." in key for s in ("img", "txt") for p in "kv"):
            out[key] = value
    return out


def from_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' state dict of a ComfyUI repackaged file: musubi-tuner's split, then the script's rules."""
    return convert_hv15_by_script(split_comfy_qkv(dict(sd)))


def relerr(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> float:
    return float((got - want).norm() / (want - base).norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def comfy_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hv15_comfy")
    state = {k: v.clone() for k, v in tiny_model(CASE).state_dict().items()}
    comfy = fuse_comfy_qkv(native_checkpoint(CASE, state))
    assert "double_blocks.0.img_attn_qkv.weight" in comfy and "double_blocks.0.img_attn_q.weight" not in comfy
    save_file(comfy, tmp / "hunyuanvideo1.5_480p_t2v_fp16.safetensors")
    lora = native_lora(CASE, lora_factors(CASE, state, seed=3))
    save_file(lora, tmp / "lora.safetensors")
    return tmp, state, comfy, lora


def test_comfy_repackaged_file_maps_as_musubi_and_the_script_read_it(comfy_file):
    _, state, comfy, _ = comfy_file
    back = from_comfy(comfy)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())  # the file is the model
    assert checkpoints.checkpoint_family(comfy) == "hunyuan_video_1_5"
    prefixed = {"model.diffusion_model." + k: v for k, v in comfy.items()}
    assert checkpoints.checkpoint_family(prefixed) == "hunyuan_video_1_5"
    targets = checkpoints.canonical_targets({k: tuple(v.shape) for k, v in comfy.items()}, transforms=True)
    assert {p for _, p in targets} == set(state)
    for (_, param), t in targets.items():
        stored = comfy[t.key] if t.rows is None else comfy[t.key][t.rows[0]:t.rows[1]]
        assert torch.equal(checkpoints.to_stored(stored, t), back[param]), param
    # the fused q / k / v are the only row slices; the final modulation the only swapped halves
    sliced = {t.key for t in targets.values() if t.rows is not None}
    assert sliced == {f"double_blocks.{i}.{s}_attn_qkv.{p}" for i in range(2) for s in ("img", "txt")
                      for p in ("weight", "bias")} | {f"txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv.{p}"
                                                      for i in range(2) for p in ("weight", "bias")}
    assert {t.key for t in targets.values() if t.transform} == {"final_layer.adaLN_modulation.1.weight",
                                                                 "final_layer.adaLN_modulation.1.bias"}


def test_merge_into_comfy_file_equals_fuse_lora(comfy_file, tmp_path):
    """A musubi / ComfyUI-format LoRA merged into ComfyUI's fused file: read through musubi-tuner's split and the
    script's rules, the result is what PEFT's fuse_lora makes of the script-converted LoRA on the diffusers model;
    the file keeps its fused layout."""
    tmp, state, comfy, lora = comfy_file
    oracle = diffusers_fuse(CASE, tiny_model(CASE), lora)
    result = merge(tmp / "hunyuanvideo1.5_480p_t2v_fp16.safetensors", [tmp / "lora.safetensors"],
                   tmp_path / "out.safetensors")
    modules = {k.rsplit(".lora_", 1)[0] for k in pipeline_class(CASE).lora_state_dict(lora)}
    assert not result.unmatched and result.matched == {"transformer": len(modules)}
    merged = load_file(tmp_path / "out.safetensors")
    assert set(merged) == set(comfy)
    got = from_comfy(merged)
    touched = {k for k in state if not torch.equal(oracle[k], state[k])}
    assert "transformer_blocks.0.attn.to_k.weight" in touched and "norm_out.linear.weight" in touched
    for k in state:
        if k in touched:
            assert relerr(got[k], oracle[k], state[k]) <= 1e-14, k  # measured ≤ 2.3e-16 (float64)
        else:
            assert torch.equal(got[k], state[k]), k


def test_extract_from_comfy_file(comfy_file, tmp_path):
    tmp, state, _, _ = comfy_file
    base = tmp / "hunyuanvideo1.5_480p_t2v_fp16.safetensors"
    merge(base, [tmp / "lora.safetensors"], tmp_path / "ft.safetensors")
    result = extract_to_file(tmp_path / "ft.safetensors", base, tmp_path / "x.safetensors", rank=64, exact=True,
                             dtype=torch.float64, out_dtype=torch.float64)
    assert result.modules and max(m.rel_error for m in result.modules) <= 1e-10
    assert not result.not_extracted
    merge(base, [tmp_path / "x.safetensors"], tmp_path / "back.safetensors")
    want, got = from_comfy(load_file(tmp_path / "ft.safetensors")), from_comfy(load_file(tmp_path / "back.safetensors"))
    assert set(want) == set(got) == set(state)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-12), k


def test_info_on_comfy_file(comfy_file):
    tmp, _, _, _ = comfy_file
    report = inspect(tmp / "hunyuanvideo1.5_480p_t2v_fp16.safetensors")
    assert (report.family, report.variant) == ("hunyuan_video_1_5", "T2V / I2V")
    assert report.unmapped == [] and not report.warnings


def test_super_resolution_file_names_what_the_script_drops(tmp_path):
    """The super-resolution models (98 input channels) add ``time_r_in`` (use_meanflow): diffusers' script maps it
    to nothing, so neither does loratool. ``info`` lists each of those keys, merge copies them untouched and
    ``extract`` reports each one that differs — never dropped silently."""
    state = {k: v.clone() for k, v in tiny_model(CASE, dict(HV15_TINY, in_channels=98)).state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    shapes = {"time_r_in.mlp.0.weight": (16, 256), "time_r_in.mlp.0.bias": (16,), "time_r_in.mlp.2.weight": (16, 16),
              "time_r_in.mlp.2.bias": (16,)}  # Tencent's TimestepEmbedder, as time_in
    meanflow = {k: torch.randn(*shape, generator=gen, dtype=torch.float64) for k, shape in shapes.items()}
    sr = {**native_checkpoint(CASE, state), **meanflow}
    left = dict(sr)
    assert set(convert_hv15_by_script(left)) == set(state) and set(left) == set(meanflow)  # what the script drops
    save_file(sr, tmp_path / "sr.safetensors")
    report = inspect(tmp_path / "sr.safetensors")
    assert (report.family, report.variant) == ("hunyuan_video_1_5", "super-resolution")
    assert report.unmapped == sorted(meanflow)
    lora = {k: v for k, v in native_lora(CASE, lora_factors(CASE, state, seed=3)).items()}
    save_file(lora, tmp_path / "lora.safetensors")
    merge(tmp_path / "sr.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "ft.safetensors")
    ft = load_file(tmp_path / "ft.safetensors")
    assert all(torch.equal(ft[k], v) for k, v in meanflow.items())
    ft["time_r_in.mlp.0.weight"] = ft["time_r_in.mlp.0.weight"] + 1.0  # a fine-tune that trained it too
    save_file(ft, tmp_path / "ft2.safetensors")
    result = extract_to_file(tmp_path / "ft2.safetensors", tmp_path / "sr.safetensors", tmp_path / "x.safetensors",
                             rank=8, dtype=torch.float64)
    skipped = {s.name: s.reason for s in result.not_extracted}
    assert set(skipped) == set(meanflow) and all("no canonical name" in r for r in skipped.values())


def test_patch_embedder_lora_equals_peft_forward(tmp_path):
    """``img_in.proj`` is a 1×1×1 Conv3d (patch size 1). PEFT 0.21's get_delta_weight fails on it (it takes every
    kernel whose size[2:4] is (1, 1) for a 1×1 Conv2d), so fuse_lora cannot be the oracle: the merged convolution is
    held against PEFT's forward of the unmerged adapter instead, on random input. The LoRA's input channels (65)
    name the variant."""
    import torch.nn.functional as F

    state = {k: v.clone() for k, v in tiny_model(CASE).state_dict().items()}
    save_file(native_checkpoint(CASE, state), tmp_path / "base.safetensors")
    gen = torch.Generator().manual_seed(9)
    head = "diffusion_model.img_in.proj"
    lora = {f"{head}.lora_A.weight": torch.randn(3, 65, 1, 1, 1, generator=gen, dtype=torch.float64),
            f"{head}.lora_B.weight": torch.randn(16, 3, 1, 1, 1, generator=gen, dtype=torch.float64),
            f"{head}.alpha": torch.tensor(2.0, dtype=torch.float64)}
    # img_in.proj alone is a HunyuanVideo 1.0 name too: musubi-tuner's modelspec (utils/sai_model_spec.py
    # ARCH_HUNYUAN_VIDEO_1_5 = "hunyuan-video-1.5", + "/lora") says which
    save_file(lora, tmp_path / "lora.safetensors", metadata={"modelspec.architecture": "hunyuan-video-1.5/lora"})
    assert inspect(tmp_path / "lora.safetensors").variant == "T2V / I2V"
    result = merge(tmp_path / "base.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    assert result.matched == {"transformer": 1}
    merged = convert_hv15_by_script(load_file(tmp_path / "out.safetensors"))
    model = tiny_model(CASE)
    model.load_state_dict(state)
    model.load_lora_adapter(pipeline_class(CASE).lora_state_dict(lora), prefix="transformer")
    x = torch.randn(2, 65, 3, 4, 4, generator=gen, dtype=torch.float64)
    want = model.x_embedder.proj(x)  # PEFT: base convolution + lora_B(lora_A(x)) · scaling
    base = F.conv3d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"])
    got = F.conv3d(x, merged["x_embedder.proj.weight"], merged["x_embedder.proj.bias"])
    assert float((got - want).norm() / (want - base).norm()) <= 1e-14  # measured 4.1e-16
    for k in state:
        if k != "x_embedder.proj.weight":
            assert torch.equal(merged[k], state[k]), k
