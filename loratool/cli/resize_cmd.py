"""``loratool resize LORA --rank N -o OUT``: parse, call :func:`loratool.ops.resize.resize_file`, render."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from loratool.cli.app import app
from loratool.cli.options import BaseModel, Device, Family, Force, Threads
from loratool.cli.render import console, print_json, progress_bar, warn


@app.command("resize")
def resize_command(
    lora: str = typer.Argument(..., help="LoRA file/folder (any layout loratool reads) or hf:// ref."),
    rank: int = typer.Option(..., "--rank", "-r", help="Target rank (the cap for --dynamic)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (or folder for PEFT)."),
    conv_rank: int = typer.Option(None, "--conv-rank", help="Rank cap for conv k×k modules (default --rank)."),
    dynamic: str = typer.Option(None, "--dynamic", help="Per-module rank rule: sv_ratio, sv_fro or sv_cumulative."),
    param: float = typer.Option(None, "--param", help="P of the --dynamic rule."),
    to: str = typer.Option(None, "--to", help="Output layout (default: the input's)."),
    device: Device = "auto",
    threads: Threads = None,
    family: Family = None,
    base: BaseModel = None,
    force: Force = False,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of a table."),
    show_all: bool = typer.Option(False, "--all", help="List every module (the table shows 30 by default)."),
) -> None:
    """Re-rank every module to its best rank-k approximation, from the factors (no dense SVD)."""
    from loratool.io.preflight import inputs_exist

    inputs_exist(lora, base)  # before the op imports torch
    from loratool.ops.resize import resize_file

    with progress_bar(enabled=not as_json) as progress:
        result = resize_file(lora, output, rank, conv_rank=conv_rank, dynamic=dynamic, param=param, device=device,
                             threads=threads, to=to, force=force, family=family, base=base, progress=progress)
    if as_json:
        print_json(result.to_json())
        return
    for message in result.warnings:
        warn(message)
    table = Table(title=f"resized {lora} → {result.output} ({result.output_format})", show_header=True)
    for col, justify in (("module", "left"), ("kind", "left"), ("rank", "right"), ("→", "right"),
                         ("‖ΔW‖ kept", "right"), ("method", "left")):
        table.add_column(col, justify=justify)
    rows = result.modules if show_all else result.modules[:30]
    for m in rows:
        table.add_row(f"{m.component}:{m.path}", m.kind, str(m.rank_in), str(m.rank_out), f"{m.fro_kept:.4f}",
                      m.method)
    console.print(table)
    if len(rows) < len(result.modules):
        console.print(f"… {len(result.modules) - len(rows)} more modules (--all lists them)", highlight=False)
    ranks = [m.rank_out for m in result.modules]
    console.print(
        f"{len(result.modules)} modules, rank {min(ranks, default=0)}–{max(ranks, default=0)} "
        f"({result.rule.describe()}, cap {result.rank}, conv cap {result.conv_rank}); Frobenius norm kept: "
        f"mean {result.mean_fro_kept:.4f}, whole adapter {result.total_fro_kept:.4f}; device {result.device}",
        highlight=False,
    )
