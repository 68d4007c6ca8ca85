"""The few facts loratool reads from (or rewrites in) a model folder's ``config.json``.

* :func:`model_type`: transformers' ``model_type`` (``gpt2``, ``llama``...), which names the
  implementation and so what each layer is (GPT-2's ``Conv1D`` stores weights [in, out]).
* :func:`retyped`: the same config with its dtype fields naming another dtype. transformers
  writes ``torch_dtype`` (< 4.56) or ``dtype`` (≥ 4.56) at the top level and in nested sub-configs
  (``text_config``...); a merge that stores the weights in another dtype must say so, or loaders
  that honour the field (``from_pretrained(dtype="auto")``) cast the weights back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DTYPE_FIELDS = ("torch_dtype", "dtype")
# The names transformers writes for float dtypes (str(torch.float16) without the "torch.").
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64", "half", "float", "double")
CONFIG_NAME = "config.json"


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def model_type(folder: Path) -> str | None:
    """``model_type`` of ``folder/config.json``, or None (no file, unreadable, not a transformers config)."""
    data = _load(Path(folder) / CONFIG_NAME)
    value = data.get("model_type") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def _retype(node: Any, dtype_name: str) -> bool:
    changed = False
    if isinstance(node, dict):
        for key, value in node.items():
            if key in DTYPE_FIELDS and isinstance(value, str) and value.removeprefix("torch.") in FLOAT_NAMES:
                if value != dtype_name:
                    node[key] = dtype_name
                    changed = True
            else:
                changed |= _retype(value, dtype_name)
    elif isinstance(node, list):
        for value in node:
            changed |= _retype(value, dtype_name)
    return changed


def retyped(path: Path, dtype_name: str) -> str | None:
    """The text of the JSON config ``path`` with every float dtype field set to ``dtype_name``
    (``bfloat16``...), or None when it has none to change (or is not JSON): copy it as it is."""
    data = _load(path)
    if data is None or not _retype(data, dtype_name):
        return None
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
