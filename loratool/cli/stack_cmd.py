"""``loratool stack LORA LORA ... -o OUT``: parse, call :func:`loratool.ops.stack.stack_files`, render."""

from __future__ import annotations

from pathlib import Path

import typer

from loratool.cli.app import command
from loratool.cli.options import FLOAT_DTYPES, STACK_METHODS, BaseModel, Device, Family, Force, Json, ToLayout, choices
from loratool.cli.render import Column, display_path, print_json, progress_bar, say, table, warn
from loratool.errors import UsageError


@command("stack", number_lists=["--weights", "-w"], examples=[
    "loratool stack a.safetensors b.safetensors --weights 0.7 -0.3 -o ab.safetensors",
    "loratool stack a.safetensors b.safetensors --method svd --rank 16 -o ab16.safetensors",
])
def stack_command(
    loras: list[str] = typer.Argument(..., metavar="LORA...",
                                      help="Two or more LoRA files/folders (any layouts loratool reads)."),
    output: Path = typer.Option(..., "-o", "--output", metavar="OUT", help="Output file (PEFT: a folder)."),
    weights: list[float] = typer.Option(
        None, "--weights", "-w", metavar="W",
        help="wᵢ in Σ wᵢ·ΔWᵢ, one per LoRA in order: several after one flag (--weights 0.7 -0.3) or the "
             "flag repeated (default 1 each).",
    ),
    method: str = typer.Option("concat", "--method", metavar=choices(STACK_METHODS),
                               help="concat: exact, ranks add up; svd: the best rank-N approximation."),
    rank: int = typer.Option(None, "--rank", "-r", metavar="N", help="Output rank for --method svd."),
    to: ToLayout = None,
    dtype: str = typer.Option(None, "--dtype", metavar=FLOAT_DTYPES,
                              help="dtype of the written factors (default: what the stacking computed)."),
    device: Device = "auto",
    family: Family = None,
    base: BaseModel = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Add LoRAs into one: ΔW = Σ wᵢ·ΔWᵢ over the union of their modules.

    Inputs may differ in layout, rank, alpha and module set; the output is written in --to or the
    first input's layout."""
    if len(loras) < 2:
        raise UsageError(f"stack needs two or more LoRAs, got {len(loras)}: `loratool stack LORA LORA... -o OUT`")
    from loratool.ops.stack import stack_files

    with progress_bar(enabled=not as_json) as progress:
        result = stack_files(loras, output, weights or None, method=method, rank=rank, to=to, device=device,
                             force=force, family=family, base=base, dtype=dtype, progress=progress)
    if as_json:
        print_json("stack", result.to_json())
        return
    for message in result.warnings:
        warn(message)
    rows = [[label, f"{weight:g}", str(sum(1 for m in result.modules if i in m.sources))]
            for i, (label, weight) in enumerate(zip(result.labels, result.weights))]
    title = f"stacked into {display_path(result.output)} ({result.output_format}, {result.method})"
    table([Column("LoRA", path=True, sep="/"), Column("weight", "right"), Column("modules", "right")], rows,
          title=title)
    ranks = [m.rank_out for m in result.modules]
    dtype_note = f"; dtype {result.dtype}" if result.dtype else ""
    say(f"{len(result.modules)} modules, rank {min(ranks, default=0)}–{max(ranks, default=0)}; "
        f"Frobenius norm kept: mean {result.mean_fro_kept:.4f}; device {result.device}{dtype_note}")
