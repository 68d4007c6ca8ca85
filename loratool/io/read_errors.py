"""One line for what the operating system says when a file cannot be opened or read (header readers)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from loratool.errors import InputError


@contextlib.contextmanager
def os_errors_as_input(path: Path, expected: str) -> Iterator[None]:
    """``OSError`` inside becomes :class:`InputError` naming ``path`` (``expected``: "a .gguf file", ...)."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected {expected}") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
