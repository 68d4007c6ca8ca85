"""Checks a command can make before it imports torch (seconds): the inputs it names exist.

The op repeats every check it needs; these only let a mistyped path fail in a fraction of a
second, with the same message the op would give.
"""

from __future__ import annotations

import os
from pathlib import Path

from loratool.errors import InputError
from loratool.io import hub


def inputs_exist(*refs: str | os.PathLike | None) -> None:
    """Raise :class:`InputError` for the first local path in ``refs`` that does not exist
    (``hf://`` references and None are left to the op)."""
    for ref in refs:
        if ref is None or hub.is_hub_ref(ref):
            continue
        if not Path(ref).exists():
            raise InputError(f"{ref}: no such file or folder")
