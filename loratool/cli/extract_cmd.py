"""``loratool extract FINETUNED BASE -o OUT``: parse, call :func:`loratool.ops.extract.extract_to_file`, render."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from loratool.cli.app import app
from loratool.cli.options import Device, Force, Threads
from loratool.cli.render import console, print_json, progress_bar, warn
from loratool.errors import UsageError
from loratool.float_dtypes import float_code
from loratool.ops.extract_defaults import DEFAULT_RANK

_WRITE_LAYOUTS = ("kohya", "diffusers", "peft")


@app.command("extract")
def extract_command(
    finetuned: str = typer.Argument(
        ..., help="Fine-tuned model: .safetensors file, sharded folder, diffusers folder or hf:// ref."
    ),
    base: str = typer.Argument(..., help="The base model it was fine-tuned from (same kinds of input)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (kohya, diffusers) or folder (peft)."),
    rank: int = typer.Option(DEFAULT_RANK, "--rank", "-r", help="Rank of linear modules (the cap with --dynamic)."),
    conv_rank: int = typer.Option(None, "--conv-rank", help="Rank of conv modules (default: --rank)."),
    to: str = typer.Option(None, "--to", help="Output layout: kohya, diffusers or peft (default: kohya for "
                           "Stable Diffusion / Flux parts, peft for transformers models)."),
    dynamic: str = typer.Option(None, "--dynamic", help="Per-module rank rule: sv_fro, sv_ratio or sv_cumulative."),
    param: float = typer.Option(None, "--param", help="P for --dynamic."),
    exact: bool = typer.Option(False, "--exact", help="Full SVD instead of the randomized solver."),
    include: list[str] = typer.Option(None, "--include", help="Regex on component.parameter; keep only matches."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Regex on component.parameter; leave out matches."),
    min_diff: float = typer.Option(0.0, "--min-diff", help="Tensors with max |Δ| ≤ EPS count as unchanged."),
    clamp_quantile: float = typer.Option(None, "--clamp-quantile", help="Clamp factor entries to the Q-quantile "
                                         "of their absolute values (kohya style; off by default, breaks exactness)."),
    embeddings: bool = typer.Option(False, "--embeddings", help="Turn changed embedding tables into LoRA modules."),
    save_dtype: str = typer.Option("fp32", "--save-dtype", help="dtype of the written factors: fp32, fp16 or bf16."),
    seed: int = typer.Option(0, "--seed", help="Seed of the randomized solver's sketch."),
    device: Device = "auto",
    threads: Threads = None,
    force: Force = False,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of a table."),
) -> None:
    """Extract a LoRA from a fine-tuned model minus its base (truncated SVD of each weight difference)."""
    if to is not None and to not in _WRITE_LAYOUTS:
        raise UsageError(f"--to {to}: choose one of {', '.join(_WRITE_LAYOUTS)}")
    code = float_code(save_dtype, "--save-dtype")
    from loratool.io.preflight import inputs_exist

    inputs_exist(finetuned, base)  # before the op imports torch
    from loratool.io.safetensors_file import torch_dtypes
    from loratool.ops.extract import extract_to_file

    with progress_bar(enabled=not as_json) as progress:
        result = extract_to_file(
            finetuned, base, output, to=to, force=force, rank=rank, conv_rank=conv_rank, dynamic=dynamic,
            param=param, exact=exact, include=include or None, exclude=exclude or None, min_diff=min_diff,
            clamp_quantile=clamp_quantile, embeddings=embeddings, device=device, threads=threads,
            out_dtype=torch_dtypes()[code], seed=seed, progress=progress,
        )
    if as_json:
        print_json(result.to_json())
        return
    for skipped in result.not_extracted:
        diff = f", max |Δ| {skipped.max_abs_diff:.3g}" if skipped.max_abs_diff is not None else ""
        warn(f"not extracted: {skipped.component}:{skipped.name} ({skipped.reason}{diff})")
    table = Table(title=f"extracted to {', '.join(str(p) for p in result.output)} ({result.format})")
    for col, justify in (("module", "left"), ("layer", "left"), ("rank", "right"), ("captured ‖ΔW‖", "right"),
                         ("rel. error", "right")):
        table.add_column(col, justify=justify)
    for m in result.modules:
        table.add_row(f"{m.component}:{m.path}", m.layer, str(m.rank), f"{m.captured:.2%}", f"{m.rel_error:.3g}")
    console.print(table)
    worst = result.worst_captured
    console.print(
        f"{len(result.modules)} modules extracted ({result.solver} SVD, device {result.device}), "
        f"{result.unchanged} tensors unchanged, {len(result.not_extracted)} not extracted, {result.filtered} "
        f"filtered out; worst captured share {worst:.2%}" if worst is not None else "no modules",
        highlight=False,
    )
