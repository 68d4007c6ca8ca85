"""Compact bar charts for the terminal (``info --stats``: ΔW per block), drawn with block characters.
Nothing here imports torch."""

from __future__ import annotations

from collections.abc import Sequence

from loratool.cli.render import console, heading, say

EIGHTHS = " ▏▎▍▌▋▊▉█"


def bar(value: float, top: float, width: int) -> str:
    """``value`` as a bar of ``width`` cells at most (``top`` fills them), in eighths of a cell."""
    if top <= 0 or value <= 0:
        return ""
    eighths = round(value / top * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (EIGHTHS[part] if part else "")


def bar_chart(rows: Sequence[tuple[str, float, str]], *, title: str, unit: str = "") -> None:
    """One line per row: label, bar (scaled to the largest value), the value and a note."""
    if not rows:
        return
    heading(title)
    label_w = max(len(r[0]) for r in rows)
    values = [f"{v:.4g}{unit}" for _, v, _ in rows]
    value_w = max(len(v) for v in values)
    note_w = max(len(r[2]) for r in rows)
    width = max(8, min(40, console.width - label_w - value_w - note_w - 6))
    top = max(v for _, v, _ in rows)
    for (name, value, note), text in zip(rows, values):
        say(f"{name:<{label_w}} {bar(value, top, width):<{width}} {text:>{value_w}}  {note}".rstrip())
