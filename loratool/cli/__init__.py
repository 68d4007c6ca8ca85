"""Command-line entry point: parse, call one function, render; errors become one line + exit 2.

Exit codes: 0 success; 2 a user-facing failure (any :class:`LoratoolError`, or a usage
error) reported as one ``error: ...`` line on stderr; 1 a bug, reported as one
``internal error: ...`` line (the traceback only with ``--debug``); 130 interrupted.

Adding a command or an option: the pattern is written down in :mod:`loratool.cli.options`
(one module per command, ``@command(name, examples=...)``, shared options as ``Annotated``
aliases with readable metavars, rendering through :mod:`loratool.cli.render`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Iterator

import typer

from loratool.cli.app import app, state
from loratool.errors import LoratoolError

COMMANDS = ("info", "convert", "merge", "stack", "resize", "extract", "check", "diff")


def load_commands(names: tuple[str, ...] = COMMANDS) -> None:
    """Import (register) the command modules ``names``; the app lists its commands in :data:`COMMANDS`
    order, whichever were imported first."""
    for name in names:
        try:
            importlib.import_module(f"loratool.cli.{name}_cmd")
        except ModuleNotFoundError as exc:  # a command still being built must not break the others
            if exc.name != f"loratool.cli.{name}_cmd":
                raise
    rank = {name: i for i, name in enumerate(COMMANDS)}
    app.registered_commands.sort(key=lambda info: rank.get(info.name, len(rank)))


def commands_for(args: list[str]) -> tuple[str, ...]:
    """The command modules a command line needs: the one it names (the first word that is no option: the
    app's own options take no value), else every one (help, a misspelt command). typer builds every
    registered command's parameters on each call, and each module is imports of its own: ``info FILE``
    pays for ``info`` alone."""
    first = next((a for a in args if not a.startswith("-")), None)
    return (first,) if first in COMMANDS else COMMANDS


def _classes(attr: str) -> tuple[type[BaseException], ...]:
    """``attr`` from click and from typer's vendored copy of click (typer >= 0.20 ships its own)."""
    found: list[type[BaseException]] = []
    for mod in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        with contextlib.suppress(ImportError):
            cls = getattr(importlib.import_module(mod), attr, None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return tuple(found)


_EXIT = _classes("Exit") + (typer.Exit,)
_ABORT = _classes("Abort")
_NO_ARGS = _classes("NoArgsIsHelpError")
_CLICK_ERRORS = _classes("ClickException")


def _one_line(text: str, limit: int | None = None) -> str:
    line = " ".join(str(text).split())
    return line[:limit] if limit else line


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    """Let write failures and termination unwind through the cleanup of partial outputs.

    SIGXFSZ (a file-size limit was hit) kills the process by default, before any cleanup;
    ignored, the write fails with EFBIG instead. SIGTERM becomes SystemExit(143) so the
    ``finally`` blocks that remove temporary files run.
    """
    previous: dict[int, object] = {}

    def terminate(signum, frame):  # noqa: ARG001 - signal handler signature
        raise SystemExit(128 + signum)

    wanted = {"SIGXFSZ": signal.SIG_IGN, "SIGTERM": terminate}
    for name, handler in wanted.items():
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            previous[signum] = signal.signal(signum, handler)
        except (ValueError, OSError):  # not the main thread, or not allowed here
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, handler)  # type: ignore[arg-type]


def _run(args: list[str]) -> int:
    debug = "--debug" in args
    load_commands(commands_for(args))
    try:
        # Not standalone, typer returns what the command returned, or the code of an Exit it
        # caught; a KeyboardInterrupt comes back as 130 (typer turns it into Exit(130)).
        rv = app(args=args, prog_name="loratool", standalone_mode=False)
        if rv == 130:
            sys.stderr.write("error: interrupted; nothing was written\n")
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except LoratoolError as exc:
        if debug or state.get("debug"):
            traceback.print_exc()
        sys.stderr.write(f"error: {_one_line(str(exc)) or exc.__class__.__name__}\n")
        return 2
    except _EXIT as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except (KeyboardInterrupt, *_ABORT):
        sys.stderr.write("error: interrupted; nothing was written\n")
        return 130
    except _NO_ARGS as exc:  # bare ``loratool``: the help is what was asked for
        sys.stderr.write(exc.format_message().rstrip() + "\n")
        return 2
    except _CLICK_ERRORS as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None and getattr(ctx, "command_path", None):
            hint = f" (see '{ctx.command_path} --help')"
        sys.stderr.write(f"error: {_one_line(exc.format_message())}{hint}\n")
        return 2
    except BrokenPipeError:  # output piped into ``head``: stop quietly
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except MemoryError:
        sys.stderr.write("error: out of memory (try a smaller input or --device cpu)\n")
        return 2
    except Exception as exc:  # a bug: say so, show the traceback only when asked
        if debug or state.get("debug"):
            traceback.print_exc()
        else:
            sys.stderr.write(
                f"internal error: {exc.__class__.__name__}: {_one_line(str(exc), 300)} "
                "(run with --debug for the traceback; please report it)\n"
            )
        return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    state["debug"] = False
    with _signals():
        return _run(args)


def run() -> None:
    code = main()
    # Tearing down an interpreter that imported torch spends most of a second collecting objects
    # the OS frees anyway (measured 0.9 s after a merge); frozen, they are left alone.
    gc.freeze()
    sys.exit(code)
