"""merge: rewritten tensors announced to the kernel ahead of the float work (io/read_ahead.py),
the float work placed by the thread policy and the device, the same bytes whatever the choice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loratool.io import read_ahead
from loratool.io.read_ahead import ReadAhead
from loratool.io.safetensors_file import read_header
from loratool.ops import merge_tensors
from loratool.ops.merge import merge

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE = FIXTURES / "base" / "tiny_llama"
LORA = FIXTURES / "peft_tiny_llama"


@pytest.fixture
def advised(monkeypatch):
    calls: list[tuple[int, int]] = []

    def advise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        calls.append((offset, offset + length))

    monkeypatch.setattr(os, "posix_fadvise", advise, raising=False)
    return calls


def test_read_ahead_announces_a_window_ahead(advised):
    spans = [(100, 200), (0, 50), (1000, 1100), (5000, 5001), (6000, 6000)]
    ahead = ReadAhead(-1, spans, window=1000)
    ahead.reached(0)
    assert advised == [(0, 50), (100, 200)]  # in file order, up to offset + window
    ahead.reached(100)
    assert advised[-1] == (1000, 1100)
    ahead.reached(5500)
    assert advised[-1] == (5000, 5001) and ahead.announced == 50 + 100 + 100 + 1  # empty spans skipped
    ahead.reached(0)  # nothing twice
    assert len(advised) == 4


def _tensors(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_merge_announces_exactly_the_rewritten_tensors(tmp_path, advised):
    result = merge(BASE, [LORA], tmp_path / "out", device="cpu")
    header = read_header(BASE / "model.safetensors")
    before, after = _tensors(BASE), _tensors(tmp_path / "out")
    changed = {k for k in before if not (before[k] == after[k]).all()}
    at = header.data_offset
    assert sorted(advised) == sorted((at + header.tensors[k].start, at + header.tensors[k].end) for k in changed)
    assert result.merged_tensors == len(changed)


def test_whole_segment_blocks_give_the_same_bytes(tmp_path, monkeypatch):
    merge(BASE, [LORA], tmp_path / "cache_blocks", device="cpu", threads=1)
    # an accelerator works a whole segment per block: the same arithmetic, in bigger steps
    monkeypatch.setattr(merge_tensors, "_BLOCK_BYTES", 1 << 40)
    merge(BASE, [LORA], tmp_path / "segments", device="cpu", threads=2)
    a = (tmp_path / "cache_blocks" / "model.safetensors").read_bytes()
    b = (tmp_path / "segments" / "model.safetensors").read_bytes()
    assert a == b


def test_read_ahead_without_fadvise(monkeypatch):
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    ahead = read_ahead.ReadAhead(-1, [(0, 10)])
    ahead.reached(0)
    assert ahead.announced == 10
