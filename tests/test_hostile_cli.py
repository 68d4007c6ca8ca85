"""Every command, fed hostile or broken input: exit 2, one ``error:`` line, no traceback, no file touched.

Commands run in-process through ``loratool.cli.main`` (fast, same code path as the console
script); the few things only a real process shows (a file-size limit, stray warnings on
stderr) run in a subprocess.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from bad_inputs import (
    CORRUPT,
    SEMANTIC,
    TE_MODULE,
    kohya_tensors,
    snapshot,
    write_corrupt,
    write_malicious_pickle,
    write_nonfinite,
    write_semantic,
)
from safetensors.torch import save_file

from loratool.cli import main

BASE_KEYS = [f"text_model.encoder.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]


def write_base(folder: Path, dim: int = 8, name: str = "base.safetensors", seed: int = 1) -> Path:
    """A bare CLIP-text-encoder-like base whose q/k/v projections fit ``kohya_tensors(dim=dim)``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{k}.weight": torch.randn(dim, dim, generator=g) for k in BASE_KEYS}
    tensors |= {f"{k}.bias": torch.randn(dim, generator=g) for k in BASE_KEYS}
    path = folder / name
    save_file(tensors, str(path))
    return path


def write_good(folder: Path, dim: int = 8, rank: int = 2, name: str = "good.safetensors") -> Path:
    path = folder / name
    save_file(kohya_tensors(rank=rank, dim=dim), str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def write_tuned(folder: Path, base: Path, name: str = "tuned.safetensors") -> Path:
    from safetensors.torch import load_file

    tensors = load_file(str(base))
    g = torch.Generator().manual_seed(5)
    for k in BASE_KEYS[:2]:
        w = tensors[f"{k}.weight"]
        tensors[f"{k}.weight"] = w + torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    path = folder / name
    save_file(tensors, str(path))
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc: int, err: str, folder: Path, before: dict[str, bytes], *, names: tuple[str, ...] = ()) -> None:
    """Exit 2, exactly one ``error:`` line, no traceback, nothing created, changed or left behind."""
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    assert snapshot(folder) == before, "a file was created, changed or removed"
    if names:
        assert any(n in err for n in names), f"the message names none of {names}: {err}"


# One argument list per command, with BAD as the adapter under test and OUT as the output.
ADAPTER_COMMANDS = {
    "info": ["info", "BAD"],
    "info_stats": ["info", "BAD", "--stats"],
    "convert": ["convert", "BAD", "--to", "peft", "-o", "OUT"],
    "merge": ["merge", "BASE", "BAD", "-o", "OUT.safetensors"],
    "resize": ["resize", "BAD", "-o", "OUT.safetensors", "--rank", "1"],
    "stack": ["stack", "BAD", "GOOD", "-o", "OUT.safetensors"],
}
# Extract reads models, not adapters: the bad file plays the fine-tuned model, then the base.
MODEL_COMMANDS = {
    "extract_tuned": ["extract", "BAD", "BASE", "-o", "OUT.safetensors", "--rank", "2"],
    "extract_base": ["extract", "TUNED", "BAD", "-o", "OUT.safetensors", "--rank", "2"],
    "merge_base": ["merge", "BAD", "GOOD", "-o", "OUT.safetensors"],
}


def build_args(template: list[str], folder: Path, bad: Path) -> list[str]:
    repl = {
        "BAD": bad,
        "BASE": folder / "base.safetensors",
        "GOOD": folder / "good.safetensors",
        "TUNED": folder / "tuned.safetensors",
    }
    args = []
    for a in template:
        if a in repl:
            args.append(str(repl[a]))
        elif a.startswith("OUT"):
            args.append(str(folder / a.lower()))
        else:
            args.append(a)
    return args


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    base = write_base(tmp_path)
    write_good(tmp_path)
    write_tuned(tmp_path, base)
    return tmp_path


def _bad_files() -> list[str]:
    return [f"corrupt:{n}" for n in sorted(CORRUPT)] + [f"semantic:{n}" for n in sorted(SEMANTIC)] + [
        "pickle:evil_zip",
        "pickle:evil_legacy",
        "pickle:garbage",
        "missing:nope",
    ]


def make_bad(spec: str, folder: Path) -> Path:
    kind, name = spec.split(":")
    if kind == "corrupt":
        return write_corrupt(name, folder)
    if kind == "semantic":
        return write_semantic(name, folder)
    if kind == "pickle" and name.startswith("evil"):
        return write_malicious_pickle(folder, folder / "PWNED", name.split("_")[1])
    if kind == "pickle":
        path = folder / "garbage.pt"
        path.write_bytes(b"\x80\x02garbage" * 10)
        return path
    return folder / "nope.safetensors"


@pytest.mark.parametrize("spec", _bad_files())
@pytest.mark.parametrize("cmd", sorted(ADAPTER_COMMANDS))
def test_bad_adapter_is_refused(cmd, spec, workspace, capsys):
    bad = make_bad(spec, workspace)
    before = snapshot(workspace)
    rc, _, err = run(capsys, *build_args(ADAPTER_COMMANDS[cmd], workspace, bad))
    assert_refused(rc, err, workspace, before, names=(bad.name,))
    assert not (workspace / "PWNED").exists()
    if spec.startswith("pickle:evil"):
        assert "refused" in err


MODEL_BAD = [f"corrupt:{n}" for n in ("truncated_data", "garbage", "bad_json", "overlapping_offsets",
                                       "unknown_dtype", "trailing_garbage", "duplicate_key")] + [
    "pickle:evil_zip", "missing:nope"]


@pytest.mark.parametrize("spec", MODEL_BAD)
@pytest.mark.parametrize("cmd", sorted(MODEL_COMMANDS))
def test_bad_model_is_refused(cmd, spec, workspace, capsys):
    bad = make_bad(spec, workspace)
    before = snapshot(workspace)
    rc, _, err = run(capsys, *build_args(MODEL_COMMANDS[cmd], workspace, bad))
    assert_refused(rc, err, workspace, before, names=(bad.name,))
    assert not (workspace / "PWNED").exists()


# ---- outputs ------------------------------------------------------------------------------

OUTPUT_CASES = {
    "convert": ["convert", "GOOD", "--to", "kohya", "-o", "OUTPUT"],
    "merge": ["merge", "BASE", "GOOD", "-o", "OUTPUT"],
    "resize": ["resize", "GOOD", "-o", "OUTPUT", "--rank", "1"],
    "stack": ["stack", "GOOD", "GOOD2", "-o", "OUTPUT"],
    "extract": ["extract", "TUNED", "BASE", "-o", "OUTPUT", "--rank", "8"],
}


def _output_args(cmd: str, folder: Path, output: Path, *extra: str) -> list[str]:
    repl = {
        "GOOD": folder / "good.safetensors",
        "GOOD2": folder / "good2.safetensors",
        "BASE": folder / "base.safetensors",
        "TUNED": folder / "tuned.safetensors",
        "OUTPUT": output,
    }
    return [str(repl.get(a, a)) for a in OUTPUT_CASES[cmd]] + list(extra)


@pytest.mark.parametrize("cmd", sorted(OUTPUT_CASES))
def test_templates_succeed_on_good_input(cmd, workspace, capsys):
    """The argument lists above are right: on good input each command works (so a refusal
    elsewhere is about the bad input, never a usage error)."""
    write_good(workspace, name="good2.safetensors")
    out = workspace / "ok.safetensors"
    rc, _, err = run(capsys, *_output_args(cmd, workspace, out))
    assert rc == 0, err
    assert out.exists()
    assert not [p.name for p in workspace.iterdir() if p.name.startswith(".")]
    if cmd in ("convert", "resize", "stack"):
        rc, _, err = run(capsys, *build_args(ADAPTER_COMMANDS[cmd], workspace, workspace / "good.safetensors"))
        assert rc == 0, err


@pytest.mark.parametrize("cmd", sorted(OUTPUT_CASES))
@pytest.mark.parametrize("target", ["input", "exists", "no_folder", "input_hardlink"])
def test_output_is_refused(cmd, target, workspace, capsys):
    write_good(workspace, name="good2.safetensors")
    template = OUTPUT_CASES[cmd]
    inputs = [a for a in template if a in ("GOOD", "GOOD2", "BASE", "TUNED")]
    first_input = {"GOOD": "good", "GOOD2": "good2", "BASE": "base", "TUNED": "tuned"}[inputs[-1]]
    extra: tuple[str, ...] = ()
    if target == "input":
        output, extra = workspace / f"{first_input}.safetensors", ("--force",)
    elif target == "input_hardlink":
        output, extra = workspace / "link.safetensors", ("--force",)
        os.link(workspace / f"{first_input}.safetensors", output)
    elif target == "exists":
        output = workspace / "existing.safetensors"
        output.write_bytes(b"keep me")
    else:
        output = workspace / "missing_folder" / "out.safetensors"
    before = snapshot(workspace)
    rc, _, err = run(capsys, *_output_args(cmd, workspace, output, *extra))
    assert_refused(rc, err, workspace, before)
    expected = {"input": "input", "input_hardlink": "input", "exists": "--force", "no_folder": "does not exist"}
    assert expected[target] in err


@pytest.mark.parametrize("cmd", sorted(OUTPUT_CASES))
def test_interrupted_write_leaves_nothing(cmd, workspace, capsys, monkeypatch):
    """Ctrl-C after the writer filled the temporary file: exit 130, no output, no temporary file."""
    write_good(workspace, name="good2.safetensors")
    import loratool.io.atomic as atomic

    def interrupt(tmp, out, parent):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_install", interrupt)
    before = snapshot(workspace)
    rc, _, err = run(capsys, *_output_args(cmd, workspace, workspace / "out.safetensors"))
    assert rc == 130 and err.strip().splitlines()[-1] == "error: interrupted; nothing was written"
    assert snapshot(workspace) == before


def test_force_replaces_an_existing_output(workspace, capsys):
    out = workspace / "out.safetensors"
    out.write_bytes(b"old")
    rc, _, err = run(capsys, "convert", workspace / "good.safetensors", "--to", "kohya", "-o", out, "--force")
    assert rc == 0, err
    assert out.read_bytes() != b"old" and not [p for p in workspace.iterdir() if p.name.startswith(".")]


def test_file_output_does_not_replace_a_folder(workspace, capsys):
    folder = workspace / "mydir"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    before = snapshot(workspace)
    rc, _, err = run(capsys, "convert", workspace / "good.safetensors", "--to", "kohya", "-o", folder, "--force")
    assert_refused(rc, err, workspace, before)


# ---- maths-level refusals -----------------------------------------------------------------

def test_wrong_base_merge_is_refused(workspace, capsys):
    wrong = write_base(workspace, dim=6, name="wrong.safetensors")
    before = snapshot(workspace)
    rc, _, err = run(capsys, "merge", wrong, workspace / "good.safetensors", "-o", workspace / "m.safetensors")
    assert_refused(rc, err, workspace, before)
    assert "(8, 8)" in err and "(6, 6)" in err and "q_proj" in err


def test_unrelated_base_merge_is_refused(workspace, capsys):
    other = workspace / "other.safetensors"
    save_file({"foo.weight": torch.ones(3, 3)}, str(other))
    before = snapshot(workspace)
    rc, _, err = run(capsys, "merge", other, workspace / "good.safetensors", "-o", workspace / "m.safetensors")
    assert_refused(rc, err, workspace, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_adapter_merge_fails_with_module_name(value, workspace, capsys):
    bad = write_nonfinite(workspace, value)
    before = snapshot(workspace)
    out = workspace / "m.safetensors"
    rc, _, err = run(capsys, "merge", workspace / "base.safetensors", bad, "-o", out)
    assert_refused(rc, err, workspace, before)
    assert "q_proj" in err and "--allow-nonfinite" in err
    rc, _, err = run(capsys, "merge", workspace / "base.safetensors", bad, "-o", out, "--allow-nonfinite")
    assert rc == 0, err
    assert out.exists()


def test_nonfinite_result_of_a_finite_merge_fails(workspace, capsys):
    """Finite factors whose product overflows float32 give Inf in the merged weight."""
    tensors = kohya_tensors()
    tensors[f"{TE_MODULE}.lora_down.weight"] = torch.full((2, 8), 3e19)
    tensors[f"{TE_MODULE}.lora_up.weight"] = torch.full((8, 2), 3e19)
    bad = workspace / "overflow.safetensors"
    save_file(tensors, str(bad))
    before = snapshot(workspace)
    rc, _, err = run(capsys, "merge", workspace / "base.safetensors", bad, "-o", workspace / "m.safetensors")
    assert_refused(rc, err, workspace, before)
    assert "q_proj" in err


def test_nonfinite_adapter_info_stats_names_the_module(workspace, capsys):
    """``info --stats`` on a NaN adapter must report it, not crash in the SVD."""
    bad = write_nonfinite(workspace)
    rc, out, err = run(capsys, "info", bad, "--stats", "--json")
    assert rc in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err
    assert "q_proj" in (out + err)


# ---- the CLI contract ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "args",
    [["--no-such-option"], ["no-such-command"], ["info"], ["convert", "x.safetensors"], ["merge", "--alpha", "x"]],
    ids=["option", "command", "missing_arg", "missing_option", "bad_value"],
)
def test_usage_errors_exit_2_with_one_line(args, tmp_path, capsys):
    rc, _, err = run(capsys, *args)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err


def test_bare_command_shows_help(capsys):
    rc, _, err = run(capsys)
    assert rc == 2 and "Usage" in err and "Traceback" not in err


def test_bug_is_exit_1_and_traceback_only_with_debug(workspace, capsys, monkeypatch):
    import loratool.api

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(loratool.formats, "detect", broken)
    monkeypatch.setattr(loratool.api.formats, "detect", broken)
    rc, _, err = run(capsys, "info", workspace / "good.safetensors")
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("internal error: ZeroDivisionError")
    assert "Traceback" not in err and "--debug" in err
    rc, _, err = run(capsys, "--debug", "info", workspace / "good.safetensors")
    assert rc == 1 and "Traceback" in err and "ZeroDivisionError" in err


def test_loratool_error_with_debug_shows_traceback(workspace, capsys):
    rc, _, err = run(capsys, "--debug", "info", workspace / "nope.safetensors")
    assert rc == 2 and "Traceback" in err and err.splitlines()[-1].startswith("error: ")


# ---- real processes -----------------------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    from loratool.cli import main
    results = []
    for args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if args[0] == "--as-module":  # the console entry point: python -m loratool ...
                sys.argv = ["loratool", *args[1:]]
                try:
                    runpy.run_module("loratool", run_name="__main__")
                    rc = 0
                except SystemExit as exc:
                    rc = exc.code
            else:
                rc = main(args)
        results.append([rc, err.getvalue()])
    sys.__stdout__.write("RESULTS:" + json.dumps(results) + "\\n")
    """
)


def _run_driver(arg_lists: list[list[str]], limit: int | None = None) -> list[tuple[int, str]]:
    """Run ``main`` for each argument list in one fresh process (one torch import, not one per case)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="default")

    def preexec():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(arg_lists)],
        capture_output=True, text=True, timeout=300, env=env, preexec_fn=preexec,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", f"stray output on the real stderr: {proc.stderr[-2000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS:"))
    return [tuple(r) for r in json.loads(line[len("RESULTS:"):])]


def test_real_process_disk_full_and_stderr(tmp_path):
    """In a real process under a file-size limit (RLIMIT_FSIZE, standing in for a full disk):

    every writing command fails with "no space left" and leaves nothing behind (SIGXFSZ must
    not kill the process before cleanup); hostile reads print exactly one line, with no
    warning from torch or a library around it; ``python -m loratool`` exits 2.
    """
    dim = 64
    write_base(tmp_path, dim=dim)
    write_good(tmp_path, dim=dim, rank=8)
    write_good(tmp_path, dim=dim, rank=8, name="good2.safetensors")
    write_tuned(tmp_path, tmp_path / "base.safetensors")
    write_malicious_pickle(tmp_path, tmp_path / "PWNED", "raw")
    write_semantic("mismatched_rank", tmp_path)
    garbage = write_corrupt("garbage", tmp_path)
    before = snapshot(tmp_path)
    cases = sorted(OUTPUT_CASES)
    writes = [_output_args(c, tmp_path, tmp_path / f"out_{c}.safetensors") for c in cases]
    writes.append(["convert", str(tmp_path / "good.safetensors"), "--to", "peft", "-o", str(tmp_path / "peftdir")])
    reads = [
        ["info", str(tmp_path / "evil_raw.pt")],
        ["info", str(tmp_path / "mismatched_rank.safetensors")],
        ["--as-module", "info", str(garbage)],
    ]
    results = _run_driver(writes + reads, limit=512)
    for args, (rc, err) in zip(writes, results):
        assert rc == 2 and len(err.splitlines()) == 1 and "no space left" in err, (args, err)
    for args, (rc, err) in zip(reads, results[len(writes):]):
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (args, err)
    assert str(garbage) in results[-1][1]
    assert snapshot(tmp_path) == before and not (tmp_path / "PWNED").exists()
