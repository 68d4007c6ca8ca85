"""The command line as people use it: help, argument conventions, messages for common mistakes,
tables that fit the terminal, the ``--json`` contract, and outputs that carry no local paths.

Commands run in-process through ``loratool.cli.main`` unless the point is what a real process
does (``COLUMNS``, environment variables read at start-up, what gets imported).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.cells import cell_len
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.cli import COMMANDS, main
from loratool.cli import render as render_mod
from loratool.cli.command import expand_number_lists

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
KOHYA = FIXTURES / "kohya_tiny_sd.safetensors"
DIFFUSERS = FIXTURES / "diffusers_tiny_sd"
LOKR = FIXTURES / "lycoris_lokr_tiny_sd.safetensors"
PEFT = FIXTURES / "peft_tiny_llama"
LLAMA = FIXTURES / "base" / "tiny_llama"
SD = FIXTURES / "base" / "tiny_sd"


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *args) -> dict:
    rc, out, err = run(capsys, *args, "--json")
    assert rc == 0, err
    return json.loads(out)


def subprocess_run(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=300)


@pytest.fixture
def narrow(monkeypatch):
    """The in-process console at 80 columns, as ``COLUMNS=80`` gives a fresh process."""
    monkeypatch.setattr(render_mod.console, "_width", 80)
    return 80


def widest(text: str) -> int:
    return max((cell_len(line) for line in text.splitlines()), default=0)


# ---------------------------------------------------------------- help


def help_text(capsys, *args) -> str:
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    return out


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_dash_h_is_help(capsys, command):
    args = [command] if command else []
    assert help_text(capsys, *args, "-h") == help_text(capsys, *args, "--help")


def test_command_list_has_whole_summaries(capsys):
    from typer.main import get_command

    from loratool.cli.app import app

    out = help_text(capsys, "-h")
    listing = " ".join(out.split("Commands:")[1].split())
    assert "..." not in listing
    group = get_command(app)
    for name in COMMANDS:
        summary = group.commands[name].help.split("\n\n")[0]
        assert " ".join(summary.split()) in listing, name


CHOICES = {
    "convert": ["--to kohya|diffusers|peft|loralib", "--from kohya|diffusers|peft|loralib|lycoris"],
    "merge": ["--dtype fp16|bf16|fp32", "--device auto|cpu|cuda|mps", "-a, --alpha S"],
    "stack": ["--method concat|svd", "--dtype fp16|bf16|fp32", "--to kohya|diffusers|peft|loralib",
              "-w, --weights W", "-r, --rank N"],
    "resize": ["--dynamic sv_ratio|sv_fro|sv_cumulative", "--param P", "-r, --rank N"],
    "extract": ["--to kohya|diffusers|peft", "--save-dtype fp16|bf16|fp32", "--include REGEX"],
    "info": ["--from kohya|diffusers|peft|loralib|lycoris", "--config CFG", "--all", "--plot PNG"],
    "check": ["--ignore-family", "--json"],
    "diff": ["--plot PNG", "--all", "--json"],
}
ARGUMENTS = {"info": "PATH", "convert": "LORA", "merge": "BASE LORA...", "stack": "LORA...", "resize": "LORA",
             "extract": "FINETUNED BASE", "check": "LORA BASE", "diff": "A B"}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_metavars_choices_and_an_example(capsys, command):
    out = help_text(capsys, command, "-h")
    flat = " ".join(out.split())
    for choice in CHOICES[command]:
        assert choice in flat, (command, choice)
    assert f"Usage: loratool {command} [OPTIONS] {ARGUMENTS[command]}" in flat
    assert "<str>" not in out and "<list" not in out and "<int>" not in out  # no type tags, metavars
    assert "--debug" in out
    example = out.split("Example")[1]
    assert re.search(rf"^  loratool {command} \S", example, re.M), out


def test_options_choices_agree_with_the_operations():
    from loratool.cli import options
    from loratool.ops import combine_methods, device, rank_rules, stack

    assert options.DEVICE_CHOICES == device.DEVICE_CHOICES
    assert options.RANK_RULES == rank_rules.RULES
    assert options.STACK_METHODS == stack.METHODS + tuple(combine_methods.METHODS)


def test_help_and_cli_import_no_torch():
    code = ("import sys\nfrom loratool.cli import main\nmain(['-h'])\n"
            "import loratool.cli.info_cmd, loratool.cli.training_view, loratool.ops.training_metadata, "
            "loratool.ops.argument_order\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- --debug


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command(capsys, tmp_path, where):
    missing = tmp_path / "missing.safetensors"
    args = ["--debug", "info", missing] if where == "before" else ["info", missing, "--debug"]
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")
    rc, _, err = run(capsys, "info", missing)
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- kohya-style number lists


def test_expand_number_lists():
    flags = frozenset({"--weights", "-w"})
    assert expand_number_lists(["a", "--weights", "0.6", "-0.4", "b"], flags) == \
        ["a", "--weights", "0.6", "--weights", "-0.4", "b"]
    assert expand_number_lists(["-w", "1e-3", "-2", "+.5", "--json"], flags) == \
        ["-w", "1e-3", "-w", "-2", "-w", "+.5", "--json"]
    assert expand_number_lists(["--weights=0.5", "0.2", "nan", "x"], flags) == \
        ["--weights", "0.5", "--weights", "0.2", "nan", "x"]
    assert expand_number_lists(["--weights", "--", "0.5"], flags) == ["--weights", "--", "0.5"]
    assert expand_number_lists(["--rank", "4", "5"], flags) == ["--rank", "4", "5"]


def test_stack_weights_several_after_one_flag_equal_repeated(capsys, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    a = run_json(capsys, "stack", KOHYA, DIFFUSERS, "--weights", "0.6", "-0.4", "-o", one)
    b = run_json(capsys, "stack", KOHYA, DIFFUSERS, "-w", "0.6", "-w", "-0.4", "-o", two)
    assert [i["weight"] for i in a["inputs"]] == [0.6, -0.4] == [i["weight"] for i in b["inputs"]]
    ta, tb = load_file(str(one)), load_file(str(two))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_merge_alpha_several_after_one_flag_equal_repeated(capsys, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    a = run_json(capsys, "merge", SD, KOHYA, DIFFUSERS, "--alpha", "0.8", "-0.5", "-o", one)
    b = run_json(capsys, "merge", SD, KOHYA, DIFFUSERS, "-a", "0.8", "-a", "-0.5", "-o", two)
    assert [i["strength"] for i in a["inputs"]] == [0.8, -0.5] == [i["strength"] for i in b["inputs"]]
    for f in sorted(p.relative_to(one) for p in one.rglob("*.safetensors")):
        assert (one / f).read_bytes() == (two / f).read_bytes(), f


def test_stack_needs_two_inputs(capsys, tmp_path):
    rc, _, err = run(capsys, "stack", KOHYA, "-o", tmp_path / "x.safetensors")
    assert rc == 2 and "two or more" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(("name", "dtype", "step"), [("fp16", "F16", 2**-11), ("bf16", "BF16", 2**-8),
                                                     ("fp32", "F32", 2**-24)])
def test_stack_dtype(capsys, tmp_path, name, dtype, step):
    """Factors stored in the asked dtype; ΔW still the weighted sum within that dtype's rounding."""
    import loratool
    from loratool.delta import delta_weight

    out = tmp_path / "s.safetensors"
    data = run_json(capsys, "stack", KOHYA, DIFFUSERS, "-w", "0.5", "0.5", "--dtype", name, "-o", out)
    assert data["dtype"] == {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[name]
    with safe_open(str(out), "pt") as f:
        header_dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(".alpha")}
    assert header_dtypes == {dtype}
    got, a, b = loratool.load(out), loratool.load(KOHYA), loratool.load(DIFFUSERS)
    for key in [k for k in a.modules if k in b.modules][:5]:
        want = 0.5 * delta_weight(a[key], dtype=torch.float64) + 0.5 * delta_weight(b[key], dtype=torch.float64)
        err = (delta_weight(got[key], dtype=torch.float64) - want).abs().max()
        # the stacked factors are computed in float16 (the inputs' dtype) before the cast
        assert err <= want.abs().max() * max(step, 2**-11) * 2, (key, float(err))


# ---------------------------------------------------------------- common mistakes


def test_merge_with_a_lora_as_base_names_the_swap(capsys, tmp_path):
    rc, _, err = run(capsys, "merge", PEFT, LLAMA, "-o", tmp_path / "out")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "this is a LoRA, not a base model" in err and f"did you mean `loratool merge {LLAMA} {PEFT}`" in err
    rc, _, err = run(capsys, "merge", KOHYA, DIFFUSERS, "-o", tmp_path / "o.safetensors")
    assert rc == 2 and "this is a LoRA" in err and "the base model comes first" in err
    rc, _, err = run(capsys, "merge", LLAMA, LLAMA / "model.safetensors", "-o", tmp_path / "o2")
    assert rc == 2 and "this is a model, not a LoRA" in err
    assert not any(tmp_path.iterdir())


def _fine_tuned_unet(folder: Path) -> Path:
    """A fine-tune saved by diffusers itself: its config.json records the base in ``_name_or_path``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(SD / "unet"))
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].proj_in.weight.add_(0.01)
    unet.save_pretrained(str(folder))
    assert json.loads((folder / "config.json").read_text())["_name_or_path"] == str(SD / "unet")
    return folder


def test_extract_swapped_by_metadata_lora_inputs_and_names(capsys, tmp_path):
    tuned = _fine_tuned_unet(tmp_path / "my_unet")
    rc, _, err = run(capsys, "extract", SD / "unet", tuned, "-o", tmp_path / "x.safetensors", "--rank", "2")
    assert rc == 2 and "look swapped" in err and f"`loratool extract {tuned} {SD / 'unet'}`" in err
    data = run_json(capsys, "extract", tuned, SD / "unet", "-o", tmp_path / "ok.safetensors", "--rank", "2")
    assert data["extracted"] == 1 and data["warnings"] == []

    rc, _, err = run(capsys, "extract", KOHYA, LLAMA, "-o", tmp_path / "y", "--rank", "2")
    assert rc == 2 and "this is a LoRA; extract takes two full models" in err

    base_named, tuned_named = tmp_path / "base_unet", tmp_path / "unet_finetuned"
    shutil.copytree(SD / "unet", base_named)
    shutil.copytree(tuned, tuned_named)
    data = run_json(capsys, "extract", base_named, tuned_named, "-o", tmp_path / "w.safetensors", "--rank", "2")
    assert len(data["warnings"]) == 1 and "named like a base model" in data["warnings"][0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_asks_only_the_cache(capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from loratool.io import hub

    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.unreachable.cache_clear()
    rc, _, err = run(capsys, "info", "hf://nobody/nothing/lora.safetensors")
    hub.unreachable.cache_clear()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "not in the local cache and the hub cannot be asked (127.0.0.1:" in err
    assert calls == [True]


def test_unreachable_hub_still_serves_the_cache(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--loras"
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(KOHYA, repo / "snapshots" / commit / "style.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
           "HF_HUB_OFFLINE": "0"}
    r = subprocess_run("info", "hf://someone/loras/style.safetensors", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["module_count"] == 91


@pytest.mark.parametrize(("content", "says"), [
    (b"a_text_file: that was renamed\nsecond line\n", "it holds text: 'a_text_file: that was re'"),
    (None, "a zip archive: a PyTorch .pt / .ckpt / .bin saved by torch.save"),
])
def test_a_renamed_file_is_not_a_safetensors_file(capsys, tmp_path, content, says):
    path = tmp_path / "lora.safetensors"
    if content is None:
        torch.save({"w": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(content)
    rc, _, err = run(capsys, "info", path)
    assert rc == 2 and err == f"error: {path}: not a safetensors file ({says})\n"


# ---------------------------------------------------------------- tables


def test_tables_fit_80_columns(capsys, narrow, tmp_path):
    shutil.copytree(LLAMA, tmp_path / "llama")
    outputs = [
        run(capsys, "info", KOHYA),
        run(capsys, "info", LOKR),
        run(capsys, "info", PEFT, "--stats"),
        run(capsys, "info", SD),
        run(capsys, "convert", KOHYA, "--to", "peft", "-o", tmp_path / "p"),
        run(capsys, "merge", SD, KOHYA, "-o", tmp_path / "merged"),
        run(capsys, "merge", tmp_path / "llama", PEFT, "-o", tmp_path / "merged_llama"),
        run(capsys, "resize", KOHYA, "--rank", "2", "-o", tmp_path / "r.safetensors", "--all"),
        run(capsys, "stack", KOHYA, DIFFUSERS, "-o", tmp_path / "a_long_output_name_for_a_stacked_lora.safetensors"),
        run(capsys, "extract", tmp_path / "merged_llama", tmp_path / "llama", "--rank", "4", "-o", tmp_path / "e"),
    ]
    for rc, out, err in outputs:
        assert rc == 0, err
        assert widest(out) <= 80, "\n".join(line for line in out.splitlines() if cell_len(line) > 80)


def test_piped_output_follows_columns(capsys, monkeypatch):
    """A console made off a terminal (stdout piped, as under pytest) is COLUMNS wide, else PIPE_WIDTH."""
    assert render_mod.console is not None  # made (on first use) before COLUMNS changes: the one restored after
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(render_mod, "console", render_mod._console())
    assert render_mod.console.width == 80
    rc, narrow, _ = run(capsys, "info", KOHYA)
    assert rc == 0 and widest(narrow) <= 80 and "…" in narrow  # paths were shortened to fit
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setattr(render_mod, "console", render_mod._console())
    assert render_mod.console.width == render_mod.PIPE_WIDTH
    rc, wide, _ = run(capsys, "info", KOHYA)
    assert rc == 0 and 80 < widest(wide) <= render_mod.PIPE_WIDTH
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in wide


def test_shortened_paths_keep_a_unique_tail():
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "text_model.encoder.layers.11.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.q_proj",
             "mid_block.proj_in"]
    short = render_mod.shorten_tails(names, 30)
    assert short[-1] == "mid_block.proj_in"
    for name, cut in zip(names, short):
        tail = cut.replace("\n", "").removeprefix("…")
        assert name.endswith(tail)
        assert sum(n.endswith(tail) for n in names) == 1, cut  # no other module ends so
        assert not re.match(r"…\d", cut)  # never starts at a bare block number
        assert all(cell_len(line) <= 30 for line in cut.splitlines()) or "." not in cut
    assert short[2] == "…encoder.layers.11.self_attn.q_proj" or short[2].startswith("…layers.11")


def test_modules_in_natural_order_capped_with_all(capsys, narrow, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(2, 8, generator=g)
            tensors[f"{p}.lora_B.weight"] = torch.randn(8, 2, generator=g)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    rc, out, _ = run(capsys, "info", folder)
    assert rc == 0
    rows = re.findall(r"layers\.(\d+)\.self_attn\.(\w)_proj", out)
    assert [int(i) for i, _ in rows] == sorted(int(i) for i, _ in rows)  # layers.2 before layers.10
    assert len(rows) == 40 and "… 8 more modules (--all lists them" in out
    rc, out, _ = run(capsys, "info", folder, "--all")
    assert len(re.findall(r"layers\.\d+\.self_attn", out)) == 48 and "more modules" not in out


def test_titles_break_between_words_only(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(render_mod.console, "_width", 50)
    deep = tmp_path / ("a_folder_name_longer_than_the_terminal_is_wide_" * 2)
    deep.mkdir()
    rc, out, err = run(capsys, "resize", KOHYA, "--rank", "2", "-o", deep / "small.safetensors")
    assert rc == 0, err
    title = out.split("┏")[0]
    assert widest(title) <= 50 and "small.safetensors" in title
    words = " ".join(title.split()).split(" ")
    assert "resized" in words and "(kohya)" in words and "→" in words  # no word was cut in two


# ---------------------------------------------------------------- info


def _trained_lora(path: Path, **metadata: str) -> Path:
    """A kohya LoRA with the metadata sd-scripts' train_network.py writes (keys from its source)."""
    from bad_inputs import kohya_tensors

    save_file(kohya_tensors(), str(path), metadata={"format": "pt", **metadata})
    return path


SD_SCRIPTS_METADATA = {
    "ss_learning_rate": "0.0001", "ss_output_name": "tiny_style", "ss_network_dropout": "None",
    "ss_training_started_at": "1716543210.5", "ss_training_finished_at": "1716551010.5",
    "ss_network_dim": "2", "ss_seed": "42", "ss_network_module": "networks.lora", "ss_zzz_custom": "kept",
    "ss_datasets": json.dumps([{
        "is_dreambooth": True, "tag_frequency": {"10_sks dog": {"dog": 9, "grass": 2}, "1_dog": {"dog": 30}},
        "subsets": [{"class_tokens": "sks dog", "is_reg": False, "image_dir": "10_sks dog"},
                    {"class_tokens": "dog", "is_reg": True, "image_dir": "1_dog"}]}]),
}


def test_info_training_order_dates_trigger_tags_and_no_noise(capsys, tmp_path):
    path = _trained_lora(tmp_path / "style.safetensors", **SD_SCRIPTS_METADATA)
    rc, out, err = run(capsys, "info", path)
    assert rc == 0, err
    summary = out.split("modules\n")[0]
    assert re.search(r"│ format +│ kohya", summary.splitlines()[2])
    assert re.search(r"│ trigger +│ sks dog +│", summary.splitlines()[3])  # right under the format
    training = out.split("training settings")[1]
    keys = re.findall(r"│ (ss_\w+)", training)
    assert keys[:4] == ["ss_output_name", "ss_training_started_at", "ss_training_finished_at", "ss_network_module"]
    assert keys.index("ss_learning_rate") < keys.index("ss_seed") < keys.index("ss_zzz_custom")
    assert "2024-05-24 09:33:30 UTC" in training and "2024-05-24 11:43:30 UTC (after 2 h 10 min)" in training
    assert "ss_network_dropout" not in out and "│ format  " not in out.split("modules\n", 1)[1]
    assert re.search(r"│ dog +│ +39 │", out) and re.search(r"│ grass +│ +2 │", out)
    data = run_json(capsys, "info", path)
    assert data["trigger_phrases"] == ["sks dog"] and data["tags"][0] == {"tag": "dog", "count": 39}
    assert data["metadata"]["ss_network_dropout"] == "None" and data["metadata"]["format"] == "pt"

    declared = _trained_lora(tmp_path / "declared.safetensors", **{"modelspec.trigger_phrase": "a photo of zwx",
                                                                    "ss_dataset_dirs": '{"5_zwx man": {}}'})
    assert run_json(capsys, "info", declared)["trigger_phrases"] == ["a photo of zwx", "zwx man"]


def test_lokr_rank_is_the_rank_of_its_delta():
    """rank(w1 ⊗ w2) = rank(w1)·rank(w2): the shown rank equals torch's matrix_rank of ΔW in float64."""
    import loratool
    from loratool.delta import delta_weight

    adapter = loratool.load(LOKR)
    report = {(m.component, m.path): m for m in loratool.inspect(LOKR).modules}
    assert {m.kind for m in adapter} == {"lokr"}
    for module in adapter:
        dw = delta_weight(module, dtype=torch.float64)
        assert report[module.key].rank == int(torch.linalg.matrix_rank(dw.reshape(dw.shape[0], -1)))
        assert report[module.key].factor_rank == module.rank


def _peft_saved(folder: Path, model, **config) -> Path:
    """An adapter saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, **config)).save_pretrained(str(folder))
    return folder


def test_every_marker_is_explained(capsys, narrow, tmp_path):
    from tiny_models import tiny_gpt2, tiny_llama

    from loratool.cli.info_cmd import MARKERS

    dora = _peft_saved(tmp_path / "dora", tiny_llama(), target_modules=["q_proj"], use_dora=True, use_rslora=True)
    conv1d = _peft_saved(tmp_path / "gpt2", tiny_gpt2(), target_modules=["c_attn"], fan_in_fan_out=True)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(PEFT / "adapter_model.safetensors", no_config)
    seen = set()
    for path in (LOKR, dora, conv1d, no_config, KOHYA):
        rc, out, err = run(capsys, "info", path, "--all")
        assert rc == 0, err
        for mark, meaning in MARKERS.items():
            if mark in out.split("modules\n", 1)[1].split("training settings")[0]:
                seen.add(mark)
                assert f"{mark} {meaning}" in " ".join(out.split()), (path, mark)
    assert seen == set(MARKERS)


# ---------------------------------------------------------------- --json


def _all_json(capsys, tmp_path) -> dict[str, dict]:
    shutil.copytree(LLAMA, tmp_path / "llama")
    return {
        "info": run_json(capsys, "info", KOHYA, "--stats"),
        "info_lokr": run_json(capsys, "info", LOKR),
        "info_checkpoint": run_json(capsys, "info", SD),
        "convert": run_json(capsys, "convert", KOHYA, "--to", "peft", "-o", tmp_path / "p"),
        "merge": run_json(capsys, "merge", tmp_path / "llama", PEFT, "-o", tmp_path / "m"),
        "stack": run_json(capsys, "stack", KOHYA, DIFFUSERS, "-o", tmp_path / "s.safetensors"),
        "resize": run_json(capsys, "resize", KOHYA, "--rank", "2", "-o", tmp_path / "r.safetensors"),
        "extract": run_json(capsys, "extract", tmp_path / "m", tmp_path / "llama", "--rank", "4", "-o", tmp_path / "e"),
        "check": run_json(capsys, "check", KOHYA, SD),
        "check_skipping": _json_rc(capsys, 1, "check", KOHYA, SD / "unet"),
        "diff": run_json(capsys, "diff", KOHYA, LOKR, "--plot", tmp_path / "d.png"),
        "info_plot": run_json(capsys, "info", KOHYA, "--plot", tmp_path / "i.png"),
        "info_folder": run_json(capsys, "info", FIXTURES),
    }


def _json_rc(capsys, want: int, *args) -> dict:
    rc, out, err = run(capsys, *args, "--json")
    assert rc == want, err
    return json.loads(out)


# Objects whose keys are data (tensor names, metadata keys, values), not contract fields.
_DATA_MAPS = {"metadata", "training", "modelspec", "base_model", "kinds", "layers", "alphas", "scales", "dtypes",
              "histogram", "matched", "component_modules", "component_tensors"}


def _field_types(doc, found: dict, where: str) -> None:
    if isinstance(doc, dict):
        for key, value in doc.items():
            if value is not None:
                kind = "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else \
                    type(value).__name__
                found.setdefault(key, set()).add((kind, where))
            if key not in _DATA_MAPS:
                _field_types(value, found, where)
    elif isinstance(doc, list):
        for item in doc:
            _field_types(item, found, where)


def test_json_schema_and_one_type_per_field(capsys, tmp_path):
    docs = _all_json(capsys, tmp_path)
    found: dict = {}
    for name, doc in docs.items():
        assert doc["schema"] == 1 and doc["command"] == name.split("_")[0], name
        assert isinstance(doc["warnings"], list)
        if "output" in doc:
            assert isinstance(doc["output"], str) and isinstance(doc["files"], list)
            assert all(isinstance(f, str) for f in doc["files"])
        _field_types(doc, found, name)
    mixed = {k: sorted(v) for k, v in found.items() if len({t for t, _ in v}) > 1}
    assert not mixed, mixed
    for name in ("info", "stack", "resize", "extract"):  # modules named the same way everywhere
        assert all({"component", "path"} <= set(m) for m in docs[name]["modules"]), name
    assert docs["merge"]["copied_tensors"] + docs["merge"]["merged_tensors"] == 21  # the table's "copied"


def test_json_fields_are_documented(capsys, tmp_path):
    contract = (ROOT / "docs" / "commands.md").read_text().split("## JSON contract (schema 1)")[1]
    docs = _all_json(capsys, tmp_path)
    for name, doc in docs.items():
        for key in doc:
            assert f"`{key}`" in contract, (name, key)


# ---------------------------------------------------------------- metadata


def _written_text(folder: Path) -> dict[Path, str]:
    """Every string a written file carries where a path could hide: safetensors header metadata,
    JSON files (PEFT configs, loralib sidecars), and the raw bytes of pickles."""
    out = {}
    for f in folder.rglob("*"):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as handle:
                out[f] = json.dumps(handle.metadata() or {})
        elif f.suffix == ".json":
            out[f] = f.read_text()
        else:
            out[f] = f.read_bytes().decode("latin-1")
    return out


def test_outputs_never_embed_local_paths(capsys, tmp_path):
    secret = tmp_path / "home_of_user_jane_doe"
    inputs = secret / "inputs"
    shutil.copytree(FIXTURES, inputs)
    out = tmp_path / "outputs"
    out.mkdir()
    k, d = inputs / "kohya_tiny_sd.safetensors", inputs / "diffusers_tiny_sd"
    commands = [
        ["convert", k, "--to", "peft", "-o", out / "peft"],
        ["convert", inputs / "peft_tiny_llama", "--to", "loralib", "-o", out / "lora.pt"],
        ["convert", k, "--to", "diffusers", "-o", out / "d.safetensors"],
        ["resize", k, "--rank", "2", "-o", out / "r.safetensors"],
        ["stack", k, d, "-w", "0.5", "0.5", "-o", out / "s.safetensors"],
        ["merge", inputs / "base" / "tiny_llama", inputs / "peft_tiny_llama", "-o", out / "merged"],
        ["extract", out / "merged", inputs / "base" / "tiny_llama", "--rank", "4", "-o", out / "e_peft"],
        ["extract", out / "merged", inputs / "base" / "tiny_llama", "--rank", "4", "--to", "kohya",
         "-o", out / "e.safetensors"],
    ]
    for args in commands:
        rc, _, err = run(capsys, *args)
        assert rc == 0, (args, err)
    texts = _written_text(out)
    assert len(texts) >= 10
    for f, text in texts.items():
        assert "home_of_user_jane_doe" not in text and str(tmp_path) not in text, f
    assert '"loratool.extract.base": "tiny_llama"' in texts[out / "e.safetensors"]


def test_absolute_paths_an_input_carries_are_written_as_names(capsys, tmp_path):
    """PEFT's save_pretrained records the local path the base came from; sd-scripts-style dataset
    metadata may hold one. What loratool writes from such inputs names the folders only."""
    from bad_inputs import kohya_tensors
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    secret = tmp_path / "home_of_user_jane_doe"
    shutil.copytree(LLAMA, secret / "tiny_llama")
    model = AutoModelForCausalLM.from_pretrained(str(secret / "tiny_llama"))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(secret / "peft"))
    recorded = json.loads((secret / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(secret / "tiny_llama")  # the oracle: PEFT writes the absolute path
    kohya = secret / "style.safetensors"
    save_file(kohya_tensors(), str(kohya), metadata={
        "ss_datasets": json.dumps([{"subsets": [{"image_dir": str(secret / "imgs" / "10_zwx")}]}]),
        "ss_training_comment": f"trained from {secret / 'sd15.safetensors'} at https://example.org/a/b",
    })
    out = tmp_path / "outputs"
    out.mkdir()
    for args in (["convert", secret / "peft", "--to", "peft", "-o", out / "peft"],
                 ["resize", secret / "peft", "--rank", "1", "-o", out / "small"],
                 ["convert", kohya, "--to", "kohya", "-o", out / "k.safetensors"],
                 ["stack", kohya, kohya, "-o", out / "kk.safetensors"]):
        rc, _, err = run(capsys, *args)
        assert rc == 0, (args, err)
    texts = _written_text(out)
    for f, text in texts.items():
        assert "home_of_user_jane_doe" not in text and str(tmp_path) not in text, (f, text[:300])
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny_llama"
    with safe_open(str(out / "k.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["image_dir"] == "10_zwx"
    assert meta["ss_training_comment"] == "trained from sd15.safetensors at https://example.org/a/b"


# ---------------------------------------------------------------- the Python API


def test_top_level_api_and_dir():
    import loratool

    public = {"Adapter", "LoraModule", "LoratoolError", "convert", "extract", "inspect", "load", "merge", "resize",
              "save", "stack", "__version__"}
    assert set(dir(loratool)) == public == set(loratool.__all__)
    for name in public - {"__version__"}:
        obj = getattr(loratool, name)
        assert obj.__doc__ and len(obj.__doc__.split()) > 8, name
    for name in ("merge", "resize", "stack", "extract", "inspect", "Adapter", "LoraModule"):
        assert "=" in getattr(loratool, name).__doc__, f"{name}: no formula in the docstring"


def test_reprs_are_one_line_and_getitem(tmp_path):
    import loratool

    adapter = loratool.load(KOHYA)
    text = repr(adapter)
    assert "\n" not in text and "tensor(" not in text
    assert text == "Adapter(kohya, sd1; 91 modules (text_encoder 12, unet 79); lora; rank 2–4)"
    module = adapter["unet", "down_blocks.0.attentions.0.proj_in"]
    assert repr(module) == ("LoraModule(unet:down_blocks.0.attentions.0.proj_in, lora conv, rank 4, alpha 2, "
                            "scale 0.5, 16×16×1×1 float16)")
    assert ("unet", "down_blocks.0.attentions.0.proj_in") in adapter and ("unet", "nope") not in adapter
    with pytest.raises(KeyError, match="no module"):
        adapter["unet", "nope"]
    lokr = next(iter(loratool.load(LOKR)))
    assert "(kron)" in repr(lokr) and "\n" not in repr(lokr)
    assert len(str(loratool.load(PEFT))) < 120


def test_api_operations_match_the_command_line(capsys, tmp_path):
    import loratool

    small = loratool.resize(KOHYA, 2, output=tmp_path / "api.safetensors")
    cli = run_json(capsys, "resize", KOHYA, "--rank", "2", "-o", tmp_path / "cli.safetensors")
    assert small.to_json()["modules"] == cli["modules"]
    assert load_file(str(tmp_path / "api.safetensors")).keys() == load_file(str(tmp_path / "cli.safetensors")).keys()
    stacked = loratool.stack([loratool.load(KOHYA), DIFFUSERS], [0.5, 0.5], output=tmp_path / "s.safetensors")
    assert stacked.files == [tmp_path / "s.safetensors"] and stacked.labels == ["adapter 1", "diffusers_tiny_sd"]
    assert loratool.inspect(KOHYA).to_json()["module_count"] == 91
