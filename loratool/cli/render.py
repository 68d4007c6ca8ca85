"""One console for people (stderr for messages, stdout for results) and one JSON form for machines.

Tables fit the terminal: module paths are shortened from the left to the shortest tail that still
names one module (``…attentions.0.proj_in``), long lists stop after a count (``--all`` lists
everything), rows follow natural order (``layers.2`` before ``layers.10``), and titles are lines
of their own that break between words only. Piped output is as wide as ``COLUMNS`` says, else
:data:`PIPE_WIDTH`. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

# The ``--json`` contract's version: bumped when a field changes meaning or type (docs/commands.md).
SCHEMA = 1
# Piped output without COLUMNS: wide enough that most module paths are shown whole.
PIPE_WIDTH = 160
# The narrowest a shortened module column gets; below it paths fold onto two lines instead.
MIN_PATH_WIDTH = 16
ELLIPSIS = "…"


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal and not os.environ.get("COLUMNS"):
        con.width = PIPE_WIDTH
    return con


def __getattr__(name: str) -> Any:
    """``console`` (stdout) and ``err_console`` (stderr), made on first use: importing rich is a fifth of a
    fresh ``info --json``, which prints neither."""
    if name in ("console", "err_console"):
        con = globals()[name] = _console(stderr=name == "err_console")
        return con
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _out() -> Console:
    con = globals().get("console")  # a test may have put its own here
    return __getattr__("console") if con is None else con


def _err() -> Console:
    con = globals().get("err_console")
    return __getattr__("err_console") if con is None else con


def cell_len(text: str) -> int:
    from rich.cells import cell_len as rich_cell_len

    return rich_cell_len(text)


def print_json(command: str, data: dict[str, Any]) -> None:
    """Machine output: one JSON document on stdout, ``{"schema": 1, "command": ..., ...}``."""
    doc = {"schema": SCHEMA, "command": command, **data}
    doc.setdefault("warnings", [])
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """Yield a callback ``(description, done, total)`` that drives a rich progress bar on stderr."""
    if not enabled or not _err().is_terminal:
        # Off a terminal a bar is noise, and rich's transient bar still leaves a blank line
        # on stderr (an error would no longer be the one line a script reads).
        yield lambda description, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_err(),
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
    from rich.text import Text

    _err().print(Text.assemble(("warning:", "yellow"), " ", message))


def say(message: str) -> None:
    """A line of result text on stdout (no markup, no highlighting), wrapped between words."""
    from rich.text import Text

    _out().print(Text(message))


# ---------------------------------------------------------------- names


def natural_key(text: str) -> tuple:
    """Sort key with digit runs compared as numbers: ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def display_path(path: str | os.PathLike, width: int | None = None) -> str:
    """A path as people want to read it: relative to the working folder when inside it, and
    shortened from the left (``…/runs/style.safetensors``) when longer than ``width``."""
    text = str(path)
    with contextlib.suppress(ValueError, OSError):
        p = Path(text)
        if p.is_absolute():
            text = str(p.relative_to(Path.cwd()))
    if width is None or len(text) <= width:
        return text
    parts = text.split(os.sep)
    for k in range(len(parts) - 1, 0, -1):
        tail = ELLIPSIS + os.sep + os.sep.join(parts[-k:])
        if len(tail) <= width:
            return tail
    return ELLIPSIS + os.sep + parts[-1]


def shorten_tails(names: Sequence[str], width: int, sep: str = ".") -> list[str]:
    """Each name cut from the left (on ``sep``) to fit ``width``, keeping a tail no other name
    ends with; a name whose shortest unique tail does not fit keeps that tail, broken into lines
    after a ``sep``."""
    tails: Counter[str] = Counter()
    for name in set(names):
        segs = name.split(sep)
        for k in range(1, len(segs) + 1):
            tails[sep.join(segs[-k:])] += 1
    out = []
    for name in names:
        if cell_len(name) <= width:
            out.append(name)
            continue
        segs = name.split(sep)
        unique = next((k for k in range(1, len(segs)) if tails[sep.join(segs[-k:])] == 1), len(segs))
        # A tail starting at a number ("…0.attn1") hides whose block 0 it is: start at a name.
        ks = [k for k in range(unique, len(segs)) if not segs[-k].isdigit()] or [len(segs)]
        fitting = [k for k in ks if cell_len(ELLIPSIS + sep.join(segs[-k:])) <= width]
        k = max(fitting) if fitting else min(ks)
        short = name if k == len(segs) else ELLIPSIS + sep.join(segs[-k:])
        out.append(short if cell_len(short) <= width else _break_lines(short, width, sep))
    return out


def _break_lines(text: str, width: int, sep: str) -> str:
    lines = [""]
    for piece in re.findall(rf"[^{re.escape(sep)}]+{re.escape(sep)}?", text):
        if lines[-1] and cell_len(lines[-1] + piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(lines)


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class Column:
    header: str
    justify: str = "left"
    path: bool = False  # module paths: shortened from the left to fit the terminal
    sep: str = "."  # where a path may be cut ("/" for file paths)


@dataclass(frozen=True)
class Heading:
    """A row that names the group of rows after it (a component: ``unet (79 modules)``)."""

    text: str


def _table_width(widths: Sequence[int]) -> int:
    # rich's default box: one space of padding each side of a cell, a rule between and around columns
    return sum(w + 2 for w in widths) + len(widths) + 1


def table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str] | Heading],
    *,
    title: str | None = None,
    limit: int | None = None,
    what: str = "rows",
    notes: Sequence[str] = (),
    show_header: bool = True,
) -> None:
    """Print a table that fits the console; ``limit`` rows at most, then how many more there are."""
    shown: list[Sequence[str] | Heading] = []
    body = 0
    for row in rows:
        if limit is not None and not isinstance(row, Heading) and body >= limit:
            break
        shown.append(row)
        body += not isinstance(row, Heading)
    while shown and isinstance(shown[-1], Heading):
        shown.pop()
    data = [r for r in rows if not isinstance(r, Heading)]  # every row: a tail is unique among all
    total = len(data)
    widths = [max([cell_len(c.header) if show_header else 0, *(cell_len(r[i]) for r in data)])
              for i, c in enumerate(columns)]
    headings = [cell_len(r.text) for r in shown if isinstance(r, Heading)]
    paths = [i for i, c in enumerate(columns) if c.path]
    if paths:
        i = paths[0]
        others = _table_width([w for j, w in enumerate(widths) if j != i])
        budget = max(MIN_PATH_WIDTH, _out().width - others - 3, max(headings, default=0))
        if widths[i] > budget:
            short = dict(zip((r[i] for r in data), shorten_tails([r[i] for r in data], budget, columns[i].sep)))
            shown = [r if isinstance(r, Heading) else [*r[:i], short[r[i]], *r[i + 1:]] for r in shown]
    from rich.table import Table
    from rich.text import Text

    if title:
        heading(title)
    out = Table(show_header=show_header, header_style="bold")
    for c in columns:
        out.add_column(c.header, justify=c.justify, overflow="fold", no_wrap=not c.path and c.justify == "right")
    for r in shown:
        if isinstance(r, Heading):
            out.add_row(Text(r.text, style="bold"), *[""] * (len(columns) - 1))
        else:
            out.add_row(*(Text(str(c)) for c in r))
    _out().print(out)
    if total > body:
        say(f"{ELLIPSIS} {total - body} more {what} (--all lists them; --json has every one)")
    for note in notes:
        say(note)


def grouped(items: Sequence[Any], component: Any, cells: Any, label: Any = None) -> list:
    """Rows of ``items`` in natural order of (component, path), under a :class:`Heading` per
    component when there are several; ``cells(item)`` is a row, ``label(component)`` a heading."""
    order = {c: i for i, c in enumerate(dict.fromkeys(component(x) for x in items))}
    ordered = sorted(items, key=lambda x: (order[component(x)], natural_key(x.path)))
    rows: list = []
    last = None
    for item in ordered:
        comp = component(item)
        if len(order) > 1 and comp != last:
            rows.append(Heading(label(comp) if label else comp))
        last = comp
        rows.append(cells(item))
    return rows


def counts(d: dict) -> str:
    """``{"lora": 60, "lokr": 2}`` as ``lora (60), lokr (2)``: each value with how many have it."""
    return ", ".join(f"{k} ({v})" for k, v in d.items()) or "-"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fields(items: Sequence[tuple[str, str]], *, title: str | None = None) -> None:
    """A two-column key / value table (no header); values wrap, keys never do."""
    from rich.table import Table
    from rich.text import Text

    if title:
        heading(title)
    out = Table(show_header=False)
    out.add_column("field", style="bold", no_wrap=True)
    out.add_column("value", overflow="fold")
    for k, v in items:
        out.add_row(Text(k), Text(v))
    _out().print(out)


def heading(text: str) -> None:
    """A table's title: its own line, bold, broken between words only (a word wider than the
    terminal, a long path, keeps its tail)."""
    from rich.text import Text

    con = _out()
    width = max(con.width, MIN_PATH_WIDTH)
    words = [w if cell_len(w) <= width else display_path(w, width) if os.sep in w else ELLIPSIS + w[-(width - 1):]
             for w in text.split(" ")]
    con.print(Text(" ".join(words), style="bold"))
