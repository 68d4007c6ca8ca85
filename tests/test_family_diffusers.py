"""kohya SDXL / Flux LoRAs converted by loratool to the diffusers layout load in diffusers with no
unexpected or missing keys, and what diffusers fuses equals loratool's ``merge_weight``; the
diffusers files convert back to kohya exactly.

Oracles: diffusers' own loaders (``lora_state_dict`` + ``load_lora_into_unet`` /
``load_lora_into_transformer`` / ``load_lora_into_text_encoder``, incompatible-key reports) and
``fuse_lora``. The kohya files are built with native SGM / BFL names on tiny configs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_arch_checkpoints import ldm_state_dict, tiny_sdxl_unet  # noqa: E402
from test_family_merge import bfl_from_diffusers, fused_state, kohya_lora, tiny_flux  # noqa: E402

import loratool
from loratool.delta import merge_weight


@pytest.fixture
def incompatible(monkeypatch):
    """Every unexpected / missing LoRA key diffusers reports while loading an adapter."""
    import diffusers.loaders.peft as dpeft

    seen: list[tuple[list[str], list[str]]] = []
    original = dpeft._maybe_warn_for_unhandled_keys

    def spy(keys, adapter_name):
        if keys is not None:
            seen.append(([k for k in keys.unexpected_keys if "lora_" in k],
                         [k for k in keys.missing_keys if "lora_" in k and adapter_name in k]))
        return original(keys, adapter_name)

    monkeypatch.setattr(dpeft, "_maybe_warn_for_unhandled_keys", spy)
    return seen


def lora_params(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def check_loaded(model, file_state: dict[str, torch.Tensor], prefix: str, incompatible) -> None:
    """Every lora tensor of the file sits in the model and every injected lora parameter came from it."""
    assert incompatible and all(not u and not m for u, m in incompatible), incompatible
    got = lora_params(model)
    want = {k[len(prefix) + 1:] for k in file_state if k.startswith(prefix + ".")}
    loaded = {k.replace(".default_0", "").replace(".default", "") for k in got}
    assert loaded == want, (sorted(loaded ^ want)[:6])
    for k, v in got.items():
        name = prefix + "." + k.replace(".default_0", "").replace(".default", "")
        assert torch.equal(v.to(file_state[name].dtype), file_state[name]), name


def check_fused(model, base: dict[str, torch.Tensor], adapter, component: str) -> int:
    """diffusers' fused weights == loratool's merge_weight (float64) for every adapted module."""
    fused = fused_state(model)
    modules = {m.path: m for m in adapter if m.component == component}
    for path, module in modules.items():
        w = base[path + ".weight"]
        want = merge_weight(w.double(), module, dtype=torch.float64)
        got = fused[path + ".weight"].double()
        err = ((got - want).norm() / want.norm()).item()
        assert err <= 1e-5, (path, err)
    for k, v in fused.items():
        if k.removesuffix(".weight") not in modules:
            assert torch.equal(v, base[k]), k
    return len(modules)


def assert_kohya_equal(back: dict[str, torch.Tensor], orig: dict[str, torch.Tensor]) -> None:
    """Same keys, same factors, same alpha / rank (alpha may be stored as another scalar dtype)."""
    assert set(back) == set(orig), sorted(set(back) ^ set(orig))[:6]
    for k, v in orig.items():
        if k.endswith(".alpha"):
            assert float(back[k]) == pytest.approx(float(v), rel=1e-6), k
        else:
            assert torch.equal(back[k].to(v.dtype), v), k


# ------------------------------------------------------------------------------------------------ SDXL

SDXL_UNET = [
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0",
    "input_blocks.5.1.transformer_blocks.1.attn2.to_k",
    "input_blocks.4.1.proj_in",
    "output_blocks.0.1.proj_out",
    "output_blocks.2.2.conv",
    "input_blocks.1.0.in_layers.2",
    "input_blocks.3.0.op",
    "middle_block.1.transformer_blocks.0.ff.net.2",
    "output_blocks.4.0.skip_connection",
    "label_emb.0.0",
    "time_embed.2",
]


def _te_lora(prefix: str, modules: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for n, (path, (out, inp)) in enumerate(modules.items()):
        key, r = f"{prefix}_" + path.replace(".", "_"), 2 + n % 2
        sd[key + ".lora_down.weight"] = torch.randn(r, inp, generator=gen) * 0.1
        sd[key + ".lora_up.weight"] = torch.randn(out, r, generator=gen) * 0.1
        sd[key + ".alpha"] = torch.tensor(float(1 + n % 3))
    return sd


def tiny_clip_pair():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(2)
    cfg = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=77, projection_dim=32)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval(), CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()


TE1 = {"text_model.encoder.layers.0.self_attn.q_proj": (32, 32), "text_model.encoder.layers.1.mlp.fc1": (37, 32)}
TE2 = {"text_model.encoder.layers.0.self_attn.v_proj": (32, 32), "text_model.encoder.layers.1.self_attn.out_proj":
       (32, 32), "text_projection": (32, 32)}


def sdxl_kohya_file(tmp_path, unet) -> tuple:
    table = {k.removeprefix("model.diffusion_model."): v for k, v in ldm_state_dict(unet, unet.state_dict()).items()}
    lora = kohya_lora({p: tuple(table[p + ".weight"].shape) for p in SDXL_UNET}, seed=7)
    lora.update(_te_lora("lora_te1", TE1, 8))
    lora.update(_te_lora("lora_te2", TE2, 9))
    path = tmp_path / "sdxl_kohya.safetensors"
    save_file(lora, path, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return path, lora


def _model_path(state: dict, canonical: str) -> str:
    """transformers 5 drops ``text_model.`` from a bare CLIPTextModel's parameter names."""
    return canonical if canonical + ".weight" in state else canonical.removeprefix("text_model.")


def test_kohya_sdxl_to_diffusers_loads_and_fuses_in_diffusers(tmp_path, incompatible):
    from diffusers import StableDiffusionXLPipeline

    unet = tiny_sdxl_unet()
    te1, te2 = tiny_clip_pair()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    te_base = [{k: v.clone() for k, v in te.state_dict().items()} for te in (te1, te2)]
    kohya_path, kohya = sdxl_kohya_file(tmp_path, unet)

    adapter = loratool.load(kohya_path)
    (out,) = loratool.save(adapter, tmp_path / "sdxl_diffusers.safetensors", "diffusers")
    file_state = load_file(out)
    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    assert not alphas  # the PEFT-style file carries its alphas in lora_adapter_metadata

    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    check_loaded(unet, file_state, "unet", incompatible)
    unet.fuse_lora()
    assert check_fused(unet, base, adapter, "unet") == len(SDXL_UNET)

    for te, prefix, tb in ((te1, "text_encoder", te_base[0]), (te2, "text_encoder_2", te_base[1])):
        StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, te, prefix=prefix, metadata=metadata)
        # transformers 5 names a bare CLIPTextModel's parameters without ``text_model.``: compare without it
        got = {k.replace(".default_0", "").replace(".default", "").removeprefix("text_model."): v
               for k, v in lora_params(te).items()}
        want = {k[len(prefix) + 1:].removeprefix("text_model."): v for k, v in file_state.items()
                if k.startswith(prefix + ".")}
        assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
        assert all(torch.equal(got[k].to(v.dtype), v) for k, v in want.items())
        from peft.tuners.tuners_utils import BaseTunerLayer

        for mod in te.modules():
            if isinstance(mod, BaseTunerLayer):
                mod.merge()
        fused = fused_state(te)
        for m in (m for m in adapter if m.component == prefix):
            name = _model_path(tb, m.path)
            want_w = merge_weight(tb[name + ".weight"].double(), m, dtype=torch.float64)
            err = ((fused[name + ".weight"].double() - want_w).norm() / want_w.norm()).item()
            assert err <= 1e-5, (prefix, m.path, err)

    # and back: diffusers -> kohya reproduces the original file
    back_adapter = loratool.load(out)
    (kout,) = loratool.save(back_adapter, tmp_path / "back_kohya.safetensors", "kohya", family="sdxl")
    assert_kohya_equal(load_file(kout), kohya)


# ------------------------------------------------------------------------------------------------ Flux

FLUX_MODULES = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
                "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.txt_mlp.2",
                "double_blocks.0.img_mod.lin", "single_blocks.0.linear1", "single_blocks.0.linear2",
                "single_blocks.0.modulation.lin", "img_in", "txt_in", "time_in.in_layer", "vector_in.out_layer",
                "guidance_in.in_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"]


def flux_kohya_file(tmp_path, model) -> tuple:
    ckpt = bfl_from_diffusers(model.state_dict())
    shapes = {p: tuple(ckpt["model.diffusion_model." + p + ".weight"].shape) for p in FLUX_MODULES}
    lora = kohya_lora(shapes, seed=11)
    gen = torch.Generator().manual_seed(12)
    # split_qkv-style modules: block-diagonal up (rank 3·2 for qkv, 4·2 for linear1)
    for key, rows in (("lora_unet_double_blocks_0_txt_attn_qkv", [16, 16, 16]),
                      ("lora_unet_single_blocks_0_linear1", [16, 16, 16, 64])):
        up = torch.zeros(sum(rows), 2 * len(rows))
        at = 0
        for g, n in enumerate(rows):
            up[at:at + n, 2 * g:2 * g + 2] = torch.randn(n, 2, generator=gen) * 0.1
            at += n
        lora[key + ".lora_down.weight"] = torch.randn(2 * len(rows), 16, generator=gen) * 0.1
        lora[key + ".lora_up.weight"] = up
        lora[key + ".alpha"] = torch.tensor(3.0)
    path = tmp_path / "flux_kohya.safetensors"
    save_file(lora, path, metadata={"ss_base_model_version": "flux1"})
    return path, lora


def test_kohya_flux_to_diffusers_loads_and_fuses_in_diffusers(tmp_path, incompatible):
    from diffusers import FluxPipeline

    model = tiny_flux()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    kohya_path, kohya = flux_kohya_file(tmp_path, model)

    adapter = loratool.load(kohya_path)
    (out,) = loratool.save(adapter, tmp_path / "flux_diffusers.safetensors", "diffusers")
    file_state = load_file(out)
    state, alphas, metadata = FluxPipeline.lora_state_dict(str(out), return_alphas=True, return_lora_metadata=True)
    assert not alphas
    FluxPipeline.load_lora_into_transformer(state, alphas, model, metadata=metadata)
    check_loaded(model, file_state, "transformer", incompatible)
    model.fuse_lora()
    # 17 native modules; qkv ×2 → 3 each, linear1 → 4
    assert check_fused(model, base, adapter, "transformer") == 17 + 2 * 2 + 3

    back_adapter = loratool.load(out)
    (kout,) = loratool.save(back_adapter, tmp_path / "back_kohya.safetensors", "kohya", family="flux")
    assert_kohya_equal(load_file(kout), kohya)
