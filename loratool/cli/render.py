"""One console for people (stderr for messages, stdout for results) and one for machines."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Piped output is not cut to 80 columns: module paths are the point of most tables.
PIPE_WIDTH = 200
console = Console()
if not console.is_terminal and console.width < PIPE_WIDTH:
    console.width = PIPE_WIDTH
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Machine output: one JSON document on stdout, a stable contract."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """Yield a callback ``(description, done, total)`` that drives a rich progress bar on stderr."""
    if not enabled or not err_console.is_terminal:
        # Off a terminal a bar is noise, and rich's transient bar still leaves a blank line
        # on stderr (an error would no longer be the one line a script reads).
        yield lambda description, done, total: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(description: str, done: int, total: int) -> None:
        if description not in tasks:
            tasks[description] = bar.add_task(description, total=total)
        bar.update(tasks[description], completed=done, total=total)

    with bar:
        yield update


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, markup=True)
