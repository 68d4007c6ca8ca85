"""Generators of hostile and broken adapter files, for the tests that prove loratool refuses them.

Every generator writes into a folder it is given and returns the path it wrote. The byte-level
corruptions start from one valid kohya-style file (``valid_kohya_bytes``) so that each file is
broken in exactly one way. The names in ``CORRUPT`` and ``SEMANTIC`` are the test ids.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

# A text-encoder attention projection: kohya and HF CLIP name it the same way in every family.
TE_MODULE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TE_MODULE_2 = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"


def kohya_tensors(rank: int = 2, dim: int = 8, seed: int = 0, modules=(TE_MODULE, TE_MODULE_2)) -> dict:
    """A small, valid kohya LoRA: ``lora_down`` [r, dim], ``lora_up`` [dim, r], ``alpha``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        out[f"{m}.lora_down.weight"] = torch.randn(rank, dim, generator=g)
        out[f"{m}.lora_up.weight"] = torch.randn(dim, rank, generator=g)
        out[f"{m}.alpha"] = torch.tensor(float(rank))
    return out


def valid_kohya_bytes(rank: int = 2, dim: int = 8) -> bytes:
    import safetensors.torch

    return safetensors.torch.save(kohya_tensors(rank, dim), metadata={"ss_network_module": "networks.lora"})


def st_bytes(header: dict | str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from an explicit header (dict, JSON text or raw bytes) and data area."""
    if isinstance(header, dict):
        raw = json.dumps(header).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _mutate(change: Callable[[dict], None]) -> Callable[[], bytes]:
    def make() -> bytes:
        header, data = split(valid_kohya_bytes())
        change(header)
        return st_bytes(header, data)

    return make


def _first_tensor(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def _overlap() -> bytes:
    # up's bytes start inside down's: one byte range read as two tensors (hides data, confuses hashes).
    header = {
        f"{TE_MODULE}.lora_down.weight": _entry("F32", [2, 2], 0, 16),
        f"{TE_MODULE}.lora_up.weight": _entry("F32", [2, 2], 8, 24),
    }
    return st_bytes(header, b"\0" * 24)


def _dup_key() -> bytes:
    header, data = split(valid_kohya_bytes())
    text = json.dumps(header)
    name, entry = next((k, v) for k, v in header.items() if k != "__metadata__")
    dup = json.dumps({name: entry})[1:-1]
    return st_bytes(text[:-1] + ", " + dup + "}", data)


def _deep_json() -> bytes:
    return st_bytes("[" * 100_000 + "]" * 100_000)


def _garbage() -> bytes:
    return random.Random(7).randbytes(4096)


def _zero_sized_flood() -> bytes:
    # Thousands of empty tensors whose shapes multiply past int64: no data, all trickery.
    header = {f"t{i}.lora_down.weight": _entry("F32", [2**40, 2**40, 0], 0, 0) for i in range(2000)}
    return st_bytes(header)


CORRUPT: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "short": lambda: b"\x10\x00\x00",
    "truncated_data": lambda: valid_kohya_bytes()[:-9],
    "truncated_header": lambda: valid_kohya_bytes()[:40],
    "garbage": _garbage,
    "huge_header_length": lambda: st_bytes(b"{}", length=2**63 + 5),
    "header_over_cap": lambda: st_bytes(b"{}", length=200 * 1024 * 1024),
    "header_past_eof": lambda: st_bytes(b"{}", length=4096),
    "bad_json": lambda: st_bytes('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'),
    "not_utf8": lambda: st_bytes(b'{"\xff\xfe": 1}'),
    "json_array": lambda: st_bytes("[1, 2, 3]"),
    "deep_json": _deep_json,
    "huge_int": lambda: st_bytes('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}',
                                 b"\0" * 4),
    "unknown_dtype": _mutate(lambda h: _first_tensor(h).update(dtype="F128")),
    "dtype_not_string": _mutate(lambda h: _first_tensor(h).update(dtype=["F32"])),
    "bool_shape": _mutate(lambda h: _first_tensor(h).update(shape=[True, 8])),
    "negative_shape": _mutate(lambda h: _first_tensor(h).update(shape=[-2, -8])),
    "float_offsets": _mutate(lambda h: _first_tensor(h).update(data_offsets=[0.0, 64.0])),
    "shape_size_mismatch": _mutate(lambda h: _first_tensor(h).update(shape=[3, 8])),
    "overlapping_offsets": _overlap,
    "offsets_past_end": _mutate(lambda h: _first_tensor(h).update(data_offsets=[10**12, 10**12 + 64])),
    "duplicate_key": _dup_key,
    "metadata_not_strings": _mutate(lambda h: h.update(__metadata__={"ss_network_dim": 4})),
    "entry_not_object": _mutate(lambda h: h.update(x=[1, 2])),
    "trailing_garbage": lambda: valid_kohya_bytes() + b"#!/bin/sh\nrm -rf ~\n",
    "zero_sized_flood": _zero_sized_flood,
}


def write_corrupt(name: str, folder: Path, suffix: str = ".safetensors") -> Path:
    path = folder / f"{name}{suffix}"
    path.write_bytes(CORRUPT[name]())
    return path


# ---- parseable files whose content is broken ---------------------------------------------

def _rank0(t: dict) -> None:
    t[f"{TE_MODULE}.lora_down.weight"] = torch.zeros(0, 8)
    t[f"{TE_MODULE}.lora_up.weight"] = torch.zeros(8, 0)


def _mismatched_rank(t: dict) -> None:
    t[f"{TE_MODULE}.lora_up.weight"] = torch.randn(8, 3)


def _missing_up(t: dict) -> None:
    del t[f"{TE_MODULE}.lora_up.weight"]


def _int_factors(t: dict) -> None:
    t[f"{TE_MODULE}.lora_down.weight"] = torch.ones(2, 8, dtype=torch.int32)


def _one_dim_factors(t: dict) -> None:
    t[f"{TE_MODULE}.lora_down.weight"] = torch.randn(16)
    t[f"{TE_MODULE}.lora_up.weight"] = torch.randn(16)


SEMANTIC: dict[str, Callable[[dict], None]] = {
    "rank0": _rank0,
    "mismatched_rank": _mismatched_rank,
    "missing_up": _missing_up,
    "int_factors": _int_factors,
    "one_dim_factors": _one_dim_factors,
}


def write_semantic(name: str, folder: Path) -> Path:
    tensors = kohya_tensors()
    SEMANTIC[name](tensors)
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def write_nonfinite(folder: Path, value: float = float("nan")) -> Path:
    tensors = kohya_tensors()
    tensors[f"{TE_MODULE}.lora_up.weight"][0, 0] = value
    path = folder / "nonfinite.safetensors"
    save_file(tensors, str(path))
    return path


# ---- pickles ------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs ``marker.touch()`` through ``os.system`` — if the loader lets it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    """Unpickling this creates ``marker`` through ``builtins.open``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_malicious_pickle(folder: Path, marker: Path, style: str = "zip") -> Path:
    """A .pt whose unpickling would create ``marker``: torch zip, legacy torch, or raw pickle."""
    tensors: dict = dict(kohya_tensors())
    tensors["x"] = Payload(marker)
    tensors["y"] = OpenPayload(marker)
    path = folder / f"evil_{style}.pt"
    if style == "zip":
        torch.save(tensors, path)
    elif style == "legacy":
        torch.save(tensors, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(tensors, protocol=2))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
