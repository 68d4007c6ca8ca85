"""``check LORA BASE`` on a matrix of (LoRA family / layout × base family / layout): every module gets the
cause that explains it, and ``check``'s count is what ``merge`` then merges (both are run on every pair).

LoRAs: the committed kohya / diffusers / LyCORIS SD 1.x and PEFT Llama fixtures; an SDXL kohya LoRA in SGM
names and a FLUX.1-dev kohya LoRA in BFL names (names from diffusers' kohya converters, as in
test_family_merge); a PEFT Llama LoRA on ``lm_head``. Bases: the committed tiny SD pipeline, its U-Net
folder and the tiny Llama; diffusers / transformers tiny models saved here: an SDXL SGM single file, a Flux
BFL single file (dev; schnell without ``guidance_in``; Chroma without modulation, with the
``distilled_guidance_layer`` keys diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers`` reads), BFL
names in a diffusers ``transformer`` folder, an SD U-Net of another cross-attention width, one with one layer
per block, a Llama with fewer key/value heads, one with tied embeddings, and a Phi-3 (fused ``qkv_proj``:
transformers' ``modeling_phi3``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_arch_checkpoints import ldm_state_dict, tiny_sdxl_unet
from test_family_merge import FLUX_TARGETS, SDXL_TARGETS, bfl_from_diffusers, kohya_lora

from loratool.cli import main
from loratool.ops.check import check

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
KOHYA = FIXTURES / "kohya_tiny_sd.safetensors"
DIFFUSERS = FIXTURES / "diffusers_tiny_sd"
LOHA = FIXTURES / "lycoris_loha_tiny_sd.safetensors"
PEFT = FIXTURES / "peft_tiny_llama"
SD = FIXTURES / "base" / "tiny_sd"
LLAMA = FIXTURES / "base" / "tiny_llama"
BFL = "model.diffusion_model."


def _tiny_flux(guidance: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=guidance,
                                  in_channels=8)


def _save_hf(model, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder


def _peft(model, folder: Path, targets: list[str]) -> Path:
    from peft import LoraConfig, get_peft_model
    from tiny_models import randomize_lora

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    randomize_lora(peft_model)
    # PEFT also saves lm_head's own weight ("auto" for embedding-layer targets): this LoRA carries only factors
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from tiny_models import tiny_llama
    from transformers import Phi3Config, Phi3ForCausalLM

    root = tmp_path_factory.mktemp("check")
    out: dict[str, Path] = {}

    sdxl = tiny_sdxl_unet()
    sgm = ldm_state_dict(sdxl, {k: v.clone() for k, v in sdxl.state_dict().items()})
    sgm["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    save_file(sgm, root / "sdxl.safetensors")
    out["sdxl_base"] = root / "sdxl.safetensors"
    table = {k.removeprefix(BFL): v for k, v in sgm.items()}
    save_file(kohya_lora({p: tuple(table[p + ".weight"].shape) for p in SDXL_TARGETS}, seed=3),
              root / "sdxl_lora.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    out["sdxl_lora"] = root / "sdxl_lora.safetensors"

    dev = bfl_from_diffusers(_tiny_flux(True).state_dict())
    save_file(dev, root / "flux_dev.safetensors")
    save_file({k: v for k, v in dev.items() if "guidance_in" not in k}, root / "flux_schnell.safetensors")
    chroma = {k: v for k, v in dev.items()
              if not re.search(r"(img_mod|txt_mod|modulation\.lin|time_in|vector_in|guidance_in|adaLN_modulation)", k)}
    chroma.update({BFL + "distilled_guidance_layer.in_proj.weight": torch.zeros(16, 8),
                   BFL + "distilled_guidance_layer.out_proj.weight": torch.zeros(16, 16),
                   BFL + "distilled_guidance_layer.layers.0.in_layer.weight": torch.zeros(16, 16),
                   BFL + "distilled_guidance_layer.layers.0.out_layer.weight": torch.zeros(16, 16),
                   BFL + "distilled_guidance_layer.norms.0.scale": torch.ones(16)})
    save_file(chroma, root / "chroma.safetensors")
    (root / "bfl_folder" / "transformer").mkdir(parents=True)
    save_file({k.removeprefix(BFL): v for k, v in dev.items()},
              root / "bfl_folder" / "transformer" / "diffusion_pytorch_model.safetensors")
    extra = ["double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin", "guidance_in.in_layer",
             "final_layer.adaLN_modulation.1", "vector_in.in_layer"]
    save_file(kohya_lora({p: tuple(dev[BFL + p + ".weight"].shape) for p in FLUX_TARGETS + extra}, seed=5),
              root / "flux_lora.safetensors", metadata={"ss_base_model_version": "flux1"})
    out.update(flux_dev=root / "flux_dev.safetensors", flux_schnell=root / "flux_schnell.safetensors",
               chroma=root / "chroma.safetensors", bfl_folder=root / "bfl_folder" / "transformer",
               flux_lora=root / "flux_lora.safetensors")

    from diffusers import UNet2DConditionModel

    config = json.loads((SD / "unet" / "config.json").read_text())  # the committed U-Net, one setting changed
    for name, change in (("unet_ctx48", {"cross_attention_dim": 48}), ("unet_no_mid", {"mid_block_type": None})):
        torch.manual_seed(0)
        out[name] = _save_hf(UNet2DConditionModel.from_config({**config, **change}), root / name / "unet")
    out["llama_gqa1"] = _save_hf(tiny_llama(num_key_value_heads=1), root / "llama_gqa1")
    out["llama_tied"] = _save_hf(tiny_llama(tie_word_embeddings=True), root / "llama_tied")
    torch.manual_seed(0)
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0))
    out["phi3"] = _save_hf(phi3, root / "phi3")
    out["lm_head_lora"] = _peft(tiny_llama(), root / "lm_head_lora", ["q_proj", "lm_head"])

    # a LoRA saved from a wrapped model: one layer's modules carry an extra leading "backbone."
    tensors = {}
    from safetensors.torch import load_file

    for k, v in load_file(str(PEFT / "adapter_model.safetensors")).items():
        tensors[k.replace("base_model.model.model.layers.1.", "base_model.model.backbone.model.layers.1.")] = v
    (root / "prefixed").mkdir()
    save_file(tensors, root / "prefixed" / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.copy(PEFT / "adapter_config.json", root / "prefixed")
    out["prefixed"] = root / "prefixed"
    return out


def _path(files, name) -> Path:
    return {"kohya": KOHYA, "diffusers": DIFFUSERS, "loha": LOHA, "peft": PEFT, "sd": SD, "sd_unet": SD / "unet",
            "llama": LLAMA}.get(name) or files[name]


# (LoRA, base, modules check says merge, {(cause, group): modules}, the merge refuses)
MATRIX = [
    ("kohya", "sd", 91, {}, False),
    ("loha", "sd", None, {}, False),
    ("diffusers", "sd", None, {}, False),
    ("kohya", "sd_unet", 79, {("component", "text_encoder"): 12}, False),
    ("diffusers", "sd_unet", None, {("component", "text_encoder"): None}, False),
    ("kohya", "sdxl_base", 0, {("family", "sd1 LoRA on a sdxl base"): 91}, True),
    ("sdxl_lora", "sdxl_base", 10, {}, False),
    ("sdxl_lora", "sd", 0, {("family", "sdxl LoRA on a sd1 base"): 10}, True),
    ("peft", "llama", 8, {}, False),
    ("peft", "sd", 0, {("family", "llm LoRA on a sd1 base"): 8}, True),
    ("peft", "llama_gqa1", 0, {("shape", "key/value width 16 vs 8"): 4}, True),
    ("peft", "phi3", 2, {("fused", "q_proj / k_proj / v_proj held fused as qkv_proj"): 6}, False),
    ("lm_head_lora", "llama_tied", 2, {("variant", "output head (lm_head)"): 1}, False),
    ("prefixed", "llama", 4, {("prefix", "LoRA prefix backbone. ↔ base prefix (none)"): 4}, False),
    ("kohya", "unet_ctx48", 0, {("shape", "cross-attention width 32 vs 48"): None,
                                 ("component", "text_encoder"): 12}, True),
    ("kohya", "unet_no_mid", None, {("missing", "unet"): None, ("component", "text_encoder"): 12}, False),
    ("flux_lora", "flux_dev", 17, {}, False),  # 14 BFL modules, two of them fused q/k/v (3 each)
    ("flux_lora", "flux_schnell", 16, {("variant", "guidance embedder (guidance_in)"): 1}, False),
    # Chroma is its own family (loratool/arch/chroma.py): its table groups the guidance embedder with the others
    ("flux_lora", "chroma", 11, {("variant", "per-block modulation (img_mod / txt_mod / modulation)"): 2,
                                ("variant", "timestep / guidance / pooled-text embedders and the final modulation "
                                            "(time_in, vector_in, guidance_in, final_layer.adaLN_modulation)"): 4},
     False),
    ("flux_lora", "bfl_folder", 0, {("dialect", "flux native names"): 17}, True),
]


@pytest.mark.parametrize(("lora", "base", "count", "groups", "refused"), MATRIX,
                         ids=[f"{a}-on-{b}" for a, b, *_ in MATRIX])
def test_check_names_every_cause_and_counts_what_merge_merges(files, tmp_path, capsys, lora, base, count, groups,
                                                              refused):
    lora_path, base_path = _path(files, lora), _path(files, base)
    report = check(lora_path, base_path)
    got = {(g.cause, g.group): len(g.labels) for g in report.groups}
    assert set(got) == set(groups), got
    for key, n in groups.items():
        assert n is None or got[key] == n, (key, got[key])
    assert (report.refused is not None) == refused, report.refused
    if count is not None:
        assert report.matched_total == count
    # every module has exactly one fate: merged, or in one group
    labels = [lab for g in report.groups for lab in g.labels]
    assert len(labels) == len(set(labels)) and report.matched_total + len(labels) == report.module_count \
        or report.refused
    assert report.exit_code == (0 if not groups and not refused else 1)

    # the oracle: merge itself, on the same pair
    out = tmp_path / ("merged" if base_path.is_dir() else "merged.safetensors")
    rc = main(["merge", str(base_path), str(lora_path), "-o", str(out), "--json"])
    captured = capsys.readouterr()
    if refused:
        assert rc == 2 and not out.exists(), captured.err
        return
    assert rc == 0, captured.err
    merged = json.loads(captured.out)
    assert merged["matched_total"] == report.matched_total
    assert merged["unmatched_count"] == report.module_count - report.matched_total
    assert [(g["cause"], g["group"], g["module_count"]) for g in merged["unmatched_groups"]] == \
        [(g.cause, g.group, len(g.labels)) for g in report.groups]


def test_cli_exit_codes_lines_and_json(files, capsys):
    assert main(["check", str(KOHYA), str(SD)]) == 0
    out = capsys.readouterr().out
    assert "91 of 91 modules (100%) would merge" in out
    assert main(["check", str(KOHYA), str(SD / "unet")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "79 of 91 modules (87%) would merge" in out
    assert "12 modules, component not in the base (text_encoder; e.g. text_encoder:text_model.encoder.layers.0" in out
    assert "Fix: merge into a base that holds text_encoder" in out
    assert main(["check", str(KOHYA), str(SD / "unet"), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == "check" and data["matched_total"] == 79 and data["module_count"] == 91
    assert data["identity"]["family"] == "sd1" and data["identity"]["widths"]["cross_attention"] == [32]
    assert [g["cause"] for g in data["groups"]] == ["component"] and data["groups"][0]["module_count"] == 12
    # merge warns with the same lines
    assert main(["merge", str(SD / "unet"), str(KOHYA), "-o", str(files["sdxl_base"].parent / "m_unet")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "12 modules, component not in the base (text_encoder; e.g." in err


def test_bad_input_and_swapped_arguments_exit_2(files, capsys, tmp_path):
    assert main(["check", str(tmp_path / "nope.safetensors"), str(SD)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert main(["check", str(LLAMA), str(PEFT)]) == 2
    err = capsys.readouterr().err
    assert "this is a LoRA, not a base model" in err and f"`loratool check {PEFT} {LLAMA}`" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_ignore_family_checks_what_merge_ignore_family_merges(files, tmp_path, capsys):
    report = check(KOHYA, files["sdxl_base"], ignore_family=True)
    assert report.refused is None or "shape" in report.refused
    rc = main(["merge", str(files["sdxl_base"]), str(KOHYA), "--ignore-family", "-o", str(tmp_path / "x.safetensors"),
               "--json"])
    captured = capsys.readouterr()
    if report.refused is None:
        assert rc == 0 and json.loads(captured.out)["matched_total"] == report.matched_total
    else:
        assert rc == 2


def test_info_names_the_base_a_lora_needs(files, capsys):
    """Family, variant and widths from the LoRA alone, against the configs of the models they were made on."""
    llama = json.loads((LLAMA / "config.json").read_text())
    head_dim = llama["hidden_size"] // llama["num_attention_heads"]
    cases = [
        (PEFT, "llm", "LlamaForCausalLM", {"hidden": [llama["hidden_size"]],
                                           "q": [llama["hidden_size"]],
                                           "kv": [llama["num_key_value_heads"] * head_dim]}),  # GQA: kv < q
        (KOHYA, "sd1", None, {"cross_attention": [json.loads((SD / "unet" / "config.json").read_text())
                                                  ["cross_attention_dim"]]}),
        (files["flux_lora"], "flux", "FLUX.1-dev (guidance embedder)", {"hidden": [16], "context": [16]}),
        (files["sdxl_lora"], "sdxl", None, {"cross_attention": [32]}),
    ]
    for path, family, variant, widths in cases:
        assert main(["info", str(path), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert (data["family"], data["variant"]) == (family, variant), path
        for name, values in widths.items():
            assert data["widths"][name] == values, (path, name, data["widths"])
    # the tiny Flux: 2 heads × 8 = 16 wide, joint_attention_dim 16 (test_family_merge.tiny_flux's config)
    assert main(["info", str(files["flux_lora"])]) == 0
    out = capsys.readouterr().out
    assert "FLUX.1-dev (guidance embedder)" in out and "needs widths" in out
