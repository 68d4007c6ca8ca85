"""``loratool stack LORA LORA ... -o OUT``: parse, call :func:`loratool.ops.stack.stack_files`, render."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from loratool.cli.app import app
from loratool.cli.options import BaseModel, Device, Family, Force, Threads
from loratool.cli.render import console, print_json, progress_bar, warn


@app.command("stack")
def stack_command(
    loras: list[str] = typer.Argument(..., help="Two or more LoRA files/folders (any layouts loratool reads)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (or folder for PEFT)."),
    weights: list[float] = typer.Option(
        None, "--weights", "-w", help="One weight per LoRA, in order (repeat the option; default 1 each)."
    ),
    method: str = typer.Option("concat", "--method", help="concat (exact, ranks add up) or svd (best rank N)."),
    rank: int = typer.Option(None, "--rank", "-r", help="Output rank for --method svd."),
    to: str = typer.Option(None, "--to", help="Output layout (default: the first input's)."),
    device: Device = "auto",
    threads: Threads = None,
    family: Family = None,
    base: BaseModel = None,
    force: Force = False,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of a table."),
) -> None:
    """Add LoRAs into one: ΔW = Σ wᵢ·ΔWᵢ over the union of their modules."""
    from loratool.io.preflight import inputs_exist

    inputs_exist(*loras, base)  # before the op imports torch
    from loratool.ops.stack import stack_files

    with progress_bar(enabled=not as_json) as progress:
        result = stack_files(loras, output, weights or None, method=method, rank=rank, to=to, device=device,
                             threads=threads, force=force, family=family, base=base, progress=progress)
    if as_json:
        print_json(result.to_json())
        return
    for message in result.warnings:
        warn(message)
    table = Table(title=f"stacked into {result.output} ({result.output_format}, {result.method})", show_header=True)
    table.add_column("input")
    table.add_column("weight", justify="right")
    table.add_column("modules", justify="right")
    for i, (label, weight) in enumerate(zip(result.labels, result.weights)):
        table.add_row(label, f"{weight:g}", str(sum(1 for m in result.modules if i in m.sources)))
    console.print(table)
    ranks = [m.rank_out for m in result.modules]
    console.print(
        f"{len(result.modules)} modules, rank {min(ranks, default=0)}–{max(ranks, default=0)}; "
        f"Frobenius norm kept: mean {result.mean_fro_kept:.4f}; device {result.device}",
        highlight=False,
    )
