"""Names, shapes and dtypes of the tensors in a torch zip checkpoint, without torch and without
running the pickle (what ``info`` needs from a ``.pt`` / ``.bin`` adapter).

``torch.save`` (zip format, torch ≥ 1.6) writes ``<name>/data.pkl`` whose tensors are
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls with the storage a
persistent id ``("storage", torch.<Type>Storage, key, location, numel)`` naming the entry
``<name>/data/<key>``. A restricted unpickler maps exactly those globals (plus
``collections.OrderedDict`` and ``torch._utils._rebuild_parameter``) to functions that build
:class:`~loratool.header_only.ShapeTensor` stand-ins; any other global, a non-zip (legacy)
file, big-endian data or a result that is not a flat dict of tensors gives None, and the caller
then loads the file with torch (``weights_only=True``, :mod:`loratool.io.pickle_safe`), which
also gives the proper error for a hostile or broken file. Nothing here can run code from the
file: no global outside that list is ever resolved.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import zipfile
from pathlib import Path

from loratool.header_only import NeedsTorch, ShapeTensor, StoredDtype, decode_scalar

# torch.<Name>Storage -> safetensors dtype code
STORAGES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class _Refused(Exception):
    pass


class _StorageType:
    def __init__(self, code: str):
        self.code = code


class _Storage:
    def __init__(self, code: str, key: str):
        self.code, self.key = code, key


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str):
        super().__init__(fh)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *args: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGES:
            return _StorageType(STORAGES[name])
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise _Refused("persistent id")
        return _Storage(pid[1].code, str(pid[2]))

    def _rebuild(self, storage, offset, size, stride, *args):
        if not isinstance(storage, _Storage) or not all(isinstance(s, int) and s >= 0 for s in size):
            raise _Refused("tensor")
        value = None
        if math.prod(size) == 1:
            n = ITEMSIZE[storage.code]
            with self.archive.open(f"{self.prefix}/data/{storage.key}") as fh:
                fh.seek(int(offset) * n)
                value = decode_scalar(storage.code, fh.read(n))
        return ShapeTensor(tuple(size), StoredDtype(storage.code), value)


def pickle_shapes(path: str | os.PathLike) -> dict[str, ShapeTensor] | None:
    """{name: ShapeTensor} of a torch zip checkpoint holding a dict of tensors, else None."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                return None
            prefix = pkl[0].rsplit("/", 1)[0]
            order = f"{prefix}/byteorder"
            if order in names and archive.read(order).strip() != b"little":
                return None
            with archive.open(pkl[0]) as fh:
                obj = _Unpickler(fh, archive, prefix).load()
    except (_Refused, NeedsTorch, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError, KeyError,
            ValueError, TypeError, AttributeError, IndexError, RecursionError, MemoryError):
        return None
    return named_tensors(obj, lambda v: isinstance(v, ShapeTensor))


def named_tensors(obj, is_tensor) -> dict | None:
    """{name: tensor} of what a tensor checkpoint's pickle holds: a dict (or ``{"state_dict": dict}``) of
    named tensors, or a list of tensors named by their index ("0", "1", …: lora_diffusion's
    ``save_lora_weight`` saves [up₀, down₀, up₁, …]); None for anything else."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, (list, tuple)) and obj and all(is_tensor(v) for v in obj):
        return {str(i): v for i, v in enumerate(obj)}
    if not isinstance(obj, dict) or not all(isinstance(k, str) and is_tensor(v) for k, v in obj.items()):
        return None
    return dict(obj)

