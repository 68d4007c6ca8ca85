"""The streaming writer produces files the safetensors library reads back exactly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.io.safetensors_file import SafetensorsFile
from loratool.io.safetensors_writer import StreamingWriter, TensorSpec, encode_header

TENSORS = {
    "a.weight": torch.randn(5, 3),
    "b.half": torch.randn(7).half(),
    "c.bf16": torch.randn(2, 2, 3).bfloat16(),
    "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "e.scalar": torch.tensor(2.5),
    "f.empty": torch.empty(0, 4),
    "g.bool": torch.tensor([True, False, True]),
}


def test_written_file_reads_back_with_safetensors(tmp_path):
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in TENSORS.items()]
    out = tmp_path / "o.safetensors"
    with StreamingWriter(out, specs, {"format": "pt", "note": "ü"}) as w:
        for k, v in TENSORS.items():
            w.write_tensor(k, v)
    back = load_file(str(out))
    assert set(back) == set(TENSORS)
    for k, v in TENSORS.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "ü"}
    (n,) = struct.unpack("<Q", out.read_bytes()[:8])
    assert n % 8 == 0


def test_copying_every_tensor_with_the_stored_header_is_byte_identical(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({k: v for k, v in TENSORS.items()}, str(src), metadata={"format": "pt", "x": "1"})
    f = SafetensorsFile(src)
    order = sorted(f.header.tensors.values(), key=lambda i: i.start)
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in order]
    prefix = src.read_bytes()[: f.header.data_offset]
    out = tmp_path / "out.safetensors"
    with StreamingWriter(out, specs, f.metadata, header=prefix) as w:
        assert w.reused_header
        for i in order:
            w.copy_tensor(i.name, src, f.header.data_offset + i.start, i.nbytes)
    assert out.read_bytes() == src.read_bytes()


def test_mixing_new_and_copied_tensors(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"x": torch.ones(4), "y": torch.zeros(3), "z": torch.full((2,), 7.0)}, str(src))
    f = SafetensorsFile(src)
    order = sorted(f.header.tensors.values(), key=lambda i: i.start)
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in order]
    out = tmp_path / "out.safetensors"
    with StreamingWriter(out, specs, {}) as w:
        for i in order:
            if i.name == "y":
                w.write_tensor("y", torch.arange(3.0))
            else:
                w.copy_tensor(i.name, src, f.header.data_offset + i.start, i.nbytes)
    back = load_file(str(out))
    assert torch.equal(back["y"], torch.arange(3.0)) and torch.equal(back["x"], torch.ones(4))
    assert torch.equal(back["z"], torch.full((2,), 7.0))


def test_order_size_and_completeness_are_enforced(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match="expected tensor 'a'"), StreamingWriter(tmp_path / "o", specs) as w:
        w.write_tensor("b", torch.zeros(3))
    with pytest.raises(ValueError, match="header says"), StreamingWriter(tmp_path / "o", specs) as w:
        w.write_tensor("a", torch.zeros(3))
    from loratool.errors import OutputError

    with pytest.raises(OutputError, match="never written"), StreamingWriter(tmp_path / "o", specs) as w:
        w.write_tensor("a", torch.zeros(2))


def test_header_keeps_order_and_metadata():
    specs = [TensorSpec("z", torch.float16, (2,)), TensorSpec("a", torch.float32, (1,))]
    raw = encode_header(specs, {"k": "v"})
    obj = json.loads(raw[8:])
    assert list(obj) == ["__metadata__", "z", "a"]
    assert obj["z"]["data_offsets"] == [0, 4] and obj["a"]["data_offsets"] == [4, 8]
