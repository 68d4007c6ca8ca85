"""Pickled checkpoints (.pt, .bin, .ckpt) are loaded only with ``weights_only=True``.

torch's restricted unpickler rebuilds tensors and plain containers and refuses any other
global (``os.system``, ``builtins.eval``, arbitrary classes), so a malicious file cannot run
code; we turn the refusal into a message that says which global was asked for. We never fall
back to an unrestricted load, and ``weights_only=True`` is passed explicitly, which
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot override.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

from loratool.errors import InputError
from loratool.header_only import torch
from loratool.io.pickle_header import named_tensors

_REASON = re.compile(r"(unsupported global[^\n]*|unsupported operand[^\n]*|[^\n]*GLOBAL [^\n]*)", re.IGNORECASE)


def _refusal_reason(exc: BaseException) -> str:
    """The line of torch's refusal that names what the pickle asked for (not its boilerplate)."""
    match = _REASON.search(str(exc))
    if match:
        return " ".join(match.group(1).split())[:200]
    return "it is not a plain tensor checkpoint"


def load_pickle_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{name: tensor} from a torch pickle, refusing anything but tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols and storages on stderr; the outcome is what counts.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{path}: refused: this pickle asks for more than tensors to load and could run code "
            f"({_refusal_reason(exc)}); loratool loads pickles with weights_only=True only; "
            "convert a trusted copy to .safetensors"
        ) from None
    except MemoryError:
        raise InputError(f"{path}: not a readable torch checkpoint (it claims more memory than is available)") from None
    except Exception as exc:  # noqa: BLE001 - any failure of torch.load on foreign bytes is bad input
        detail = " ".join(str(exc).split())[:120]
        raise InputError(f"{path}: not a readable torch checkpoint ({exc.__class__.__name__}: {detail})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    obj = named_tensors(obj, lambda v: isinstance(v, torch.Tensor)) or obj  # a list of tensors: indices as names
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise InputError(f"{path}: entry {str(k)[:100]!r} is not a named tensor ({type(v).__name__})")
        if v.layout != torch.strided or v.is_quantized or v.is_complex():
            raise InputError(f"{path}: tensor {k!r} is {v.layout}/{v.dtype}; only dense real tensors are supported")
        out[k] = v
    return out
