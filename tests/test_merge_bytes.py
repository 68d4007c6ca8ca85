"""merge's output, byte for byte, against a plain reference merge written by ``safetensors.torch.save_file``.

The reference is the textbook merge: W' = cast(W + λ·s·B@A) computed in float32, every other
tensor as stored, the file written in one go by the safetensors library. The LoRA factors hold
multiples of 1/8 and the base weights multiples of 1/256 below 2, so B@A and W + λ·s·B@A (and
every partial sum of it) are exact in float32 whatever order a kernel sums in, and the one
rounding (float32 -> the stored dtype) is the same in both: any byte that differs is the writer's
doing (a segment written at the wrong offset, twice, or not at all; a copy run landing on merged
bytes; a sendfile fallback resuming at the wrong place). Each case runs with the shipped sizes
and with pieces so small (copy runs, segments, row blocks, the size from which whole tensors go
through segments) that every tensor spans many of them.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.io import copy_ahead, staging
from loratool.io import safetensors_writer as writer_mod
from loratool.ops import merge_tensors as merge_mod
from loratool.ops.merge import merge

RANK = 4
STRENGTH = 0.5
ALPHA = 2 * RANK  # PEFT scale lora_alpha / r = 2
METADATA = {"format": "pt"}  # one key: safetensors orders metadata keys at random


def _factor(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-3, 4, shape, generator=gen).float() / 8


def _values(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """Base weights: multiples of 1/256 below 2 in magnitude, stored in ``dtype`` (bf16 rounds them to 8 bits)."""
    return (torch.randint(-512, 513, shape, generator=gen).float() / 256).to(dtype)


def _case(tmp_path):
    """A base (fp16 / bf16 / fp32 Linear weights, an fp16 conv, untouched float and int tensors), a PEFT
    adapter on some of them, and the reference merged tensors: (base path, adapter folder, merged as
    stored, merged in float32 before the cast back)."""
    gen = torch.Generator().manual_seed(0)
    base = {
        "layers.0.proj.weight": _values(gen, torch.float16, 96, 80),
        "layers.0.proj.bias": _values(gen, torch.float16, 96),
        "layers.1.proj.weight": _values(gen, torch.float16, 64, 80),  # untouched
        "layers.2.proj.weight": _values(gen, torch.bfloat16, 130, 48),
        "layers.3.proj.weight": _values(gen, torch.float32, 40, 72),
        "layers.4.conv.weight": _values(gen, torch.float16, 24, 16, 3, 3),  # merged whole, not by rows
        "layers.5.proj.weight": _values(gen, torch.float16, 2000, 40),  # many segments
        "position_ids": torch.arange(77).reshape(1, 77),
    }
    lora, merged, exact = {}, dict(base), {}
    for key in ("layers.0.proj", "layers.2.proj", "layers.3.proj", "layers.4.conv", "layers.5.proj"):
        w = base[key + ".weight"]
        a_shape = (RANK, *w.shape[1:]) if w.dim() == 4 else (RANK, w.shape[1])
        b_shape = (w.shape[0], RANK, 1, 1) if w.dim() == 4 else (w.shape[0], RANK)
        a, b = _factor(gen, *a_shape), _factor(gen, *b_shape)
        lora[f"base_model.model.{key}.lora_A.weight"] = a
        lora[f"base_model.model.{key}.lora_B.weight"] = b
        delta = (b.reshape(w.shape[0], RANK) @ a.reshape(RANK, -1)).reshape(w.shape)
        exact[key + ".weight"] = w.float() + STRENGTH * (ALPHA / RANK) * delta
        merged[key + ".weight"] = exact[key + ".weight"].to(w.dtype)
    base_path = tmp_path / "base.safetensors"
    save_file(base, str(base_path), metadata=METADATA)
    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(lora, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["proj", "conv"],
        "task_type": None, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
    }))
    return base_path, folder, merged, exact


@pytest.fixture(params=["shipped sizes", "tiny pieces"])
def pieces(request, monkeypatch):
    if request.param == "tiny pieces":
        monkeypatch.setattr(copy_ahead, "RUN_BYTES", 96)
        monkeypatch.setattr(merge_mod, "_BLOCK_BYTES", 200)
        for mod in (merge_mod, writer_mod):
            monkeypatch.setattr(mod, "SEGMENT_BYTES", 336)
        monkeypatch.setattr(writer_mod, "STAGE_MIN_BYTES", 100)
    # a test that makes sendfile fail turns the kernel path off for the process: restore it after
    monkeypatch.setattr(staging, "_kernel_send", staging._kernel_send)
    return request.param


def _reference(tmp_path, tensors: dict, name: str = "ref.safetensors") -> bytes:
    path = tmp_path / name
    save_file(tensors, str(path), metadata=METADATA)
    return path.read_bytes()


@pytest.mark.parametrize("sync", [False, True])
def test_merge_equals_the_reference_byte_for_byte(tmp_path, pieces, sync):
    base_path, lora, merged, _ = _case(tmp_path)
    before = base_path.read_bytes()
    out = tmp_path / "out.safetensors"
    result = merge(base_path, [lora], out, STRENGTH, device="cpu", sync=sync)
    assert result.merged_tensors == 5 and result.skipped == 3
    assert out.read_bytes() == _reference(tmp_path, merged)
    assert base_path.read_bytes() == before  # the input is only read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "lora", "out.safetensors",
                                                          "ref.safetensors"]  # no temporary left


def _contents(data: bytes) -> tuple[dict, dict]:
    """(metadata, name -> (dtype, shape, bytes)) of a safetensors file: what it holds, whatever the order."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    at = 8 + n
    return meta, {k: (v["dtype"], v["shape"], data[at + v["data_offsets"][0]:at + v["data_offsets"][1]])
                  for k, v in header.items()}


def test_a_dtype_change_holds_the_reference_bytes(tmp_path, pieces):
    """--dtype rewrites the file in order (StreamingWriter): every float tensor is cast once (merged
    ones from their float32 sum), integer tensors are kept. The output keeps the base's tensor order
    (save_file would sort the converted tensors differently), so contents are compared by name."""
    base_path, lora, _, exact = _case(tmp_path)
    out = tmp_path / "out.safetensors"
    merge(base_path, [lora], out, STRENGTH, device="cpu", dtype="fp32")
    base = load_file(str(base_path))
    want = {k: exact.get(k, v.float() if v.is_floating_point() else v) for k, v in base.items()}
    ours = _contents(out.read_bytes())
    assert ours == _contents(_reference(tmp_path, want))
    assert list(ours[1]) == list(_contents(base_path.read_bytes())[1])  # in the base's order


@pytest.mark.parametrize("when", ["first call", "after some bytes"])
def test_a_refused_sendfile_falls_back_to_writes_with_the_same_bytes(tmp_path, pieces, monkeypatch, when):
    real = os.sendfile
    calls = []

    def sendfile(out_fd, in_fd, offset, count):
        calls.append(count)
        if when == "first call" or len(calls) > 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(out_fd, in_fd, offset, max(1, count // 2))

    monkeypatch.setattr(os, "sendfile", sendfile, raising=False)
    base_path, lora, merged, _ = _case(tmp_path)
    out = tmp_path / "out.safetensors"
    merge(base_path, [lora], out, STRENGTH, device="cpu")
    assert out.read_bytes() == _reference(tmp_path, merged)
    if sys.platform.startswith("linux"):
        assert calls and not staging.kernel_send_available()  # refused once: plain writes from then on


def test_without_kernel_sends_the_bytes_are_the_same(tmp_path, pieces, monkeypatch):
    monkeypatch.setattr(staging, "_kernel_send", False)
    base_path, lora, merged, _ = _case(tmp_path)
    out = tmp_path / "out.safetensors"
    merge(base_path, [lora], out, STRENGTH, device="cpu")
    assert out.read_bytes() == _reference(tmp_path, merged)
