"""Property-based tests: random and mutated headers, tensors and adapters against every reader and writer.

Invariants:

* ``parse_header`` / ``SafetensorsFile`` either return a header that keeps every promise of the
  format (and then the reference ``safetensors`` reader agrees, tensor for tensor) or raise
  :class:`InputError` — never anything else;
* ``load_pickle_state_dict`` either returns named dense tensors or raises :class:`InputError`;
* ``loratool.load`` on any parseable file with LoRA-like keys of random shapes, forced to any
  layout, returns an adapter or raises a :class:`LoratoolError`;
* random adapters written by every writer read back with identical factors and scale.

Profiles: ``ci`` (default, < 30 s) and ``thorough`` (``HYPOTHESIS_PROFILE=thorough``).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import safetensors.torch
import torch
from bad_inputs import st_bytes, valid_kohya_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool import Adapter, LoraModule, formats, load, save
from loratool.errors import InputError, LoratoolError
from loratool.io.pickle_safe import load_pickle_state_dict
from loratool.io.safetensors_file import SafetensorsFile, itemsize, parse_header, torch_dtypes

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = torch_dtypes()
DTYPE_NAMES = sorted(DTYPES)
# Dtypes whose bytes the reference reader and torch agree on (all of ours).
NAMES = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12)


# ---- headers ------------------------------------------------------------------------------

@st.composite
def layouts(draw) -> tuple[dict, int]:
    """A valid header (dict) and the size of its data area."""
    n = draw(st.integers(0, 5))
    names = draw(st.lists(NAMES, min_size=n, max_size=n, unique=True))
    header: dict = {}
    pos = 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for s in shape:
            numel *= s
        size = numel * itemsize(DTYPES[dtype])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(NAMES, st.text(max_size=8), max_size=3))
    return header, pos


JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)


@st.composite
def mutated_layouts(draw) -> tuple[bytes, int]:
    """A valid header with one field replaced, dropped or shifted; raw JSON bytes and data size."""
    header, size = draw(layouts())
    tensors = [k for k in header if k != "__metadata__"]
    choice = draw(st.integers(0, 6))
    if tensors and choice < 5:
        entry = header[draw(st.sampled_from(tensors))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if choice == 0:
            del entry[field]
        elif choice == 1:
            entry[field] = draw(JSON_JUNK)
        elif choice == 2:
            entry["data_offsets"] = [o + draw(st.integers(-9, 9)) for o in entry["data_offsets"]]
        elif choice == 3:
            entry["shape"] = draw(st.lists(st.integers(-1, 2**64), max_size=4))
        else:
            entry["dtype"] = draw(st.sampled_from([*DTYPE_NAMES, "F128", "f32", "", "C64"]))
    elif choice == 5:
        header[draw(NAMES)] = draw(JSON_JUNK)
    size += draw(st.sampled_from([0, 0, 0, -1, 1, 7]))
    raw = json.dumps(header).encode()
    if draw(st.booleans()):
        raw += b" " * draw(st.integers(0, 7))
    return raw, max(size, 0)


def _check_consistent(header, data_size: int) -> None:
    spans = []
    for info in header.tensors.values():
        numel = 1
        for s in info.shape:
            numel *= s
        assert 0 <= info.start <= info.end <= data_size
        assert info.end - info.start == numel * itemsize(info.dtype)
        if info.end > info.start:
            spans.append((info.start, info.end))
    spans.sort()
    assert sum(e - s for s, e in spans) == data_size
    for (_, e0), (s1, _) in zip(spans, spans[1:]):
        assert e0 == s1


def _agree_with_reference(blob: bytes) -> None:
    """Write ``blob``, read it with us and with safetensors; if we accept, so must it, identically."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        path.write_bytes(blob)
        try:
            f = SafetensorsFile(path)
            ours = f.load_all()
        except InputError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
        ref = safetensors.torch.load(blob)
        assert set(ours) == set(ref)
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape
            if ref[k].numel():  # compare bytes: NaN payloads differ from themselves under ==
                assert torch.equal(ours[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8))


@given(mutated_layouts())
def test_mutated_headers_are_consistent_or_refused(case):
    raw, data_size = case
    path = Path("/nowhere/f.safetensors")
    try:
        header = parse_header(raw, 8 + len(raw) + data_size, path)
    except InputError as exc:
        assert str(path) in str(exc)
        return
    _check_consistent(header, data_size)
    _agree_with_reference(st_bytes(raw, bytes(range(256)) * (data_size // 256) + bytes(data_size % 256)))


@given(st.binary(max_size=300))
def test_random_header_bytes_are_refused_cleanly(raw):
    try:
        header = parse_header(raw, 8 + len(raw) + 64, Path("x.safetensors"))
    except InputError:
        return
    _check_consistent(header, 64)


@given(st.data())
def test_mutated_files_are_read_or_refused(data):
    blob = bytearray(valid_kohya_bytes())
    op = data.draw(st.sampled_from(["flip", "truncate", "append", "length"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif op == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    elif op == "append":
        blob += data.draw(st.binary(min_size=1, max_size=16))
    else:
        (n,) = struct.unpack("<Q", blob[:8])
        blob[:8] = struct.pack("<Q", max(0, n + data.draw(st.integers(-16, 16))))
    _agree_with_reference(bytes(blob))


# ---- pickles ------------------------------------------------------------------------------

def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GOOD_PT = _torch_bytes({"a.lora_A": torch.randn(2, 3), "a.lora_B": torch.randn(3, 2)})


@given(st.data())
def test_mutated_pickles_are_loaded_or_refused(data):
    blob = bytearray(GOOD_PT)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(1, len(blob))):]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.pt"
        path.write_bytes(bytes(blob))
        try:
            out = load_pickle_state_dict(path)
        except InputError:
            return
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items())
        assert Path(d).iterdir() and sorted(p.name for p in Path(d).iterdir()) == ["f.pt"]


@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_as_pickle_are_refused(raw, zipped):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.pt"
        if zipped:  # a zip container whose data.pkl is random
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("archive/data.pkl", raw)
        else:
            path.write_bytes(raw)
        try:
            out = load_pickle_state_dict(path)
        except InputError:
            return
        assert all(isinstance(v, torch.Tensor) for v in out.values())


# ---- readers fed random tensors -----------------------------------------------------------

# Per layout: module key prefixes, and the keys of one module with their shapes in terms of
# rank r, in-features i and out-features o (k: conv kernel).
STYLES = {
    "kohya": (["lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_down_blocks_0_attentions_0_proj_in"],
              {"lora_down.weight": "ri", "lora_up.weight": "or", "alpha": ""}),
    "locon": (["lora_unet_down_blocks_0_resnets_0_conv1"],
              {"lora_down.weight": "rikk", "lora_up.weight": "or11", "lora_mid.weight": "rrkk", "alpha": ""}),
    "loha": (["lora_te_text_model_encoder_layers_0_mlp_fc1"],
             {"hada_w1_a": "or", "hada_w1_b": "ri", "hada_w2_a": "or", "hada_w2_b": "ri", "alpha": ""}),
    "lokr": (["lora_te_text_model_encoder_layers_0_mlp_fc2"],
             {"lokr_w1": "rr", "lokr_w2_a": "or", "lokr_w2_b": "ri", "alpha": ""}),
    "peft": (["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.1.mlp.up_proj"],
             {"lora_A.weight": "ri", "lora_B.weight": "or", "lora_magnitude_vector": "o"}),
    "diffusers": (
        ["text_encoder.text_model.encoder.layers.0.self_attn.k_proj", "unet.down_blocks.0.attentions.0.proj_out"],
        {"lora_A.weight": "ri", "lora_B.weight": "or"},
    ),
    "diffusers_old": (["unet.down_blocks.0.attentions.0.proj_out"], {"lora.down.weight": "ri", "lora.up.weight": "or"}),
    "loralib": (["h.0.attn.c_attn", "transformer.wte"], {"lora_A": "ri", "lora_B": "or"}),
    "full": (["lora_te_text_model_encoder_layers_0_self_attn_v_proj"], {"diff": "oi", "diff_b": "o"}),
}
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def lora_like_tensors(draw) -> dict[str, torch.Tensor]:
    """One layout's keys with consistent shapes, then a few breakages: a dim changed, a partner
    dropped, a dtype made integer, a stray key added."""
    style = draw(st.sampled_from(sorted(STYLES)))
    prefixes, keys = STYLES[style]
    out: dict[str, torch.Tensor] = {}
    for prefix in draw(st.lists(st.sampled_from(prefixes), min_size=1, max_size=len(prefixes), unique=True)):
        dims = {"r": draw(st.integers(0, 3)), "i": draw(st.integers(1, 4)), "o": draw(st.integers(1, 4)),
                "k": draw(st.sampled_from([1, 3])), "1": 1}
        dtype = draw(st.sampled_from(FLOATS))
        for suffix, spec in keys.items():
            shape = [dims[c] for c in spec]
            if spec == "" and style != "full":
                out[f"{prefix}.{suffix}"] = torch.tensor(float(draw(st.integers(0, 8))), dtype=dtype)
            else:
                out[f"{prefix}.{suffix}"] = torch.randn(shape).to(dtype)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(out)))
        what = draw(st.sampled_from(["dim", "drop", "int", "extra", "ndim"]))
        t = out[key]
        if what == "dim" and t.dim():
            shape = list(t.shape)
            shape[draw(st.integers(0, t.dim() - 1))] = draw(st.integers(0, 5))
            out[key] = torch.randn(shape).to(t.dtype)
        elif what == "drop" and len(out) > 1:
            del out[key]
        elif what == "int":
            out[key] = t.to(torch.int32)
        elif what == "ndim":
            out[key] = t.reshape(-1)
        elif what == "extra":
            out[key.rsplit(".", 1)[0] + ".junk"] = torch.zeros(2)
    return out


PEFT_CONFIG = st.fixed_dictionaries(
    {},
    optional={
        "r": st.one_of(st.integers(-1, 4), st.text(max_size=2), st.none()),
        "lora_alpha": st.one_of(st.integers(-1, 8), st.floats(allow_nan=True), st.text(max_size=2)),
        "target_modules": st.one_of(st.lists(st.text(max_size=5), max_size=2), st.text(max_size=5), st.none()),
        "rank_pattern": st.one_of(st.dictionaries(st.text(max_size=4), st.integers(-1, 3), max_size=2), JSON_JUNK),
        "alpha_pattern": st.one_of(st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2), JSON_JUNK),
        "use_rslora": JSON_JUNK,
        "use_dora": JSON_JUNK,
        "fan_in_fan_out": JSON_JUNK,
        "peft_type": st.sampled_from(["LORA", "LOHA", "x"]),
    },
)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    lora_like_tensors(),
    st.sampled_from([None, *formats.LAYOUTS]),
    st.one_of(st.none(), PEFT_CONFIG),
    st.sampled_from([None, "sd1", "llm"]),
)
def test_readers_return_an_adapter_or_a_loratool_error(tensors, layout, config, family):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "adapter"
        folder.mkdir()
        weights = folder / "adapter_model.safetensors"
        safetensors.torch.save_file(tensors, str(weights))
        if config is not None:
            (folder / "adapter_config.json").write_text(json.dumps(config))
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        try:
            adapter = load(folder if config is not None else weights, format=layout, family=family)
        except LoratoolError as exc:
            assert "\n" not in str(exc).strip()
        else:
            assert isinstance(adapter, Adapter)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---- writers: random adapters round-trip ---------------------------------------------------

CLIP = [f"text_model.encoder.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.fc1")]
LLAMA = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")]
# Each writer with a component and module paths its layout can name without a base model.
WRITERS = {
    "kohya": ("text_encoder", CLIP, ".safetensors"),
    "diffusers": ("text_encoder", CLIP, ".safetensors"),
    "peft": ("model", LLAMA, ""),
    "loralib": ("model", LLAMA, ".pt"),
}


@st.composite
def adapters(draw, component: str, paths: list[str]) -> Adapter:
    chosen = draw(st.lists(st.sampled_from(paths), min_size=1, max_size=len(paths), unique=True))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    adapter = Adapter()
    for path in chosen:
        r = draw(st.integers(1, 4))
        n_in, n_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        # alphas a 16-bit float holds exactly (kohya stores alpha in the factors' dtype)
        alpha = draw(st.one_of(st.none(), st.integers(1, 64).map(lambda a: a / 2)))
        down = torch.randn(r, n_in, generator=g).to(dtype)
        up = torch.randn(n_out, r, generator=g).to(dtype)
        adapter.add(LoraModule(component, path, tensors={"down": down, "up": up}, alpha=alpha))
    return adapter


def _roundtrip(fmt: str, adapter: Adapter) -> None:
    _, _, suffix = WRITERS[fmt]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / f"out{suffix}"
        save(adapter, out, fmt)
        assert not [p for p in Path(d).rglob(".*")], "a temporary file was left behind"
        back = load(out)
        assert set(back.modules) == set(adapter.modules)
        for key, m in adapter.modules.items():
            b = back.modules[key]
            for name in ("down", "up"):
                assert b.tensors[name].dtype == m.tensors[name].dtype
                assert torch.equal(b.tensors[name], m.tensors[name]), (fmt, key, name)
            assert abs(b.scale - m.scale) <= 1e-6 * max(1.0, abs(m.scale)), (fmt, key, b.scale, m.scale)


@given(st.data())
def test_kohya_roundtrip(data):
    _roundtrip("kohya", data.draw(adapters(*WRITERS["kohya"][:2])))


@given(st.data())
def test_diffusers_roundtrip(data):
    _roundtrip("diffusers", data.draw(adapters(*WRITERS["diffusers"][:2])))


@given(st.data())
def test_peft_roundtrip(data):
    _roundtrip("peft", data.draw(adapters(*WRITERS["peft"][:2])))


@given(st.data())
def test_loralib_roundtrip(data):
    _roundtrip("loralib", data.draw(adapters(*WRITERS["loralib"][:2])))


def test_kohya_keeps_an_alpha_that_fp16_cannot_hold():
    adapter = Adapter()
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(1, 3, generator=g).half(), torch.randn(3, 1, generator=g).half()
    adapter.add(LoraModule("text_encoder", CLIP[0], tensors={"down": down, "up": up}, alpha=16.7734375))
    _roundtrip("kohya", adapter)
