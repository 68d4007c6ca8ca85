"""The typer application and its global options; commands live one per module beside it.

Command modules import their operation inside the command function: torch takes seconds to
import, and neither ``--help`` nor the start of a merge (which copies the base while torch
loads) should wait for it.
"""

from __future__ import annotations

import typer

from loratool import __version__

app = typer.Typer(
    name="loratool",
    help="Convert, merge, stack, resize, extract and inspect LoRA adapter checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Read by main() to decide whether a bug shows its traceback.
state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loratool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    state["debug"] = debug
