"""Outputs appear whole or not at all, and never on top of an input.

Everything is written to a temporary sibling of the target (same folder, so the final rename
is atomic on one filesystem) and renamed only when the writer finished without error. Any
exception, KeyboardInterrupt included, removes the temporary file or folder.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from loratool.errors import LoratoolError, OutputError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# Suffixes that name a file: a folder output (a PEFT adapter, a merged pipeline) must not carry one.
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf")


def check_output(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    *,
    folder: bool | None = None,
    owned: Callable[[PurePosixPath], bool] | None = None,
) -> Path:
    """Refuse an output that is an input (or lies inside an input folder) or exists without --force.

    ``folder`` says whether the output will be a folder (None: the caller does not know yet; the
    writer checks again). A folder output named like a file (``x.safetensors``) is refused. With
    ``force``, a file output replaces only a file and a folder output only a folder whose every file
    ``owned(relative path)`` accepts, i.e. one loratool itself would have written (a PEFT / diffusers
    adapter folder, a merged pipeline folder); any other file is listed and nothing is replaced:
    ``--force`` must never delete what the user put there.
    """
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
    if folder and out.suffix.lower() in FILE_SUFFIXES:
        raise OutputError(f"{out}: this output is a folder, but its name ends in {out.suffix} like a file; "
                          f"drop the suffix")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to replace it)")
    if out.is_dir() and not out.is_symlink():
        if folder is False:
            raise OutputError(f"{out}: is a folder; give a file path for this output")
        if folder:
            foreign = _foreign_files(out, owned)
            if foreign:
                more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
                raise OutputError(f"{out}: holds files loratool did not write ({', '.join(foreign[:5])}{more}); "
                                  f"--force replaces only a loratool output: move them or choose another path")
    elif folder and out.exists():
        raise OutputError(f"{out}: is a file; this output is a folder and --force does not replace a file with one")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: output folder does not exist")
    return out


def _foreign_files(folder: Path, owned: Callable[[PurePosixPath], bool] | None) -> list[str]:
    """Files (and links) under ``folder`` that ``owned`` does not accept, as relative paths."""
    foreign = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = PurePosixPath(Path(dirpath).relative_to(folder).as_posix())
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(d for d in dirnames if d not in links)  # a linked folder is an entry, not a tree
        for name in sorted(filenames + links):
            rel = rel_dir / name
            if owned is None or not owned(rel):
                foreign.append(str(rel))
    return foreign


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How libraries that wrap the OS error in their own exception (safetensors' Rust writer,
# torch's zip writer) spell a full disk or a file-size limit.
_NO_SPACE_TEXT = ("no space left", "file too large", "filetoolarge", "storagefull", "quota exceeded",
                  "disk quota", "file write failed")


def _no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) means the disk or a file-size limit is full."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, OSError) and cur.errno in _NO_SPACE:
            return True
        text = str(cur).lower()
        if any(t in text for t in _NO_SPACE_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def _size_limit_reached(tmp: Path) -> bool:
    """Whether a file under ``tmp`` has grown to the process's file-size limit (RLIMIT_FSIZE)."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    except (ImportError, OSError, ValueError):
        return False
    if soft == resource.RLIM_INFINITY:
        return False
    files = [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
    return any(f.stat().st_size >= soft - 8192 for f in files)


def _disk_full(parent: Path) -> bool:
    """Whether the filesystem of ``parent`` has (almost) no room left for us."""
    try:
        st = os.statvfs(parent)
    except (AttributeError, OSError):
        return False
    free = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return free * st.f_frsize < 1024 * 1024


def _translate(exc: BaseException, out: Path, tmp: Path | None = None) -> OutputError | None:
    """An OutputError for a failed write, or None when ``exc`` is not about writing.

    Some writers (torch's zip writer) report a full disk only as "iostream error", so when the
    exception itself does not say, the disk and the file-size limit are asked directly.
    """
    full = _no_space(exc) or (tmp is not None and (_size_limit_reached(tmp) or _disk_full(tmp.parent)))
    if full:
        detail = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "write failed"
        return OutputError(f"{out}: cannot write: no space left ({detail}); nothing was written")
    if isinstance(exc, OSError):
        return OutputError(f"{out}: cannot write: {exc.strerror or exc}; nothing was written")
    return None


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _make_temp(out: Path, parent: Path, folder: bool) -> Path:
    try:
        if folder:
            return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        return Path(name)
    except OSError as exc:
        raise _translate(exc, out) from exc  # type: ignore[misc]  # OSError always translates


def _usual_modes(tmp: Path) -> None:
    """Give ``tmp`` (and every file and folder in it) the permissions any new file gets: 0o666 / 0o777
    minus the umask. mkstemp / mkdtemp make 0600 / 0700, and some writers replace the temporary
    file with a new 0600 one of their own (safetensors' ``save_file`` does), so this runs once the
    writer is done, on what it left."""
    mask = _umask()
    if not tmp.is_dir():
        os.chmod(tmp, 0o666 & ~mask)
        return
    os.chmod(tmp, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in dirnames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def _fsync_tree(path: Path) -> None:
    """fsync ``path`` (a file, or every file of a folder tree) so it survives a power loss once renamed."""
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())


def _install(tmp: Path, out: Path, parent: Path) -> None:
    """Move the finished ``tmp`` onto ``out`` (atomically for files)."""
    if out.is_dir() and not out.is_symlink() and not tmp.is_dir():
        raise OutputError(f"{out}: is a folder; give a file path for this output")
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
        if tmp.is_dir() and (out.exists() or out.is_symlink()):
            out.unlink()
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike, *, folder: bool = False, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; rename it onto ``out`` on success.

    With ``folder=True`` the temporary path is an (empty, existing) folder. ``sync`` flushes it to
    disk before the rename, so that after a power loss ``out`` is either old or whole; without it
    (``merge`` of multi-GB models, unless ``--sync``) the kernel writes it back later, as after
    ``cp``: a crash of loratool itself still leaves nothing half-written. On any exception
    (KeyboardInterrupt and SystemExit included) the temporary path is removed and ``out`` is
    left as it was. A full disk or a file-size limit (ENOSPC, EDQUOT, EFBIG, also when a
    library wraps it) becomes an :class:`OutputError` saying "no space left".
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    tmp = _make_temp(out, parent, folder)
    try:
        try:
            yield tmp
            _usual_modes(tmp)
            if sync:
                _fsync_tree(tmp)
            _install(tmp, out, parent)
        except LoratoolError:
            raise
        except Exception as exc:
            translated = _translate(exc, out, tmp)
            if translated is None:
                raise
            raise translated from exc
    except BaseException:
        _remove(tmp)
        raise


def open_output(path: str | os.PathLike) -> int:
    """An fd writing ``path`` from its start: created with mode 0o666 (the umask decides, as for any new file).

    An existing empty file (the temporary file of ``atomic_path``) is not truncated: on ext4
    (``auto_da_alloc``) truncate-to-zero marks the file as being replaced, and closing it then
    flushes the whole file to disk: seconds for a large model, spent waiting.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_bytes_atomic(out: str | os.PathLike, data: bytes) -> None:
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
