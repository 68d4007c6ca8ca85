"""``loratool merge BASE LORA [LORA ...] -o OUT``: parse, call :func:`loratool.ops.merge.merge`, render."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from loratool.cli.app import app
from loratool.cli.options import Device, Force, Threads
from loratool.cli.render import console, print_json, progress_bar, warn


@app.command("merge")
def merge_command(
    base: str = typer.Argument(..., help="Base model: .safetensors file, sharded or diffusers folder, hf:// ref."),
    loras: list[str] = typer.Argument(..., help="One or more LoRA files/folders (any layout loratool reads)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (file base) or folder (folder base)."),
    alpha: list[float] = typer.Option(
        None, "--alpha", "-a", help="Strength: once for every LoRA, or once per LoRA in order (default 1)."
    ),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype for float tensors: fp16, bf16 or fp32."),
    device: Device = "auto",
    threads: Threads = None,
    strict: bool = typer.Option(False, "--strict", help="Unmatched adapter modules are an error."),
    force: Force = False,
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Write NaN/Inf results instead of failing."),
    sync: bool = typer.Option(False, "--sync", help="Flush the output to disk before renaming it into place "
                              "(survives a power loss; slower: the disk's write speed)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of a table."),
) -> None:
    """Merge LoRAs into a base model, streaming one tensor at a time."""
    from loratool.ops.merge import merge

    with progress_bar(enabled=not as_json) as progress:
        result = merge(
            base, loras, output, alpha or None, dtype=dtype, device=device, threads=threads, strict=strict,
            force=force, allow_nonfinite=allow_nonfinite, sync=sync, progress=progress,
        )
    if as_json:
        print_json(result.to_json())
        return
    if result.unmatched:
        shown = ", ".join(result.unmatched[:20])
        more = f" and {len(result.unmatched) - 20} more" if len(result.unmatched) > 20 else ""
        warn(f"{len(result.unmatched)} adapter modules match no base weight and were skipped: {shown}{more}")
    if result.dropped_files:
        warn(f"weight files not merged and not copied: {', '.join(result.dropped_files)}")
    table = Table(title=f"merged into {result.output}", show_header=True)
    table.add_column("component")
    table.add_column("modules matched", justify="right")
    for comp, n in result.matched.items():
        table.add_row(comp, str(n))
    console.print(table)
    console.print(
        f"{result.merged_tensors} tensors merged, {result.skipped} copied, {len(result.unmatched)} modules unmatched; "
        f"{result.seconds:.2f} s, peak memory {result.peak_rss_mb:.0f} MB, device {result.device}",
        highlight=False,
    )
