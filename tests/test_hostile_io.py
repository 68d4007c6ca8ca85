"""The io layer refuses hostile bytes with one clear InputError, and outputs appear whole or not at all."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from bad_inputs import (
    CORRUPT,
    kohya_tensors,
    snapshot,
    st_bytes,
    valid_kohya_bytes,
    write_corrupt,
    write_malicious_pickle,
)

from loratool.errors import InputError, LoratoolError, OutputError
from loratool.io.atomic import atomic_path, check_output, write_bytes_atomic
from loratool.io.pickle_safe import load_pickle_state_dict
from loratool.io.safetensors_file import SafetensorsFile, load_safetensors, read_header

# The phrase each corruption's message must contain: the problem named, not just "invalid".
EXPECTED = {
    "empty": "only 0 bytes",
    "short": "only 3 bytes",
    "truncated_data": "outside the data area",
    "truncated_header": "beyond the end of the file",
    "garbage": "not a safetensors file",
    "huge_header_length": "exceeds the 100 MB cap",
    "header_over_cap": "exceeds the 100 MB cap",
    "header_past_eof": "beyond the end of the file",
    "bad_json": "not valid JSON",
    "not_utf8": "not UTF-8",
    "json_array": "not a JSON object",
    "deep_json": "not usable JSON",
    "huge_int": "not usable JSON",
    "unknown_dtype": "unknown dtype 'F128'",
    "dtype_not_string": "unknown dtype",
    "bool_shape": "invalid shape",
    "negative_shape": "invalid shape",
    "float_offsets": "invalid data_offsets",
    "shape_size_mismatch": "claims shape [3, 8]",
    "overlapping_offsets": "overlap",
    "offsets_past_end": "outside the data area",
    "duplicate_key": "repeats the key",
    "metadata_not_strings": "__metadata__ must map strings to strings",
    "entry_not_object": "is not an object",
    "trailing_garbage": "after the last tensor",
    "zero_sized_flood": "impossible shape",
}


# Files the Rust reader accepts but we refuse, on purpose (see docs/safety.md): a repeated key
# is ambiguous (the last one silently wins there).
STRICTER_THAN_REFERENCE = {"duplicate_key"}


def test_every_corruption_has_an_expectation():
    assert set(EXPECTED) == set(CORRUPT)


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_safetensors_is_refused_by_us_and_by_the_reference(name, tmp_path):
    path = write_corrupt(name, tmp_path)
    before = path.read_bytes()
    with pytest.raises(InputError) as info:
        SafetensorsFile(path)
    msg = str(info.value)
    assert str(path) in msg and EXPECTED[name] in msg
    assert "\n" not in msg and len(msg) < 600
    assert path.read_bytes() == before
    # The reference implementation agrees these files are invalid (we are not merely stricter).
    if name not in STRICTER_THAN_REFERENCE:
        with pytest.raises(Exception):  # noqa: B017 - any refusal by the reference counts
            safetensors.torch.load_file(path)


def test_valid_file_reads_exactly_what_safetensors_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    tensors = kohya_tensors()
    tensors["bf16"] = torch.randn(3, 5).to(torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar_i64"] = torch.tensor(7)
    safetensors.torch.save_file(tensors, path, metadata={"a": "b"})
    ours, meta = load_safetensors(path)
    ref = safetensors.torch.load_file(path)
    assert meta == {"a": "b"}
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape
        assert torch.equal(ours[k], ref[k])


def test_header_padded_with_spaces_is_accepted(tmp_path):
    """The spec allows trailing spaces in the header (writers pad to 8 bytes)."""
    path = tmp_path / "padded.safetensors"
    header = '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}' + " " * 7
    path.write_bytes(st_bytes(header, torch.tensor([1.0, 2.0]).numpy().tobytes()))
    assert torch.equal(SafetensorsFile(path).get("a"), safetensors.torch.load_file(path)["a"])


def test_missing_folder_and_special_files_are_input_errors(tmp_path):
    for path, phrase in ((tmp_path / "nope.safetensors", "no such file"), (tmp_path, "is a folder")):
        with pytest.raises(InputError, match=phrase):
            read_header(path)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.safetensors"
        os.mkfifo(fifo)
        with pytest.raises(InputError, match="not a regular file"):  # and it must not block
            read_header(fifo)


def test_unreadable_file_is_an_input_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.safetensors"
    path.write_bytes(valid_kohya_bytes())
    path.chmod(0)
    if os.geteuid() == 0:  # root reads everything: make open() refuse as it would for a user

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr("loratool.io.safetensors_file.open", refuse, raising=False)
    with pytest.raises(InputError, match="permission denied"):
        read_header(path)


# ---- pickles ------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["zip", "legacy", "raw"])
def test_malicious_pickle_does_not_run(style, tmp_path):
    marker = tmp_path / "PWNED"
    path = write_malicious_pickle(tmp_path, marker, style)
    with pytest.raises(InputError) as info:
        load_pickle_state_dict(path)
    msg = str(info.value)
    assert not marker.exists()
    assert "refused" in msg and str(path) in msg and "\n" not in msg
    assert "weights_only` set to `False`" not in msg  # never advise the unsafe load


def test_malicious_pickle_names_the_global_it_asked_for(tmp_path):
    path = write_malicious_pickle(tmp_path, tmp_path / "m", "zip")
    with pytest.raises(InputError, match=r"GLOBAL (posix|os)\.system"):
        load_pickle_state_dict(path)


def test_pickle_payload_really_would_run(tmp_path):
    """Guard against a vacuous test: an unrestricted load of the same file does create the marker."""
    marker = tmp_path / "PWNED"
    path = write_malicious_pickle(tmp_path, marker, "zip")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_weights_only_cannot_be_switched_off_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    with pytest.raises(InputError, match="refused"):
        load_pickle_state_dict(write_malicious_pickle(tmp_path, marker, "zip"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage" * 50, b"PK\x03\x04broken zip", valid_kohya_bytes()],
    ids=["empty", "garbage", "broken_zip", "safetensors_named_pt"],
)
def test_unreadable_pickle_is_an_input_error(content, tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match="not a readable torch checkpoint|refused"):
        load_pickle_state_dict(path)


def test_pickle_of_non_tensors_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2), "x"], path)
    with pytest.raises(InputError, match="expected a dict of tensors"):
        load_pickle_state_dict(path)
    torch.save([torch.ones(2)], path)  # a list of tensors (lora_diffusion's save_lora_weight): indices as names
    assert list(load_pickle_state_dict(path)) == ["0"]
    torch.save({"a": 3}, path)
    with pytest.raises(InputError, match="not a named tensor"):
        load_pickle_state_dict(path)
    torch.save({"a": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(InputError, match="dense real"):
        load_pickle_state_dict(path)


def test_plain_pickle_checkpoint_loads(tmp_path):
    path = tmp_path / "ok.pt"
    tensors = kohya_tensors()
    torch.save({"state_dict": tensors}, path)
    loaded = load_pickle_state_dict(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


# ---- atomic outputs -----------------------------------------------------------------------

def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    for exc in (RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)):
        with pytest.raises(type(exc)), atomic_path(out) as tmp:
            tmp.write_bytes(b"partial")
            raise exc
        assert snapshot(tmp_path) == {"out.safetensors": b"old"}


def test_failed_folder_write_leaves_nothing(tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt), atomic_path(out, folder=True) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_successful_write_gets_normal_permissions(tmp_path):
    out = tmp_path / "out.bin"
    write_bytes_atomic(out, b"data")
    assert out.read_bytes() == b"data"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_file_output_never_replaces_a_folder(tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(OutputError, match="is a folder"):
        write_bytes_atomic(out, b"data")
    assert snapshot(tmp_path) == {"keep/precious.txt": b"x"}
    with pytest.raises(OutputError, match="is a folder"):
        check_output(out, force=True, folder=False)
    (out / "sub").mkdir()
    with pytest.raises(OutputError, match=r"did not write \(precious.txt\)"):
        check_output(out, force=True, folder=True)
    assert snapshot(tmp_path) == {"keep/precious.txt": b"x"}


def test_force_replaces_a_folder_only_when_the_caller_owns_every_file(tmp_path):
    """A pipeline or multi-component PEFT folder loratool wrote may be replaced; any other file stops it."""
    from pathlib import PurePosixPath

    from loratool.formats.outputs import adapter_file

    pipe = tmp_path / "merged"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    mirrored = {PurePosixPath("model_index.json"), PurePosixPath("unet/config.json")}
    assert check_output(pipe, force=True, folder=True, owned=mirrored.__contains__) == pipe
    peft = tmp_path / "peft"
    for comp in ("unet", "text_encoder"):
        (peft / comp).mkdir(parents=True)
        (peft / comp / "adapter_config.json").write_text("{}")
    assert check_output(peft, force=True, folder=True, owned=adapter_file) == peft
    (pipe / "unet" / "deeper").mkdir()
    (pipe / "unet" / "deeper" / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="unet/deeper/mine.txt"):
        check_output(pipe, force=True, folder=True, owned=mirrored.__contains__)
    (peft / "notes").mkdir()
    (peft / "notes" / "todo.md").write_text("x")
    with pytest.raises(OutputError, match="notes/todo.md"):
        check_output(peft, force=True, folder=True, owned=adapter_file)
    with pytest.raises(OutputError, match="did not write"):
        check_output(tmp_path / "merged", force=True, folder=True)  # nobody owns anything: only empty folders go


def test_check_output_refusals(tmp_path):
    src = tmp_path / "in.safetensors"
    src.write_bytes(b"x")
    link = tmp_path / "hard.safetensors"
    os.link(src, link)
    peft = tmp_path / "peft"
    peft.mkdir()
    cases = [
        (src, [src], True, "overwrite the input"),
        (tmp_path / "." / "in.safetensors", [src], True, "overwrite the input"),
        (link, [src], True, "overwrite the input"),
        (peft / "out.safetensors", [peft], True, "inside the input folder"),
        (tmp_path, [src], True, "holds the input"),
        (src, [], False, "already exists"),
        (tmp_path / "nope" / "out.safetensors", [], False, "does not exist"),
    ]
    for out, inputs, force, phrase in cases:
        with pytest.raises(OutputError, match=phrase):
            check_output(out, inputs, force)
    assert check_output(tmp_path / "new.safetensors", [src]) == tmp_path / "new.safetensors"


def test_unwritable_folder_is_an_output_error(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:  # root writes everywhere: make the temporary file refuse as it would for a user

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("tempfile.mkstemp", refuse)
    try:
        with pytest.raises(OutputError, match="cannot write: Permission denied"):
            write_bytes_atomic(folder / "out.bin", b"x")
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


def test_wrapped_disk_full_errors_become_output_errors(tmp_path):
    """Writers that wrap ENOSPC in their own exception (safetensors' Rust, torch's zip) count too."""
    out = tmp_path / "o.safetensors"
    for exc in (
        OSError(28, "No space left on device"),
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        Exception("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge, message: \"File too large\" })"),
    ):
        with pytest.raises(OutputError, match="no space left"), atomic_path(out) as tmp:
            tmp.write_bytes(b"x")
            raise exc
        assert list(tmp_path.iterdir()) == []


def test_loratool_errors_inside_a_write_pass_through_unchanged(tmp_path):
    with pytest.raises(LoratoolError, match="^mine$"), atomic_path(tmp_path / "o") as tmp:
        tmp.write_bytes(b"x")
        raise InputError("mine")
    assert list(tmp_path.iterdir()) == []


DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # what loratool.cli.main does
    import safetensors.torch, torch
    from loratool.errors import OutputError
    from loratool.io.atomic import atomic_path, write_bytes_atomic
    folder = Path(sys.argv[1])
    results = []
    try:
        write_bytes_atomic(folder / "raw.bin", b"x" * 100_000)
    except OutputError as exc:
        results.append(str(exc))
    try:
        with atomic_path(folder / "st.safetensors") as tmp:
            safetensors.torch.save_file({"a": torch.zeros(50_000)}, tmp)
    except OutputError as exc:
        results.append(str(exc))
    try:
        with atomic_path(folder / "t.pt") as tmp:
            torch.save({"a": torch.zeros(50_000)}, tmp)
    except OutputError as exc:
        results.append(str(exc))
    print("\\n".join(results))
    """
)


def test_disk_full_leaves_nothing_behind(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk, for three kinds of writer."""
    import resource

    limit = 20_000
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout + proc.stderr
    assert all("no space left" in line and "nothing was written" in line for line in lines)
    assert list(tmp_path.iterdir()) == []
