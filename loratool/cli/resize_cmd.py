"""``loratool resize LORA --rank N -o OUT``: parse, call :func:`loratool.ops.resize.resize_file`, render."""

from __future__ import annotations

from pathlib import Path

import typer

from loratool.cli.app import command
from loratool.cli.options import BaseModel, Device, DynamicParam, DynamicRule, Family, Force, Json, ShowAll, ToLayout
from loratool.cli.render import Column, display_path, grouped, print_json, progress_bar, say, table, warn

MODULE_ROWS = 30


@command("resize", examples=[
    "loratool resize fixtures/kohya_tiny_sd.safetensors --rank 2 -o out/tiny_sd_rank2.safetensors",
    "loratool resize style.safetensors --rank 32 --dynamic sv_fro --param 0.95 -o style_dyn.safetensors",
])
def resize_command(
    lora: str = typer.Argument(..., metavar="LORA", help="LoRA file/folder (any layout loratool reads) or hf:// ref."),
    rank: int = typer.Option(..., "--rank", "-r", metavar="N", help="Target rank (the cap for --dynamic)."),
    output: Path = typer.Option(..., "-o", "--output", metavar="OUT", help="Output file (PEFT: a folder)."),
    conv_rank: int = typer.Option(None, "--conv-rank", metavar="N",
                                  help="Rank cap for conv k×k modules (default --rank)."),
    dynamic: DynamicRule = None,
    param: DynamicParam = None,
    to: ToLayout = None,
    device: Device = "auto",
    family: Family = None,
    base: BaseModel = None,
    force: Force = False,
    as_json: Json = False,
    show_all: ShowAll = False,
) -> None:
    """Re-rank every module to its best rank-k approximation (Eckart–Young), from the factors without a dense SVD.

    The layout and scale semantics are kept (kohya alpha rescaled, PEFT rank_pattern / alpha_pattern);
    the table says how much of ‖ΔW‖F each module kept."""
    from loratool.ops.resize import resize_file

    with progress_bar(enabled=not as_json) as progress:
        result = resize_file(lora, output, rank, conv_rank=conv_rank, dynamic=dynamic, param=param, device=device,
                             to=to, force=force, family=family, base=base, progress=progress)
    if as_json:
        print_json("resize", result.to_json())
        return
    for message in result.warnings:
        warn(message)
    rows = grouped(result.modules, lambda m: m.component,
                   lambda m: [m.path, f"{m.kind} {m.layer}", str(m.rank_in), str(m.rank_out), f"{m.fro_kept:.4f}",
                              m.method])
    table([Column("module", path=True), Column("kind"), Column("rank", "right"), Column("→", "right"),
           Column("‖ΔW‖ kept", "right"), Column("method")], rows,
          title=f"resized {display_path(lora)} → {display_path(result.output)} ({result.output_format})",
          limit=None if show_all else MODULE_ROWS, what="modules",
          notes=["→: the new rank; ‖ΔW‖ kept: ‖ΔW_k‖F / ‖ΔW‖F, the share of the module's Frobenius norm kept"])
    ranks = [m.rank_out for m in result.modules]
    say(f"{len(result.modules)} modules, rank {min(ranks, default=0)}–{max(ranks, default=0)} "
        f"({result.rule.describe()}, cap {result.rank}, conv cap {result.conv_rank}); Frobenius norm kept: "
        f"mean {result.mean_fro_kept:.4f}, whole adapter {result.total_fro_kept:.4f}; device {result.device}")
