"""Pickled checkpoints (.pt, .bin, .ckpt) are loaded only with ``weights_only=True``.

torch's restricted unpickler rebuilds tensors and plain containers and refuses any other
global, so a malicious file cannot run code; we turn the refusal into a clear message.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from loratool.errors import InputError


def load_pickle_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "restricted unpickler refused it"
        raise InputError(
            f"{path}: refused: this pickle needs more than plain tensors to load "
            f"(it may run code); only weights are accepted ({first[:200]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable torch checkpoint ({exc.__class__.__name__})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise InputError(f"{path}: entry {k!r} is not a named tensor")
        out[k] = v
    return out
