"""Command-line entry point: parse, call one function, render; errors become one line + exit 2."""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from loratool.cli.app import app, state
from loratool.errors import LoratoolError

COMMANDS = ("info", "convert", "merge", "stack", "resize", "extract")
for _name in COMMANDS:
    try:
        importlib.import_module(f"loratool.cli.{_name}_cmd")
    except ModuleNotFoundError as _exc:  # a command still being built must not break the others
        if _exc.name != f"loratool.cli.{_name}_cmd":
            raise


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        app(args=args, prog_name="loratool", standalone_mode=False)
        return 0
    except LoratoolError as exc:
        if debug:
            traceback.print_exc()
        msg = " ".join(str(exc).split())
        sys.stderr.write(f"error: {msg}\n")
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        sys.stderr.write("error: interrupted; nothing was written\n")
        return 130
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing was written\n")
        return 130
    except click.ClickException as exc:
        sys.stderr.write(f"error: {' '.join(exc.format_message().split())}\n")
        return 2
    except Exception as exc:  # a bug: say so, show the traceback only when asked
        if debug or state.get("debug"):
            traceback.print_exc()
        else:
            sys.stderr.write(
                f"internal error: {exc.__class__.__name__}: {' '.join(str(exc).split())[:300]} "
                "(run with --debug for the traceback; please report it)\n"
            )
        return 1


def run() -> None:
    sys.exit(main())
