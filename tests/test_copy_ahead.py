"""Copy-ahead: the merge copies base files while torch loads, then writes changed tensors over the copy.

The copy runs on its own thread; these tests pin down the contract the merge relies on: a copy is
byte-identical, skipped runs are never copied, a copy never lands on bytes written after
``wait_clear`` (checked with a deliberately slow copy), errors and cancels reach the caller,
and a whole merge through tiny runs still equals PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from merge_oracles import adapter_from_peft, assert_merged, save_base
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tiny_models import randomize_lora, tiny_llama

from loratool.io import copy_ahead
from loratool.io.copy_ahead import CopyAhead, runs_of
from loratool.io.patch_writer import PatchWriter
from loratool.io.safetensors_file import SafetensorsFile
from loratool.ops.merge import merge

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _spans(f: SafetensorsFile) -> list[tuple[int, int]]:
    at = f.header.data_offset
    return [(0, at)] + sorted((at + i.start, at + i.end) for i in f.header.tensors.values())


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"big": torch.randn(64, 8, generator=g), "s1": torch.randn(3, generator=g),
               "s2": torch.randn(5, generator=g), "mid": torch.randn(16, 4, generator=g)}, str(path))
    return path, SafetensorsFile(path)


def test_runs_cover_the_file_and_stay_inside_big_tensors(monkeypatch):
    monkeypatch.setattr(copy_ahead, "RUN_BYTES", 100)
    spans = [(0, 40), (40, 60), (60, 310), (310, 320), (320, 330), (330, 430), (430, 431)]
    runs = runs_of(spans)
    assert runs[0][0] == 0 and runs[-1][1] == 431
    assert all(a == b for (_, a), (b, _) in zip(runs, runs[1:]))  # contiguous, in order
    assert all(b - a <= 100 for a, b in runs)
    for a, b in runs:  # inside one span, or whole spans only
        inside = any(s <= a and b <= e for s, e in spans)
        whole = all(a <= s and e <= b for s, e in spans if s < b and e > a)
        assert inside or whole, (a, b)
    assert [r for r in runs if 60 <= r[0] < 310] == [(60, 160), (160, 260), (260, 310)]


def test_a_copy_is_byte_identical(tmp_path, source, monkeypatch):
    monkeypatch.setattr(copy_ahead, "RUN_BYTES", 64)
    path, f = source
    out = tmp_path / "out.safetensors"
    with CopyAhead([(path, out, _spans(f))]) as copier:
        copier.wait_file(out)
    assert out.read_bytes() == path.read_bytes()


def test_skipped_tensors_get_the_written_bytes_even_when_the_copy_is_slow(tmp_path, source, monkeypatch):
    """A slow copy cannot overwrite bytes written after ``wait_clear`` (small tensors share one run)."""
    monkeypatch.setattr(copy_ahead, "RUN_BYTES", 64)
    real = copy_ahead.copy_at

    def slow(*args):
        time.sleep(0.005)
        real(*args)

    monkeypatch.setattr(copy_ahead, "copy_at", slow)
    path, f = source
    at = f.header.data_offset
    new = {"big": torch.full((64, 8), 7.0), "s1": torch.full((3,), -1.0)}  # s1 sits in a run with s2
    spans = {k: (at + f.info(k).start, at + f.info(k).end) for k in new}
    out = tmp_path / "out.safetensors"
    with CopyAhead([(path, out, _spans(f))]) as copier:
        copier.settle({out: list(spans.values())})
        with PatchWriter(out, spans, copier) as writer:
            for name, tensor in new.items():
                writer.write_tensor(name, tensor)
        copier.wait_file(out)
    got = SafetensorsFile(out)
    assert torch.equal(got.get("big"), new["big"]) and torch.equal(got.get("s1"), new["s1"])
    assert torch.equal(got.get("s2"), f.get("s2")) and torch.equal(got.get("mid"), f.get("mid"))


def test_a_copy_error_reaches_the_waiting_caller(tmp_path, source, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(copy_ahead, "copy_at", full)
    path, f = source
    out = tmp_path / "out.safetensors"
    with pytest.raises(OSError, match="No space"), CopyAhead([(path, out, _spans(f))]) as copier:
        copier.wait_file(out)


def test_leaving_with_an_error_stops_the_copy(tmp_path, source, monkeypatch):
    monkeypatch.setattr(copy_ahead, "RUN_BYTES", 8)
    release = threading.Event()
    calls = []
    real = copy_ahead.copy_at

    def gated(*args):
        calls.append(args[2])
        release.wait(5)
        real(*args)

    monkeypatch.setattr(copy_ahead, "copy_at", gated)
    path, f = source
    out = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt), CopyAhead([(path, out, _spans(f))]):
        threading.Timer(0.05, release.set).start()
        raise KeyboardInterrupt
    n_runs = len(runs_of(_spans(f)))
    assert len(calls) < n_runs  # the thread stopped after the run it was copying
    assert not [t for t in threading.enumerate() if t.name == "copy-ahead"]


def test_merge_through_tiny_runs_equals_peft(tmp_path, monkeypatch):
    """Every tensor spans several runs and small ones share runs: the result is still PEFT's."""
    monkeypatch.setattr(copy_ahead, "RUN_BYTES", 96)
    model = tiny_llama().double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folder = tmp_path / "base"
    folder.mkdir()
    save_base(base, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    randomize_lora(pm, seed=3)
    adapter = adapter_from_peft(pm)
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    ticks = []
    result = merge(folder, [adapter], tmp_path / "out", 1.0, device="cpu",
                   progress=lambda what, done, total: ticks.append((done, total)))
    assert assert_merged(tmp_path / "out" / "model.safetensors", expected, base) == result.merged_tensors
    total = len(base)
    assert result.merged_tensors + result.skipped == total
    assert ticks[-1] == (total, total) and [d for d, _ in ticks] == sorted(d for d, _ in ticks)
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_deferred_runs_wait_for_settle(tmp_path, source, monkeypatch):
    monkeypatch.setattr(copy_ahead, "RUN_BYTES", 64)
    path, f = source
    big, mid = (_span_of(f, k) for k in ("big", "mid"))
    out = tmp_path / "out.safetensors"
    with CopyAhead([(path, out, _spans(f))], defer={out: [big]}) as copier:
        copier.wait_clear(out, *mid)  # mid comes after big in the file: copied first anyway
        data = out.read_bytes()
        assert data[big[0]:big[1]].count(0) == len(data[big[0]:big[1]])  # big not copied yet
        copier.settle({out: []})  # the guess was wrong: nothing is rewritten
        copier.wait_file(out)
    assert out.read_bytes() == path.read_bytes()


def _span_of(f: SafetensorsFile, key: str) -> tuple[int, int]:
    info, at = f.info(key), f.header.data_offset
    return at + info.start, at + info.end


def test_the_name_guess_finds_what_a_peft_adapter_changes():
    """On the PEFT fixture (written by PEFT) the guess holds every tensor the merge rewrites, and few others."""
    from loratool.io.checkpoint import open_checkpoint
    from loratool.ops import merge as merge_ops
    from loratool.ops.merge_tensors import plan_merge

    ckpt = open_checkpoint(FIXTURES / "base" / "tiny_llama")
    part = ckpt.groups[0].parts[0]
    copies = [(part, part.path)]
    lora = FIXTURES / "peft_tiny_llama"
    guessed = set(merge_ops._guess_rewrites(copies, [lora])[part.path])
    plan, _, _ = plan_merge(ckpt, [lora], [1.0], "cpu", strict=True, allow_nonfinite=False)
    changed = set(merge_ops._rewrites(copies, plan.applications.keys())[part.path])
    assert changed and changed <= guessed
    assert len(guessed) < len(part.file.keys()) // 2
