"""The two model hashes kohya's sd-scripts store in a LoRA's header.

Re-implements ``library/train_util.py::precalculate_safetensors_hashes`` (kohya-ss/sd-scripts),
which is what ``networks/lora.py::save_weights`` calls just before ``save_file``:

* the file is serialised *in memory* with ``safetensors.torch.save(tensors, metadata)`` where
  metadata keeps only the ``ss_*`` entries (training metadata, meant to be immutable; user
  entries such as ``modelspec.*`` and the ``sshs_*`` hashes themselves are left out);
* ``sshs_model_hash`` (``addnet_hash_safetensors``) = sha256 hex of the bytes after the 8-byte
  header length and the header, i.e. the tensor-data area;
* ``sshs_legacy_hash`` (``addnet_hash_legacy``) = first 8 hex chars of sha256 over the 0x10000
  bytes at offset 0x100000 of that serialisation (sha256 of b"" for files shorter than 1 MiB).

The data area does not depend on metadata, so ``sshs_model_hash`` equals the sha256 of the
data area of the file actually written; the legacy hash is over the ``ss_*``-only
serialisation and generally differs from a hash of the written file.
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


def model_hash(data: bytes) -> str:
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def legacy_hash(data: bytes) -> str:
    return hashlib.sha256(data[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """{"sshs_model_hash": ..., "sshs_legacy_hash": ...} exactly as sd-scripts computes them."""
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return {"sshs_model_hash": model_hash(data), "sshs_legacy_hash": legacy_hash(data)}
