"""The typer application, its global options, and :func:`command`, the decorator every command uses.

Command modules import their operation inside the command function: torch takes seconds to
import, and neither ``--help`` nor the start of a merge (which copies the base while torch
loads) should wait for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import typer

from loratool import __version__
from loratool.cli.command import DEBUG_HELP, LoratoolCommand, LoratoolGroup, state

app = typer.Typer(
    name="loratool",
    cls=LoratoolGroup,
    help="Convert, merge, stack, resize, extract and inspect LoRA adapter checkpoints.",
    epilog="Run 'loratool COMMAND -h' for a command's options and an example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

__all__ = ["app", "command", "state"]


def command(name: str, *, examples: Sequence[str], number_lists: Sequence[str] = ()) -> Callable:
    """Register a command: ``@command("stack", examples=[...], number_lists=["--weights", "-w"])``.

    ``examples`` end the command's ``-h`` (one or more full command lines; the first is the one
    the README and docs show). ``number_lists`` names the flags of ``list[float]`` options that
    also take several values after one flag (see :mod:`loratool.cli.command`).
    """
    cls = type(f"{name.title()}Command", (LoratoolCommand,),
               {"examples": tuple(examples), "number_lists": frozenset(number_lists)})
    return app.command(name, cls=cls)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loratool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    state["debug"] = state["debug"] or debug
