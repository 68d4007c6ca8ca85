"""Family-specific DiT behaviour beyond the shared matrix of tests/test_dit_families.py: swapped modulation
halves where diffusers' LoRA converter and weight converter disagree, LoRAs for a sibling family or variant
(Flux.1 on Chroma), detection by shapes where names are shared (FLUX.2 vs Flux.1, Z-Image vs Lumina 2)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_dit_models import CASES, converter, native_checkpoint, one_thread, peft_deltas, tiny_model  # noqa: F401

import loratool
from loratool.ops.convert import convert
from loratool.ops.merge import merge


def swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


def test_flux2_final_modulation_follows_the_weights(tmp_path):
    """BFL stores final_layer.adaLN_modulation.1 as [shift; scale]; diffusers' weight converter
    (convert_flux2_transformer_checkpoint_to_diffusers) swaps it into norm_out.linear [scale; shift], its LoRA
    converter (_convert_non_diffusers_flux2_lora_to_diffusers) does not swap the LoRA's rows. A native LoRA
    applies to the native weight as stored (ComfyUI); loratool's diffusers output must then be the swapped ΔW,
    i.e. agree with the weight converter."""
    import diffusers

    case = CASES["flux2"]
    model = tiny_model(case)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    native = native_checkpoint(case, state)
    save_file(native, tmp_path / "base.safetensors")
    gen = torch.Generator().manual_seed(5)
    down = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    up = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    key = "diffusion_model.final_layer.adaLN_modulation.1"
    # one module alone is ambiguous (Z-Image and Lumina 2 have a final_layer.adaLN_modulation.1 too): musubi-tuner's
    # modelspec names the family
    save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, tmp_path / "lora.safetensors",
              metadata={"modelspec.architecture": "Flux.2-dev/lora"})

    merge(tmp_path / "base.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    merged = load_file(tmp_path / "out.safetensors")
    stored = "final_layer.adaLN_modulation.1.weight"
    assert torch.allclose(merged[stored], native[stored] + up @ down, rtol=0, atol=1e-12)
    back = converter(case, case.single_file)(dict(merged))
    assert torch.allclose(back["norm_out.linear.weight"], state["norm_out.linear.weight"] + swap(up @ down),
                          rtol=0, atol=1e-12)

    convert(tmp_path / "lora.safetensors", "diffusers", tmp_path / "d.safetensors")
    state_d, metadata = diffusers.Flux2Pipeline.lora_state_dict(str(tmp_path / "d.safetensors"),
                                                                  return_lora_metadata=True)
    fresh = tiny_model(case)
    fresh.load_lora_adapter(state_d, prefix="transformer", metadata=metadata)
    delta = peft_deltas(fresh)["norm_out.linear"]
    assert torch.allclose(delta, swap(up @ down), rtol=0, atol=1e-12)


def test_flux1_lora_on_chroma_reports_the_modulation_it_cannot_place(tmp_path):
    """A kohya Flux.1 LoRA (sd-scripts names, ss_base_model_version flux1) on a Chroma single file: the attention
    and MLP modules merge; per-block modulation and the timestep / pooled-text embedders have no place in Chroma
    (its distilled_guidance_layer replaces them) and come back as two named groups with that reason."""
    case = CASES["chroma"]
    state = tiny_model(case).state_dict()
    save_file(native_checkpoint(case, dict(state)), tmp_path / "chroma.safetensors")
    gen = torch.Generator().manual_seed(2)
    shapes = {"double_blocks_0_img_attn_proj": (16, 16), "double_blocks_0_img_mod_lin": (96, 16),
              "double_blocks_0_txt_mod_lin": (96, 16), "single_blocks_0_modulation_lin": (48, 16),
              "time_in_in_layer": (16, 256), "vector_in_in_layer": (16, 768)}
    lora = {}
    for head, (out, inp) in shapes.items():
        lora[f"lora_unet_{head}.lora_down.weight"] = torch.randn(2, inp, generator=gen)
        lora[f"lora_unet_{head}.lora_up.weight"] = torch.randn(out, 2, generator=gen)
    save_file(lora, tmp_path / "flux1.safetensors", metadata={"ss_base_model_version": "flux1"})
    assert loratool.load(tmp_path / "flux1.safetensors").modules  # a Flux.1 LoRA, read as such

    result = merge(tmp_path / "chroma.safetensors", [tmp_path / "flux1.safetensors"], tmp_path / "out.safetensors")
    groups = {g["group"].split(" (")[0]: g for g in result.unmatched_groups}
    assert groups["per-block modulation"]["module_count"] == 3
    assert "distilled_guidance_layer" in groups["per-block modulation"]["reason"]
    assert groups["timestep / guidance / pooled-text embedders and the final modulation"]["module_count"] == 2
    assert result.matched == {"transformer": 1}


@pytest.mark.parametrize("family, rows, expect", [("flux2", 9, "flux2"), ("flux", 7, "flux")])
def test_flux2_and_flux1_native_loras_are_told_apart_by_shape(tmp_path, family, rows, expect):
    """Same BFL names (``single_blocks.0.linear1``): FLUX.2's holds 3·D + 2·3·D rows, Flux.1's 3·D + 4·D."""
    d = 16
    sd = {"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.randn(2, d),
          "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.randn(rows * d, 2),
          "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, d),
          "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * d, 2)}
    save_file(sd, tmp_path / "l.safetensors")
    assert loratool.load(tmp_path / "l.safetensors").family == expect


@pytest.mark.parametrize("family, rows", [("flux2", 9), ("flux", 7)])
def test_flux2_and_flux1_kohya_loras_are_told_apart_by_shape(tmp_path, family, rows):
    """The same file in kohya names (musubi-tuner / sd-scripts: ``lora_unet_single_blocks_0_linear1``; no
    metadata, no FLUX.2-only module): the rows of linear1 decide, in a full read, header-only ``info`` and the
    folder scan, and the modules equal those of the BFL-named twin the test above tells apart."""
    d = 16
    gen = torch.Generator().manual_seed(4)
    shapes = {"single_blocks.0.linear1": (rows * d, d), "double_blocks.0.img_attn.qkv": (3 * d, d)}
    kohya, native = {}, {}
    for path, (out, inp) in shapes.items():
        down, up = torch.randn(2, inp, generator=gen), torch.randn(out, 2, generator=gen)
        head = "lora_unet_" + path.replace(".", "_")
        kohya.update({f"{head}.lora_down.weight": down, f"{head}.lora_up.weight": up,
                      f"{head}.alpha": torch.tensor(2.0)})
        native.update({f"diffusion_model.{path}.lora_A.weight": down, f"diffusion_model.{path}.lora_B.weight": up})
    save_file(kohya, tmp_path / "k.safetensors")
    save_file(native, tmp_path / "n.safetensors")
    got, want = loratool.load(tmp_path / "k.safetensors"), loratool.load(tmp_path / "n.safetensors")
    assert got.family == want.family == family
    from loratool.delta import delta_weight
    from loratool.ops.inspect import inspect
    from loratool.ops.scan import scan

    assert {m.path for m in got} == {m.path for m in want}
    for m in want:  # both scale 1 (kohya alpha 2 = rank; BFL names store no alpha)
        assert torch.equal(delta_weight(got.modules[m.key], dtype=torch.float64), delta_weight(m, dtype=torch.float64))
    assert inspect(tmp_path / "k.safetensors").family == family  # header-only
    assert {e.path.rsplit("/", 1)[1]: e.family for e in scan(tmp_path, workers=1).entries} == {
        "k.safetensors": family, "n.safetensors": family}


def test_ltx_video_renamed_modules_land_where_diffusers_puts_the_weights(tmp_path):
    """A native LTX-Video LoRA on ``patchify_proj`` / ``adaln_single.linear`` (Lightricks names; diffusers' LoRA
    converter does not rename them): merged into the native single file it changes exactly what diffusers'
    weight converter (convert_ltx_transformer_checkpoint_to_diffusers) calls ``proj_in`` / ``time_embed.linear``,
    and merged into the diffusers folder it changes those same weights by the same ΔW."""
    case = CASES["ltx_video"]
    model = tiny_model(case)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(native_checkpoint(case, state), tmp_path / "base.safetensors")
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    gen = torch.Generator().manual_seed(9)
    lora, deltas = {}, {}
    for native, canonical in (("patchify_proj", "proj_in"), ("adaln_single.linear", "time_embed.linear")):
        out, inp = state[f"{canonical}.weight"].shape
        down = torch.randn(2, inp, generator=gen, dtype=torch.float64)
        up = torch.randn(out, 2, generator=gen, dtype=torch.float64)
        lora[f"diffusion_model.{native}.lora_A.weight"], lora[f"diffusion_model.{native}.lora_B.weight"] = down, up
        deltas[f"{canonical}.weight"] = up @ down
    save_file(lora, tmp_path / "lora.safetensors")
    merge(tmp_path / "base.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    merge(tmp_path / "transformer", [tmp_path / "lora.safetensors"], tmp_path / "out")
    from_file = converter(case, case.single_file)(load_file(tmp_path / "out.safetensors"))
    from_folder = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    for k, v in state.items():
        want = v + deltas.get(k, 0)
        assert torch.allclose(from_file[k], want, rtol=0, atol=1e-12), k
        assert torch.allclose(from_folder[k], want, rtol=0, atol=1e-12), k


def test_wan_fun_and_musubi_kohya_names_read_alike(tmp_path):
    """VideoX-Fun (Wan-Fun) writes ``lora_unet__blocks_0_...`` (an empty module name before the path), musubi-tuner
    ``lora_unet_blocks_0_...`` (networks/lora.py)."""
    gen = torch.Generator().manual_seed(1)
    heads = ["blocks_0_self_attn_q", "blocks_1_cross_attn_o", "blocks_0_ffn_2"]
    for prefix in ("lora_unet_", "lora_unet__"):
        sd = {}
        for h in heads:
            sd[f"{prefix}{h}.lora_down.weight"] = torch.randn(2, 16, generator=gen)
            sd[f"{prefix}{h}.lora_up.weight"] = torch.randn(16, 2, generator=gen)
        save_file(sd, tmp_path / "l.safetensors")
        adapter = loratool.load(tmp_path / "l.safetensors")
        want = ["blocks.0.attn1.to_q", "blocks.0.ffn.net.2", "blocks.1.attn2.to_out.0"]
        assert sorted(m.path for m in adapter) == want


def test_wan_lightx2v_full_diffs_merge_as_comfyui_applies_them(tmp_path):
    """lightx2v / CausVid distill files carry ``.diff`` / ``.diff_b`` for whole weights, norm layers included
    (diffusers' Wan converter drops the norm ones as "zeroed"; ComfyUI adds them): W + diff, b + diff_b, into the
    native single file and the diffusers folder alike."""
    case = CASES["wan"]
    model = tiny_model(case)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(native_checkpoint(case, state), tmp_path / "base.safetensors")
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    gen = torch.Generator().manual_seed(4)
    lora, want = {}, dict(state)
    for native, canonical in (("blocks.0.norm3", "blocks.0.norm2"), ("head.head", "proj_out"),
                              ("blocks.1.self_attn.norm_q", "blocks.1.attn1.norm_q")):
        for suffix, param in (("diff", "weight"), ("diff_b", "bias")):
            key = f"{canonical}.{param}"
            if key not in state:
                continue
            d = torch.randn(state[key].shape, generator=gen, dtype=torch.float64)
            lora[f"diffusion_model.{native}.{suffix}"] = d
            want[key] = state[key] + d
    save_file(lora, tmp_path / "diff.safetensors")
    merge(tmp_path / "base.safetensors", [tmp_path / "diff.safetensors"], tmp_path / "out.safetensors")
    merge(tmp_path / "transformer", [tmp_path / "diff.safetensors"], tmp_path / "out")
    from_file = converter(case, case.single_file)(load_file(tmp_path / "out.safetensors"))
    from_folder = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    for k in state:
        assert torch.allclose(from_file[k], want[k], rtol=0, atol=1e-12), k
        assert torch.allclose(from_folder[k], want[k], rtol=0, atol=1e-12), k


@pytest.mark.parametrize("metadata, expert", [
    ({"modelspec.timestep_range": "875,1000"}, "high-noise"),
    ({"modelspec.timestep_range": "0,875"}, "low-noise"),
    ({"ss_sd_model_name": "wan2.2_t2v_low_noise_14B_fp16.safetensors"}, "low-noise"),
])
def test_wan22_expert_from_metadata(tmp_path, metadata, expert):
    """musubi-tuner writes the trained timestep range as ``modelspec.timestep_range`` (training/trainer_base.py,
    utils/sai_model_spec.py) and the DiT file name as ``ss_sd_model_name``: the A14B expert a LoRA is for."""
    from loratool.ops.inspect import inspect

    sd = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(2, 5120),
          "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(5120, 2)}
    save_file(sd, tmp_path / "l.safetensors", metadata={"modelspec.architecture": "wan2.1/lora", **metadata})
    report = inspect(tmp_path / "l.safetensors")
    assert report.family == "wan" and report.variant == f"Wan 2.2 A14B {expert} expert (T2V or I2V)"


@pytest.mark.parametrize("name, variant", [
    ("wan2.1-t2v-1.3b", "T2V 1.3B"), ("wan2.1-t2v-14b", "T2V 14B"), ("wan2.1-i2v-14b", "Wan 2.1 I2V 14B"),
    ("wan2.2-ti2v-5b", "Wan 2.2 TI2V 5B"), ("wan2.2-i2v-a14b", "Wan 2.2 I2V 14B"),
])
def test_wan_base_variant_from_published_configs(name, variant):
    """The variant of a Wan base from its shapes, on the published configs (diffusers' model on the meta device)."""
    import diffusers

    from loratool.arch import dit, wan
    from loratool.arch.generate import meta_model

    cfg = dict(dit.get("wan").data["variants"][name])
    model = meta_model(lambda: diffusers.WanTransformer3DModel(**cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert wan.base_variant(shapes) == variant


@pytest.mark.parametrize("timesteps, expert", [("0,875", "transformer_2"), ("875,1000", "transformer")])
def test_wan22_a14b_pipeline_routes_a_lora_to_its_expert(tmp_path, timesteps, expert):
    """Wan 2.2 A14B (diffusers Wan-AI/Wan2.2-T2V-A14B-Diffusers): transformer/ is the high-noise expert,
    transformer_2/ the low-noise one; musubi-tuner records the trained range in modelspec.timestep_range."""
    import json

    from tiny_dit_models import WAN_TINY, lora_factors

    case = CASES["wan"]
    experts = {}
    for i, name in enumerate(("transformer", "transformer_2")):
        model = tiny_model(case, WAN_TINY, seed=i)
        model.save_pretrained(tmp_path / "pipe" / name, safe_serialization=True)
        experts[name] = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
         "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}))
    i2v = tiny_model(case).state_dict()  # the case's targets include I2V modules: keep the T2V ones
    factors = {p: f for p, f in lora_factors(case, i2v, seed=3).items() if "img" not in p}
    from tiny_dit_models import kohya_lora

    save_file(kohya_lora(factors), tmp_path / "l.safetensors",
              metadata={"modelspec.architecture": "wan2.1/lora", "modelspec.timestep_range": timesteps})
    result = merge(tmp_path / "pipe", [tmp_path / "l.safetensors"], tmp_path / "out")
    assert result.matched == {expert: len(factors)}
    for name, state in experts.items():
        merged = load_file(tmp_path / "out" / name / "diffusion_pytorch_model.safetensors")
        changed = any(not torch.equal(merged[k], v) for k, v in state.items())
        assert changed == (name == expert), name
    # the low-noise expert's folder on its own is a transformer too
    alone = merge(tmp_path / "pipe" / "transformer_2", [tmp_path / "l.safetensors"], tmp_path / "alone")
    assert alone.matched == {"transformer": len(factors)}


def test_hunyuan_video_1_5_musubi_and_comfy_names(tmp_path):
    """HunyuanVideo 1.5 has no diffusers LoRA converter. musubi-tuner names (split q / k / v: lora_unet_double_blocks_0
    _img_attn_q, img_mlp_fc1, img_mod_linear) and ComfyUI's (musubi-tuner's convert_hunyuan_video_1_5_lora_to_comfy.py:
    q / k / v concatenated into img_attn_qkv with a block-diagonal up and alpha × 3) read to the same modules; the
    diffusers file loratool writes loads into diffusers' HunyuanVideo15Transformer3DModel with every key placed,
    and PEFT's fuse of it equals loratool's merge into the transformer/ folder."""
    case = CASES["hunyuan_video_1_5"]
    model = tiny_model(case)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    gen = torch.Generator().manual_seed(3)
    split, comfy = {}, {}
    for s in ("img", "txt"):
        downs, ups = [], []
        for p in "qkv":
            head = f"lora_unet_double_blocks_0_{s}_attn_{p}"
            down, up = torch.randn(2, 16, generator=gen, dtype=torch.float64), torch.randn(16, 2, generator=gen,
                                                                                         dtype=torch.float64)
            split.update({f"{head}.lora_down.weight": down, f"{head}.lora_up.weight": up,
                          f"{head}.alpha": torch.tensor(1.0, dtype=torch.float64)})
            downs.append(down)
            ups.append(up)
        head = f"lora_unet_double_blocks_0_{s}_attn_qkv"
        comfy.update({f"{head}.lora_down.weight": torch.cat(downs), f"{head}.lora_up.weight": torch.block_diag(*ups),
                      f"{head}.alpha": torch.tensor(3.0, dtype=torch.float64)})
    for musubi_name, comfy_name, out, inp in (("img_mlp_fc1", "img_mlp_0", 64, 16), ("img_mod_linear", "img_mod_lin",
                                                                                       96, 16)):
        down, up = torch.randn(2, inp, generator=gen, dtype=torch.float64), torch.randn(out, 2, generator=gen,
                                                                                      dtype=torch.float64)
        for sd, name in ((split, musubi_name), (comfy, comfy_name)):
            sd[f"lora_unet_double_blocks_0_{name}.lora_down.weight"] = down
            sd[f"lora_unet_double_blocks_0_{name}.lora_up.weight"] = up
    meta = {"modelspec.architecture": "hunyuan-video-1.5/lora"}
    save_file(split, tmp_path / "musubi.safetensors", metadata=meta)
    save_file(comfy, tmp_path / "comfy.safetensors", metadata=meta)
    a, b = (loratool.load(tmp_path / f"{n}.safetensors") for n in ("musubi", "comfy"))
    assert {m.hints["kohya_family"] for m in [*a, *b]} == {"hunyuan_video_1_5"}
    assert {m.path for m in a} == {m.path for m in b}
    from loratool.delta import delta_weight

    for m in a:
        other = b.modules[m.key]
        assert torch.allclose(delta_weight(other, dtype=torch.float64), delta_weight(m, dtype=torch.float64),
                              rtol=0, atol=1e-12), m.path

    convert(tmp_path / "musubi.safetensors", "diffusers", tmp_path / "d.safetensors")
    peft_state = load_file(tmp_path / "d.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "d.safetensors", "pt") as f:
        import json

        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    fresh = tiny_model(case)
    fresh.load_state_dict(state)
    fresh.load_lora_adapter(peft_state, prefix="transformer", metadata=metadata)
    injected = {k for k in fresh.state_dict() if "lora_" in k}
    assert len(injected) == len(peft_state)  # every key of the file placed, no module left without one
    fresh.fuse_lora()
    from tiny_dit_models import fused_state

    oracle = fused_state(fresh)
    merge(tmp_path / "transformer", [tmp_path / "comfy.safetensors"], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    changed = 0
    for k, v in state.items():
        assert torch.allclose(merged[k], oracle[k], rtol=0, atol=1e-12), k
        changed += not torch.equal(oracle[k], v)
    assert changed == 8  # q, k, v, add_q, add_k, add_v, ff.net.0.proj, norm1.linear


def test_hidream_simpletuner_lycoris_names(tmp_path):
    """SimpleTuner's LyCORIS export names modules ``lycoris_`` + diffusers path with underscores (ComfyUI maps them
    as ``"lycoris_{}".format(key_lora.replace(".", "_"))``); HiDream's ``double_stream_blocks`` / ``ff_i`` /
    ``shared_experts`` underscores come back from the table."""
    from loratool.ops.inspect import inspect

    gen = torch.Generator().manual_seed(1)
    sd = {}
    for head, (out, inp) in {"double_stream_blocks_0_block_attn1_to_q": (16, 16),
                             "double_stream_blocks_0_block_ff_i_shared_experts_w1": (40, 16),
                             "single_stream_blocks_3_block_attn1_to_out": (16, 16)}.items():
        sd[f"lycoris_{head}.lokr_w1"] = torch.randn(4, 4, generator=gen)
        sd[f"lycoris_{head}.lokr_w2"] = torch.randn(out // 4, inp // 4, generator=gen)
    save_file(sd, tmp_path / "l.safetensors")
    report = inspect(tmp_path / "l.safetensors")
    assert report.family == "hidream"
    assert sorted(m.path for m in report.modules) == [
        "double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.ff_i.shared_experts.w1",
        "single_stream_blocks.3.block.attn1.to_out"]


def test_cli_info_convert_merge_on_a_wan_lora(tmp_path, capsys):
    """The CLI end to end (in process): ``info`` prints family and variant, ``convert --to native`` writes ComfyUI
    keys, ``merge`` warns once per explained group; a native file of unknown names fails on one line, exit 2."""
    import json

    from tiny_dit_models import WAN_TINY, lora_factors, native_lora

    from loratool.cli import main

    case = CASES["wan"]
    i2v = tiny_model(case).state_dict()
    save_file(native_lora(case, lora_factors(case, i2v, seed=3)), tmp_path / "i2v.safetensors")
    assert main(["info", str(tmp_path / "i2v.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "wan" in out and "Wan 2.1 I2V" in out
    assert main(["convert", str(tmp_path / "i2v.safetensors"), "--to", "diffusers",
                 "-o", str(tmp_path / "d.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "d.safetensors"), "--to", "native", "--family", "wan",
                 "-o", str(tmp_path / "n.safetensors")]) == 0
    native_keys = load_file(tmp_path / "n.safetensors")
    assert all(k.startswith("diffusion_model.") for k in native_keys)
    assert "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight" in native_keys
    capsys.readouterr()
    tiny_model(case, WAN_TINY).save_pretrained(tmp_path / "t2v", safe_serialization=True)
    assert main(["merge", str(tmp_path / "t2v"), str(tmp_path / "i2v.safetensors"), "-o", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "4 modules, wrong variant (image cross-attention (cross_attn.k_img / v_img); e.g." in " ".join(err.split())
    assert "only Wan 2.1 I2V" in " ".join(err.split())
    assert main(["merge", str(tmp_path / "t2v"), str(tmp_path / "i2v.safetensors"), "-o", str(tmp_path / "j"),
                 "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["unmatched_groups"]
    assert {g["module_count"] for g in groups} == {4, 2}
    save_file({"diffusion_model.nothing.here.lora_A.weight": torch.zeros(2, 4),
               "diffusion_model.nothing.here.lora_B.weight": torch.zeros(4, 2)}, tmp_path / "odd.safetensors")
    assert main(["info", str(tmp_path / "odd.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell which model family" in err and "Traceback" not in err


def test_framepack_musubi_lora_in_diffusers_names(tmp_path):
    """musubi-tuner's FramePack model is diffusers-based (frame_pack/hunyuan_video_packed.py): its LoRAs name diffusers
    modules in kohya form (lora_unet_transformer_blocks_0_attn_to_q, networks/lora_framepack.py), and its metadata
    modelspec.architecture is "framepack" (utils/sai_model_spec.py). Read as HunyuanVideo / FramePack; merged into a
    diffusers HunyuanVideoFramepackTransformer3DModel folder it gives W + alpha/r · up @ down (musubi-tuner's
    merge_lora.py definition; diffusers has no FramePack kohya converter)."""
    import diffusers

    from loratool.ops.inspect import inspect

    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
               num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
               rope_axes_dim=(2, 2, 4), has_image_proj=True, image_proj_dim=12, has_clean_x_embedder=True)
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoFramepackTransformer3DModel(**cfg).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    gen = torch.Generator().manual_seed(6)
    lora, deltas = {}, {}
    for path in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.0.proj",
                 "single_transformer_blocks.0.proj_mlp", "image_projection.up"):
        out, inp = state[f"{path}.weight"].shape
        down = torch.randn(2, inp, generator=gen, dtype=torch.float64)
        up = torch.randn(out, 2, generator=gen, dtype=torch.float64)
        head = "lora_unet_" + path.replace(".", "_")
        lora.update({f"{head}.lora_down.weight": down, f"{head}.lora_up.weight": up,
                     f"{head}.alpha": torch.tensor(1.0, dtype=torch.float64)})
        deltas[f"{path}.weight"] = (up @ down) / 2
    save_file(lora, tmp_path / "fp.safetensors", metadata={"modelspec.architecture": "framepack/lora"})
    report = inspect(tmp_path / "fp.safetensors")
    assert (report.family, report.variant) == ("hunyuan_video", "FramePack")
    assert inspect(tmp_path / "transformer").family == "hunyuan_video"
    merge(tmp_path / "transformer", [tmp_path / "fp.safetensors"], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    for k, v in state.items():
        assert torch.allclose(merged[k], v + deltas.get(k, 0), rtol=0, atol=1e-12), k
