"""Outputs appear whole or not at all, and never on top of an input.

Everything is written to a temporary sibling of the target (same folder, so the final rename
is atomic on one filesystem) and renamed only when the writer finished without error. Any
exception, KeyboardInterrupt included, removes the temporary file or folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from loratool.errors import OutputError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Path:
    """Refuse an output that is an input (or lies inside an input folder) or exists without --force."""
    out = Path(out)
    resolved = out.resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src)
        sr = s.resolve()
        if resolved == sr or _same_file(out, s):
            raise OutputError(f"{out}: output would overwrite the input {src}; choose another path")
        if sr.is_dir() and sr in resolved.parents:
            raise OutputError(f"{out}: output lies inside the input folder {src}; choose another path")
        if resolved.is_dir() and resolved in sr.parents:
            raise OutputError(f"{out}: output folder holds the input {src}; choose another path")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to replace it)")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: output folder does not exist")
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _translate(exc: OSError, out: Path) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(f"{out}: cannot write: {os.strerror(exc.errno)}; nothing was written")
    return OutputError(f"{out}: cannot write: {exc.strerror or exc}; nothing was written")


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; rename it onto ``out`` on success.

    With ``folder=True`` the temporary path is an (empty, existing) folder.
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        try:
            yield tmp
        except OSError as exc:
            raise _translate(exc, out) from exc
        if out.is_dir() and not out.is_symlink():
            # A folder cannot be replaced atomically: move the old one aside first.
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.rmdir(aside)
            os.replace(out, aside)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(aside, out)
                raise
            _remove(aside)
        else:
            if out.exists() and tmp.is_dir():
                out.unlink()
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes_atomic(out: str | os.PathLike, data: bytes) -> None:
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
