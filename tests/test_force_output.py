"""Never lose a user's file: what ``--force`` may replace, output names that contradict the output kind,
and the permissions of every output (the umask's, as for any new file).

``--force`` replaces a folder only when every file in it is one loratool would have written there: an
adapter writer's files (``adapter_config.json``, ``adapter_model.safetensors``,
``pytorch_lora_weights.safetensors``, at the top or in a component folder) or, for ``merge``, the files of
the base it mirrors. Anything else is listed and nothing changes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_hostile_io import snapshot

from loratool.cli import main
from loratool.io import atomic

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
KOHYA = FIXTURES / "kohya_tiny_sd.safetensors"
DIFFUSERS = FIXTURES / "diffusers_tiny_sd" / "pytorch_lora_weights.safetensors"
PEFT = FIXTURES / "peft_tiny_llama"
LORALIB = FIXTURES / "loralib_tiny.pt"
SD = FIXTURES / "base" / "tiny_sd"
TE = SD / "text_encoder" / "model.safetensors"


def run(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()[-1] if rc else ""


# ---- item 17: --force replaces only what loratool wrote -----------------------------------------------


@pytest.mark.parametrize("cmd", [
    ("convert", KOHYA, "--to", "peft"),
    ("convert", KOHYA, "--to", "diffusers"),
    ("resize", PEFT, "--rank", "2"),
    ("stack", PEFT, PEFT),
    ("merge", SD, KOHYA),
], ids=["convert-peft", "convert-diffusers", "resize", "stack", "merge"])
def test_force_never_deletes_a_users_files(tmp_path, capsys, cmd):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.md").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "draft.txt").write_text("also precious")
    before = snapshot(tmp_path)
    rc, err = run(capsys, *cmd, "-o", out, "--force")
    assert rc == 2 and "notes.md" in err and "sub/draft.txt" in err and "did not write" in err, err
    assert snapshot(tmp_path) == before


def test_force_replaces_adapter_folders_loratool_writes(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "convert", DIFFUSERS, "--to", "peft", "-o", out) == (0, "")  # P/unet, P/text_encoder
    assert (out / "unet" / "adapter_config.json").is_file()
    assert run(capsys, "convert", DIFFUSERS, "--to", "diffusers", "-o", out, "--force") == (0, "")
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert run(capsys, "convert", PEFT, "--to", "peft", "-o", out, "--force") == (0, "")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # a folder PEFT itself wrote has its model card: not loratool's, so --force stops at it
    (out / "README.md").write_text("model card")
    rc, err = run(capsys, "convert", PEFT, "--to", "peft", "-o", out, "--force")
    assert rc == 2 and "README.md" in err


def test_force_replaces_a_merged_folder_that_mirrors_the_base_only(tmp_path, capsys):
    out = tmp_path / "merged"
    assert run(capsys, "merge", SD, KOHYA, "-o", out) == (0, "")
    assert run(capsys, "merge", SD, KOHYA, "-o", out, "--force", "--alpha", "0.5") == (0, "")
    (out / "unet" / "mine.txt").write_text("x")
    before = snapshot(tmp_path)
    rc, err = run(capsys, "merge", SD, KOHYA, "-o", out, "--force")
    assert rc == 2 and "unet/mine.txt" in err
    assert snapshot(tmp_path) == before


# ---- item 18: output names that contradict the output kind --------------------------------------------


@pytest.mark.parametrize("cmd, name", [
    (("convert", KOHYA, "--to", "peft"), "x.safetensors"),
    (("convert", KOHYA, "--to", "diffusers"), "x.pt"),
    (("convert", KOHYA, "--to", "kohya"), "x.pt"),
    (("convert", PEFT, "--to", "loralib"), "x.gguf"),
    (("resize", PEFT, "--rank", "2"), "r4.safetensors"),
    (("stack", PEFT, PEFT), "s.safetensors"),
    (("merge", SD, KOHYA), "m.safetensors"),
], ids=["peft-as-file", "diffusers-pt", "kohya-pt", "loralib-gguf", "resize-peft", "stack-peft", "merge-folder"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing-file"])
def test_output_names_contradicting_the_output_kind_are_refused(tmp_path, capsys, cmd, name, existing):
    out = tmp_path / name
    if existing:
        out.write_bytes(b"the user's file")
    before = snapshot(tmp_path)
    rc, err = run(capsys, *cmd, "-o", out, "--force")
    assert rc == 2 and str(out) in err, err
    assert snapshot(tmp_path) == before


def test_a_folder_output_never_replaces_a_file(tmp_path, capsys):
    out = tmp_path / "adapter"
    out.write_bytes(b"the user's file")
    rc, err = run(capsys, "convert", PEFT, "--to", "peft", "-o", out, "--force")
    assert rc == 2 and "is a file" in err
    assert out.read_bytes() == b"the user's file"


# ---- item 19: every output gets the umask's permissions ----------------------------------------------


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    atomic._umask.cache_clear()
    yield 0o640, 0o750
    os.umask(old)
    atomic._umask.cache_clear()


def _modes(path: Path) -> set[tuple[str, int]]:
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in paths}


def test_every_writer_gives_the_umask_permissions(tmp_path, capsys, umask_027):
    file_mode, dir_mode = umask_027
    (tmp_path / "text_encoder").mkdir()
    ft = tmp_path / "text_encoder" / "model.safetensors"  # the merge output, extracted from again
    cases = [
        (("convert", DIFFUSERS, "--to", "kohya"), "k.safetensors"),
        (("convert", KOHYA, "--to", "diffusers"), "d.safetensors"),
        (("convert", KOHYA, "--to", "diffusers"), "d_folder"),
        (("convert", KOHYA, "--to", "peft"), "p_multi"),
        (("convert", LORALIB, "--to", "loralib"), "l.pt"),
        (("convert", PEFT, "--to", "loralib"), "l.safetensors"),
        (("convert", PEFT, "--to", "peft"), "p"),
        (("resize", KOHYA, "--rank", "2"), "r.safetensors"),
        (("stack", PEFT, PEFT), "s"),
        (("merge", TE, KOHYA), "text_encoder/model.safetensors"),
        (("merge", SD, KOHYA), "m"),
        (("extract", ft, TE, "--rank", "2"), "e.safetensors"),
    ]
    for cmd, name in cases:
        rc, err = run(capsys, *cmd, "-o", tmp_path / name)
        assert rc == 0, (cmd, err)
        outs = [tmp_path / name] + ([tmp_path / f"{name}.json"] if cmd[-1] == "loralib" else [])
        for out in outs:
            want = {("file", file_mode)} | ({("dir", dir_mode)} if out.is_dir() else set())
            assert _modes(out) == want, (name, out, _modes(out))
