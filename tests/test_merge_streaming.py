"""The streamed merge: row blocks, writer segments and the background writer.

The fast path merges big Linear weights a few rows at a time and writes through a writer
thread. These tests force tiny blocks and segments (so every weight spans many of them) and
check the results against PEFT's ``merge_and_unload`` in float64, plus the I/O fallbacks and
error paths that a full-size run would rarely meet.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import types

import pytest
import torch
from merge_oracles import adapter_from_peft, assert_merged, save_base
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import randomize_lora, tiny_llama

from loratool.adapter import Adapter, LoraModule
from loratool.delta import merge_weight, row_merge
from loratool.errors import NonFiniteError, OutputError
from loratool.io import checkpoint as ckmod
from loratool.io import copy_ahead, patch_writer, staging
from loratool.io import safetensors_writer as writer_mod
from loratool.io.safetensors_file import SafetensorsFile
from loratool.io.safetensors_writer import StreamingWriter, TensorSpec
from loratool.ops import merge_tensors as merge_mod
from loratool.ops.merge import merge

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of 2-3 rows and 160-byte segments: every tiny weight crosses many of both."""
    monkeypatch.setattr(merge_mod, "_BLOCK_BYTES", 200)
    monkeypatch.setattr(merge_mod, "SEGMENT_BYTES", 160)
    monkeypatch.setattr(writer_mod, "SEGMENT_BYTES", 160)
    calls = []
    real = merge_mod.PartMerger._write_blocked

    def spy(self, writer, f, src, info, merges):
        calls.append(info.name)
        return real(self, writer, f, src, info, merges)

    monkeypatch.setattr(merge_mod.PartMerger, "_write_blocked", spy)
    return calls


@pytest.mark.parametrize(("dora", "strength"), [(False, 0.8), (True, 1.0)])
def test_row_blocks_equal_peft_merge_and_unload(tmp_path, tiny_blocks, dora, strength):
    model = tiny_llama().double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_path = save_base(base, tmp_path / "model.safetensors")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules=ATTN_MLP))
    randomize_lora(pm, seed=5)
    adapter = adapter_from_peft(pm)
    for mod in pm.modules():  # PEFT's strength
        if hasattr(mod, "set_scale") and hasattr(mod, "lora_A"):
            mod.set_scale("default", strength)
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged.safetensors"
    result = merge(base_path, [adapter], out, strength, device="cpu")
    assert assert_merged(out, expected, base) == 2 * len(ATTN_MLP)
    assert len(tiny_blocks) == result.merged_tensors == 2 * len(ATTN_MLP)  # all went through row blocks


def test_row_blocks_of_an_fp16_base_with_two_adapters(tmp_path, tiny_blocks):
    """fp16 base, plain LoRA then DoRA on overlapping layers: PEFT (float64) within fp16 rounding."""
    model = tiny_llama().double()
    base16 = {k: v.detach().half() for k, v in model.state_dict().items()}
    base_path = save_base(base16, tmp_path / "model.safetensors")
    model.load_state_dict({k: v.double() for k, v in base16.items()})
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(pm, seed=1)
    first = adapter_from_peft(pm)
    pm2 = get_peft_model(pm.merge_and_unload(),
                         LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj", "o_proj"]))
    randomize_lora(pm2, seed=2)
    second = adapter_from_peft(pm2)
    expected = pm2.merge_and_unload().state_dict()
    out = tmp_path / "merged.safetensors"
    merge(base_path, [first, second], out, device="cpu")
    ours = load_file(str(out))
    assert len(tiny_blocks) == 6
    for key in tiny_blocks:
        assert ours[key].dtype == torch.float16
        want = expected[key].half()  # the oracle rounded once, as the merge does
        assert (ours[key].double() - want.double()).abs().max() <= 2 * torch.finfo(torch.float16).eps * \
            want.double().abs().max(), key


def test_fused_rows_across_block_edges_equal_peft(tmp_path, tiny_blocks, monkeypatch):
    """q/k/v stored fused in one tensor (row slices), DoRA, 3-row blocks straddling the slice edges."""
    monkeypatch.setattr(merge_mod, "_BLOCK_BYTES", 3 * 32 * 8)
    monkeypatch.setattr(merge_mod, "SEGMENT_BYTES", 7 * 32 * 8)
    monkeypatch.setattr(writer_mod, "SEGMENT_BYTES", 7 * 32 * 8)
    model = tiny_llama().double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    fused = torch.cat([base[n] for n in names])  # 32 + 16 + 16 rows
    path = save_base({"qkv": fused, "other": torch.ones(2)}, tmp_path / "sd.safetensors")
    edges = [0, 32, 48, 64]
    targets = {("model", n): ("qkv", (a, b)) for n, a, b in zip(names, edges, edges[1:])}
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj",
                                                                                             "v_proj"]))
    randomize_lora(pm, seed=9)
    adapter = Adapter()
    for m in adapter_from_peft(pm):
        if ".layers.0." in m.path:
            adapter.add(m)
    merged = pm.merge_and_unload().state_dict()
    # PEFT asks find_spec about optional packages: fake the arch knowledge only now
    fake = types.ModuleType("loratool.arch.checkpoints")
    fake.canonical_targets = lambda keys: targets
    monkeypatch.setitem(sys.modules, "loratool.arch.checkpoints", fake)
    monkeypatch.setattr(ckmod.importlib.util, "find_spec", lambda name: object())
    out = tmp_path / "o.safetensors"
    merge(path, [adapter], out, device="cpu")
    got = load_file(str(out))
    assert tiny_blocks == ["qkv"]
    want = torch.cat([merged[n] for n in names])
    err = (got["qkv"] - want).norm() / (want - fused).norm()
    assert err < 1e-10 and torch.equal(got["other"], torch.ones(2))


def _linear(out_f: int, in_f: int, r: int, dora: bool, seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    t = {"down": torch.randn(r, in_f, generator=g), "up": torch.randn(out_f, r, generator=g)}
    mag = torch.rand(out_f, generator=g) + 0.5 if dora else None
    return LoraModule("model", "x", "lora", "linear", t, alpha=float(2 * r), magnitude=mag)


@pytest.mark.parametrize("dora", [False, True])
def test_row_merge_blocks_reassemble_merge_weight(dora):
    """RowMerge over any row split equals merge_weight on the whole weight (float64, same ops)."""
    m = _linear(37, 19, 3, dora, seed=7)
    w = torch.randn(37, 19, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    whole = merge_weight(w, m, 0.6, dtype=torch.float64)
    rm = row_merge(m, 0.6, (37, 19), dtype=torch.float64)
    assert rm is not None
    for cuts in ([0, 37], [0, 1, 2, 37], [0, 10, 11, 30, 37]):
        parts = [rm.apply_(w[a:b].clone(), a) for a, b in zip(cuts, cuts[1:])]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)


def test_row_merge_declines_what_is_not_row_separable():
    lin = _linear(6, 5, 2, False, 0)
    assert row_merge(lin, 1.0, (5, 6)) is None  # shape of another weight
    fifo = LoraModule("model", "x", "lora", "linear", dict(lin.tensors), fan_in_fan_out=True)
    assert row_merge(fifo, 1.0, (5, 6)) is None
    emb = LoraModule("model", "x", "lora", "embedding", {"down": torch.ones(2, 6), "up": torch.ones(5, 2)})
    assert row_merge(emb, 1.0, (6, 5)) is None
    col_dora = _linear(6, 5, 2, True, 1)
    col_dora.hints["dora_axis"] = "in"
    col_dora.magnitude = torch.ones(5)
    assert row_merge(col_dora, 1.0, (6, 5)) is None
    assert row_merge(_linear(6, 5, 2, True, 2), 1.0, (6, 5)) is not None


def test_nonfinite_in_a_late_block_refuses_and_writes_nothing(tmp_path, tiny_blocks):
    w = torch.zeros(40, 8, dtype=torch.float16)
    base_path = save_base({"proj.weight": w, "other.weight": torch.ones(3)}, tmp_path / "model.safetensors")
    up = torch.zeros(40, 1)
    up[33] = 1e3  # only row 33 overflows fp16 (1e3 · 1e3 > 65504)
    ad = Adapter()
    ad.add(LoraModule("model", "proj", tensors={"down": torch.full((1, 8), 1e3), "up": up}))
    out = tmp_path / "o.safetensors"
    with pytest.raises(NonFiniteError, match="proj"):
        merge(base_path, [ad], out, device="cpu")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    assert tiny_blocks == ["proj.weight"]


def test_output_files_get_the_mode_new_files_get(tmp_path):
    model = tiny_llama()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folder = tmp_path / "base"
    folder.mkdir()
    save_base(base, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    ad = Adapter()
    ad.add(LoraModule("model", "model.layers.0.self_attn.q_proj",
                      tensors={"down": torch.ones(1, 32), "up": torch.ones(32, 1)}))
    mask = os.umask(0o022)  # read the process umask (loratool.io.atomic reads it once per process)
    os.umask(mask)
    merge(folder / "model.safetensors", [ad], tmp_path / "o.safetensors")
    merge(folder, [ad], tmp_path / "o_dir")
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "o.safetensors").stat().st_mode) == file_mode  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "o_dir").stat().st_mode) == dir_mode
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "o_dir" / name).stat().st_mode) == file_mode, name


def _source(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.randn(300, 7), "b": torch.arange(10.0), "c": torch.randn(5).half()}, str(src))
    f = SafetensorsFile(src)
    order = sorted(f.header.tensors.values(), key=lambda i: i.start)
    return src, f, order


@pytest.mark.parametrize("broken", ["copy_file_range", "copy_file_range+sendfile"])
def test_copies_fall_back_when_the_kernel_copy_is_refused(tmp_path, monkeypatch, broken):
    src, f, order = _source(tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    for name in broken.split("+"):
        monkeypatch.setattr(os, name, refuse, raising=False)
    out = tmp_path / "out.safetensors"
    prefix = src.read_bytes()[: f.header.data_offset]
    with StreamingWriter(out, [TensorSpec(i.name, i.dtype, i.shape) for i in order], header=prefix) as w:
        for i in order:
            w.copy_tensor(i.name, src, f.header.data_offset + i.start, i.nbytes)
    assert out.read_bytes() == src.read_bytes()


def test_segments_write_a_tensor_in_pieces(tmp_path):
    t = torch.randn(50, 3)
    specs = [TensorSpec("t", torch.float32, (50, 3)), TensorSpec("u", torch.float16, (4,))]
    out = tmp_path / "o.safetensors"
    raw = t.reshape(-1).view(torch.uint8)
    with StreamingWriter(out, specs) as w:
        assert w.begin_tensor("t") == raw.numel()
        for start in range(0, raw.numel(), 64):  # more pieces than the pool has buffers
            piece = raw[start:start + 64]
            seg = w.segment(piece.numel())
            seg[: piece.numel()].copy_(piece)
            w.write_segment(seg, piece.numel())
        w.write_tensor("u", torch.ones(4).half())
    back = load_file(str(out))
    assert torch.equal(back["t"], t) and torch.equal(back["u"], torch.ones(4).half())
    with pytest.raises(ValueError, match="missing its last"), StreamingWriter(tmp_path / "p", specs) as w:
        w.begin_tensor("t")
        seg = w.segment(8)
        w.write_segment(seg, 8)
        w.write_tensor("u", torch.ones(4).half())


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["copy-ahead thread", "patch writer thread", "streaming writer thread"])
def test_a_full_disk_in_a_writer_thread_is_an_output_error(tmp_path, monkeypatch, where):
    model = tiny_llama()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_path = save_base(base, tmp_path / "model.safetensors")
    ad = Adapter()
    ad.add(LoraModule("model", "model.layers.0.self_attn.q_proj",
                      tensors={"down": torch.ones(1, 32), "up": torch.ones(32, 1)}))
    dtype = None
    if where == "copy-ahead thread":
        monkeypatch.setattr(copy_ahead, "copy_at", _enospc)
    elif where == "patch writer thread":  # segments go out with sendfile, small tensors with pwrite
        monkeypatch.setattr(patch_writer, "pwrite_all", _enospc)
        monkeypatch.setattr(staging, "pwrite_all", _enospc)
        monkeypatch.setattr(os, "sendfile", _enospc, raising=False)
    else:  # a dtype change rewrites the file in order
        real = writer_mod._write_all

        def full(fd, data):
            if len(data) > 100:  # the header goes through; the first tensor bytes do not
                _enospc()
            real(fd, data)

        monkeypatch.setattr(writer_mod, "_write_all", full)
        monkeypatch.setattr(staging, "write_all", _enospc)
        monkeypatch.setattr(os, "sendfile", _enospc, raising=False)
        monkeypatch.setattr(writer_mod, "copy_range", _enospc)
        dtype = "bf16"
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="no space left"):
        merge(base_path, [ad], out, device="cpu", dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
