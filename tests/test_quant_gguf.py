"""GGUF bases: the tensor table read header-only, dequantization, merging, requantizing, names.

Oracles: the ``gguf`` package itself (``GGUFReader`` for the layout, ``gguf.quants`` for the
values, ``GGUFWriter`` to write the bases and its ``TensorNameMap`` for llama.cpp names), PEFT's
``merge_and_unload`` and transformers' LLaMA for language models, loratool's own float32 merge into
the equivalent safetensors base for the image naming. Image GGUFs are laid out as city96's
ComfyUI-GGUF ``tools/convert.py`` writes them (original names without ``model.diffusion_model.``);
llama.cpp's ``conversion/llama.py`` (``LlamaModel.permute``) permutes q / k rows, reproduced here.
"""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, quants
from merge_oracles import save_base
from quant_bases import peft_oracle
from safetensors.torch import load_file
from tiny_models import tiny_llama

from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError, InputError
from loratool.io.checkpoint import open_checkpoint
from loratool.io.codecs import gguf_kquants as kq
from loratool.io.codecs import layout_of, read_weight
from loratool.ops.inspect import inspect_checkpoint
from loratool.ops.merge import merge

# where the fp16 scales of a block sit (d, dmin): gguf-py quants.py Q4_K / Q5_K / Q6_K / IQ4_NL
K_SCALES = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,)}


def kquant_bytes(shape, qtype, seed=0) -> np.ndarray:
    """Random blocks with small fp16 scales (any stored bytes are a valid tensor of these types)."""
    rng = np.random.default_rng(seed)
    byte_shape = quants.quant_shape_to_byte_shape(shape, qtype)
    data = rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(-1, type_size)
    for at in K_SCALES[qtype]:
        blocks[:, at:at + 2] = np.frombuffer(np.float16(rng.uniform(1e-4, 1e-3)).tobytes(), dtype=np.uint8)
    return data


def write_gguf(path, tensors: dict, arch: str | None = "flux", fields: dict | None = None) -> None:
    """``tensors``: name -> (float32 array to quantize, type) or (raw bytes, type)."""
    w = GGUFWriter(str(path), arch=arch or "flux")
    for key, value in (fields or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)
    for name, (data, qtype) in tensors.items():
        q = data if data.dtype == np.uint8 and qtype not in (T.F32, T.F16) else quants.quantize(data, qtype)
        w.add_tensor(name, q, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rnd(*shape, seed=0, std=0.05) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def mixed_base(path) -> None:
    write_gguf(path, {
        "a.weight": (rnd(64, 256, seed=1), T.Q8_0), "b.weight": (rnd(32, 256, seed=2), T.Q4_0),
        "c.weight": (rnd(48, 64, seed=3), T.F16), "d.weight": (rnd(16, 64, seed=4), T.BF16),
        "e.weight": (kquant_bytes((8, 256), T.Q4_K, 5), T.Q4_K),
        "f.weight": (kquant_bytes((8, 256), T.Q5_K, 6), T.Q5_K),
        "g.weight": (kquant_bytes((8, 256), T.Q6_K, 7), T.Q6_K), "h.bias": (rnd(64, seed=8), T.F32),
        "conv.weight": (rnd(32, 8 * 4 * 4, seed=9), T.Q8_0),  # reshaped by the converter, orig shape in the KV
        "i.weight": (kquant_bytes((8, 256), T.IQ4_NL, 10), T.IQ4_NL),  # an i-quant: read, not written
    }, fields={"comfy.gguf.orig_shape.conv.weight": [32, 8, 4, 4]})


def test_dequantization_equals_gguf_quants_bit_for_bit(tmp_path):
    mixed_base(tmp_path / "m.gguf")
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    f = ckpt.groups[0].parts[0].file
    reader = GGUFReader(tmp_path / "m.gguf")
    assert len(reader.tensors) == len(f.keys()) == 10
    for t in reader.tensors:
        ref = quants.dequantize(t.data, t.tensor_type)
        ours = read_weight(f, t.name)
        shape = (32, 8, 4, 4) if t.name == "conv.weight" else tuple(int(d) for d in reversed(t.shape))
        assert tuple(ours.shape) == shape, t.name
        assert np.array_equal(ours.float().numpy().reshape(ref.shape), ref.astype(np.float32)), t.name
    assert set(layout_of(f).entries) == {"a.weight", "b.weight", "e.weight", "f.weight", "g.weight", "conv.weight",
                                         "i.weight"}


def test_info_reads_the_tensor_table_alone_and_names_the_types(tmp_path):
    mixed_base(tmp_path / "m.gguf")
    report = inspect_checkpoint(tmp_path / "m.gguf")
    assert report.container == "gguf" and report.tensor_count == 10
    assert report.quantization == {"gguf: Q8_0": 2, "gguf: Q4_0": 1, "gguf: Q4_K": 1, "gguf: Q5_K": 1,
                                   "gguf: Q6_K": 1, "gguf: IQ4_NL": 1}
    assert report.dtypes["float16"] == 1 and report.dtypes["bfloat16"] == 1
    assert report.metadata["general.architecture"] == "flux"
    # the header, the names and the layout without torch
    code = ("import sys; from loratool.io.checkpoint import open_gguf; from loratool.io.codecs import layout_of;"
            f"f = open_gguf({str(tmp_path / 'm.gguf')!r}); print(len(layout_of(f).groups()), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["6", "False"]


def test_hostile_gguf_headers_are_refused(tmp_path):
    mixed_base(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="outside the data area|past the end"):
        open_checkpoint(tmp_path / "cut.gguf")
    (tmp_path / "count.gguf").write_bytes(data[:8] + (2**60).to_bytes(8, "little") + data[16:])
    with pytest.raises(InputError, match="more than"):
        open_checkpoint(tmp_path / "count.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGUG" + data[4:])
    with pytest.raises(InputError, match="magic"):
        open_checkpoint(tmp_path / "magic.gguf")


def adapter_for(shapes: dict[str, tuple[int, int]], seed=0, std=0.1) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    ad = Adapter(source_format=None)
    for path, (out, inp) in shapes.items():
        ad.add(LoraModule("model", path, "lora", "linear", {"down": torch.randn(4, inp, generator=gen) * std,
                                                            "up": torch.randn(out, 4, generator=gen) * std}, alpha=4.0))
    return ad


def assert_other_bytes_kept(base, out, reader: GGUFReader, rewritten) -> None:
    """Every byte outside the rewritten tensors' data is the base's (header, key/values, padding, tensors)."""
    old, new = bytearray(base.read_bytes()), bytearray(out.read_bytes())
    assert len(old) == len(new)
    for t in reader.tensors:
        if t.name in rewritten:
            span = slice(t.data_offset, t.data_offset + t.n_bytes)
            old[span] = new[span] = bytes(t.n_bytes)
    assert old == new


def test_merge_requantizes_to_the_same_type_and_keeps_every_other_byte(tmp_path):
    mixed_base(tmp_path / "m.gguf")
    # the same weights as float32 safetensors: loratool's float32 merge of them, quantized by gguf, is the oracle
    f = open_checkpoint(tmp_path / "m.gguf").groups[0].parts[0].file
    save_base({k: read_weight(f, k).float() for k in f.keys()}, tmp_path / "f32.safetensors")
    ad = adapter_for({"a": (64, 256), "b": (32, 256), "c": (48, 64), "d": (16, 64)})
    result = merge(tmp_path / "m.gguf", [ad], tmp_path / "o.gguf", device="cpu")
    merge(tmp_path / "f32.safetensors", [ad], tmp_path / "o32.safetensors", device="cpu")
    ref32 = load_file(tmp_path / "o32.safetensors")
    before, after = GGUFReader(tmp_path / "m.gguf"), GGUFReader(tmp_path / "o.gguf")
    touched = {"a.weight": T.Q8_0, "b.weight": T.Q4_0, "c.weight": T.F16, "d.weight": T.BF16}
    for t0, t1 in zip(before.tensors, after.tensors):
        assert (t1.name, t1.tensor_type, t1.data_offset) == (t0.name, t0.tensor_type, t0.data_offset)
        if t0.name in touched:
            expected = quants.quantize(ref32[t0.name].numpy(), touched[t0.name])
            assert np.array_equal(np.asarray(t1.data).view(np.uint8), expected.view(np.uint8)), t0.name
        else:
            assert np.array_equal(t1.data, t0.data), t0.name
    assert_other_bytes_kept(tmp_path / "m.gguf", tmp_path / "o.gguf", before, touched)
    assert {r["kind"] for r in result.kept["tensors"]} == {"Q8_0", "Q4_0"}  # F16 / BF16 are plain floats


def kquant_base(path) -> None:
    """Q4_K / Q5_K / Q6_K weights as llama.cpp quantizes them (ggml's reference, loratool's port:
    tests/test_gguf_kquants.py), an untouched Q4_K and a float bias."""
    write_gguf(path, {
        "e.weight": (kq.quantize(rnd(32, 512, seed=11), "Q4_K"), T.Q4_K),
        "f.weight": (kq.quantize(rnd(32, 512, seed=12), "Q5_K"), T.Q5_K),
        "g.weight": (kq.quantize(rnd(32, 512, seed=13), "Q6_K"), T.Q6_K),
        "u.weight": (kq.quantize(rnd(16, 256, seed=14), "Q4_K"), T.Q4_K), "h.bias": (rnd(32, seed=15), T.F32),
    })


def test_kquant_merge_requantizes_to_the_same_type_as_ggml_would(tmp_path):
    """Merged Q4_K / Q5_K / Q6_K tensors are the quantizer applied to W + s·B·A, W read by gguf's own
    dequantizer and the sum taken by torch here (addmm in float32, the order loratool uses); within
    half a grid step of PEFT's float64 merge; every other byte is the base's; the kept figures match
    an independent computation."""
    from test_gguf_kquants import nearest_level_holds

    kquant_base(tmp_path / "k.gguf")
    types = {"e.weight": T.Q4_K, "f.weight": T.Q5_K, "g.weight": T.Q6_K}
    ad = adapter_for({k[:-7]: (32, 512) for k in types}, seed=3, std=0.1)
    result = merge(tmp_path / "k.gguf", [ad], tmp_path / "o.gguf", device="cpu")
    before, after = GGUFReader(tmp_path / "k.gguf"), GGUFReader(tmp_path / "o.gguf")
    records = {r["tensor"]: r for r in result.kept["tensors"]}
    assert set(records) == set(types) and {r["kind"] for r in records.values()} == {"Q4_K", "Q5_K", "Q6_K"}
    for t0, t1 in zip(before.tensors, after.tensors):
        assert (t1.name, t1.tensor_type, t1.data_offset, t1.n_bytes) == (t0.name, t0.tensor_type, t0.data_offset,
                                                                          t0.n_bytes)
        if t0.name not in types:
            assert np.array_equal(t1.data, t0.data), t0.name
            continue
        m = next(m for m in ad if m.path == t0.name[:-7])
        up, down = m.tensors["up"], m.tensors["down"]
        w = torch.from_numpy(quants.dequantize(t0.data, t0.tensor_type).copy())
        merged32 = torch.addmm(w, up, down, alpha=m.scale)
        expected = kq.quantize(merged32.numpy(), t0.tensor_type.name)
        assert np.array_equal(np.asarray(t1.data), expected), t0.name
        exact = w.double() + m.scale * up.double() @ down.double()  # PEFT's W + scaling · B @ A
        assert nearest_level_holds(np.asarray(t1.data), t0.tensor_type.name, exact.numpy()), t0.name
        got = torch.from_numpy(quants.dequantize(t1.data, t1.tensor_type).copy()).double()
        update = exact - w.double()
        assert records[t0.name]["kept"] == pytest.approx(float((got - w).norm() / update.norm()), rel=1e-4)
        assert records[t0.name]["aligned"] == pytest.approx(float(((got - w) * update).sum() / update.norm() ** 2),
                                                            rel=1e-4)
    assert_other_bytes_kept(tmp_path / "k.gguf", tmp_path / "o.gguf", before, types)


def test_iquants_ask_for_a_safetensors_output_which_dequantizes(tmp_path):
    mixed_base(tmp_path / "m.gguf")
    ad = adapter_for({"i": (8, 256), "a": (64, 256)}, std=0.01)
    with pytest.raises(FormatError, match="i.weight: IQ4_NL cannot be requantized.*safetensors"):
        merge(tmp_path / "m.gguf", [ad], tmp_path / "o.gguf", device="cpu")
    assert not (tmp_path / "o.gguf").exists()
    result = merge(tmp_path / "m.gguf", [ad], tmp_path / "o.safetensors", device="cpu")
    out = load_file(tmp_path / "o.safetensors")
    f = open_checkpoint(tmp_path / "m.gguf").groups[0].parts[0].file
    for key in f.keys():
        base = read_weight(f, key)
        if key in ("i.weight", "a.weight"):
            assert out[key].dtype == torch.bfloat16
            m = next(m for m in ad if m.path == key[:-7])
            exact = base.double() + m.scale * m.tensors["up"].double() @ m.tensors["down"].double()
            assert torch.allclose(out[key].double(), exact, rtol=2 ** -8, atol=0), key
        elif f.info(key).plain:
            assert out[key].dtype == base.dtype and torch.equal(out[key], base), key  # F16 / BF16 / F32 as stored
        else:
            assert torch.equal(out[key], base.to(torch.bfloat16)), key
    assert out["conv.weight"].shape == (32, 8, 4, 4)
    with pytest.raises(Exception, match="--dtype needs a .safetensors output"):
        merge(tmp_path / "m.gguf", [ad], tmp_path / "x.gguf", device="cpu", dtype="fp16")
    assert result.kept["tensors"]


def test_flux_gguf_names_go_through_the_flux_key_map(tmp_path):
    """A kohya Flux LoRA (fused q/k/v rows) merged into a ComfyUI-GGUF Flux file (BFL names without
    model.diffusion_model.) equals the same merge into the BFL safetensors single file."""
    from test_family_merge import FLUX_TARGETS, bfl_from_diffusers, kohya_lora, tiny_flux

    ckpt = {k.removeprefix("model.diffusion_model."): v.half() for k, v in
            bfl_from_diffusers(tiny_flux().state_dict()).items()}
    save_base(ckpt, tmp_path / "flux.safetensors")
    write_gguf(tmp_path / "flux.gguf", {k: (v.float().numpy(), T.F16) for k, v in ckpt.items()}, arch="flux")
    lora = kohya_lora({p: tuple(ckpt[p + ".weight"].shape) for p in FLUX_TARGETS}, seed=2)
    save_base(lora, tmp_path / "lora.safetensors", {"ss_base_model_version": "flux1"})
    r1 = merge(tmp_path / "flux.gguf", [tmp_path / "lora.safetensors"], tmp_path / "o.gguf", device="cpu")
    r2 = merge(tmp_path / "flux.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "o.safetensors",
               device="cpu")
    assert r1.matched == r2.matched == {"transformer": 13} and not r1.unmatched  # fused q/k/v: 3 modules each
    ref = load_file(tmp_path / "o.safetensors")
    out = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "o.gguf").tensors}
    for key, v in ref.items():
        assert np.array_equal(out[key].reshape(v.shape), v.numpy()), key


def llama_gguf(path, state: dict[str, torch.Tensor], heads: int, kv_heads: int) -> None:
    """A tiny LLaMA as llama.cpp's converter writes it: llama.cpp names, q / k rows permuted."""
    def permute(w: np.ndarray, n: int) -> np.ndarray:  # conversion/llama.py LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    tensors = {}
    for key, v in state.items():
        data = v.float().numpy()
        if key.endswith("q_proj.weight"):
            data = permute(data, heads)
        elif key.endswith("k_proj.weight"):
            data = permute(data, kv_heads)
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        qtype = T.Q8_0 if data.ndim == 2 and data.shape[1] % 32 == 0 and "embd" not in name else T.F32
        tensors[name] = (data, qtype)
    write_gguf(path, tensors, arch="llama", fields={"llama.block_count": 2, "llama.attention.head_count": heads,
                                                    "llama.attention.head_count_kv": kv_heads})


def test_llama_gguf_merges_under_hf_names_and_unpermutes_q_and_k(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    llama_gguf(tmp_path / "llama.gguf", model.state_dict(), heads=4, kv_heads=2)
    f = open_checkpoint(tmp_path / "llama.gguf").groups[0].parts[0].file
    assert "model.layers.0.self_attn.q_proj.weight" in f and "lm_head.weight" in f and "model.norm.weight" in f
    assert f.info("model.layers.1.self_attn.k_proj.weight").stored_name == "blk.1.attn_k.weight"
    decoded = {k: read_weight(f, k).float() for k in f.keys()}
    # dequantized and un-permuted: within a Q8_0 step of the original weights
    for key, v in model.state_dict().items():
        assert torch.allclose(decoded[key], v, atol=float(v.abs().max()) / 100), key
    adapter, oracle, _ = peft_oracle(decoded, ["q_proj", "k_proj", "v_proj"])
    merge(tmp_path / "llama.gguf", [adapter], tmp_path / "o.gguf", device="cpu")
    merge(tmp_path / "llama.gguf", [adapter], tmp_path / "o.safetensors", device="cpu", dtype="fp32")
    g = open_checkpoint(tmp_path / "o.gguf").groups[0].parts[0].file
    out = load_file(tmp_path / "o.safetensors")
    assert set(out) == set(oracle)  # Hugging Face names
    for key, exact in oracle.items():
        assert torch.allclose(read_weight(g, key).double(), exact, atol=float(exact.abs().max()) / 100), key
        assert torch.allclose(out[key].double(), exact, atol=1e-6), key  # the float32 merge, no requantization
    # the safetensors output is a LLaMA state dict transformers loads as it is
    merged = LlamaForCausalLM(model.config).eval()
    merged.load_state_dict(out, strict=True)
    ids = torch.arange(12).reshape(1, 12)
    peft_merged = LlamaForCausalLM(model.config).eval()
    peft_merged.load_state_dict({k: v.float() for k, v in oracle.items()})
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_merged(ids).logits, atol=1e-5)
