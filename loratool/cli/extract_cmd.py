"""``loratool extract FINETUNED BASE -o OUT``: parse, call :func:`loratool.ops.extract.extract_to_file`, render."""

from __future__ import annotations

from pathlib import Path

import typer

from loratool.cli.app import command
from loratool.cli.options import FLOAT_DTYPES, Device, DynamicParam, DynamicRule, Force, Json, ShowAll, choices
from loratool.cli.render import Column, display_path, grouped, print_json, progress_bar, say, table, warn
from loratool.errors import UsageError
from loratool.float_dtypes import float_code
from loratool.ops.extract_defaults import DEFAULT_RANK

_WRITE_LAYOUTS = ("kohya", "diffusers", "peft")
MODULE_ROWS = 30


@command("extract", examples=[
    "loratool extract out/merged_tiny_llama fixtures/base/tiny_llama --rank 4 -o out/extracted_tiny_llama",
])
def extract_command(
    finetuned: str = typer.Argument(
        ..., metavar="FINETUNED",
        help="Fine-tuned model: .safetensors file, sharded folder, diffusers folder or hf:// ref.",
    ),
    base: str = typer.Argument(..., metavar="BASE",
                               help="The base model it was fine-tuned from (same kinds of input)."),
    output: Path = typer.Option(..., "-o", "--output", metavar="OUT",
                                help="Output file (kohya, diffusers) or folder (peft)."),
    rank: int = typer.Option(DEFAULT_RANK, "--rank", "-r", metavar="N",
                             help="Rank of linear modules (the cap with --dynamic)."),
    conv_rank: int = typer.Option(None, "--conv-rank", metavar="N", help="Rank of conv modules (default: --rank)."),
    to: str = typer.Option(None, "--to", metavar=choices(_WRITE_LAYOUTS),
                           help="Output layout (default: kohya for Stable Diffusion / Flux parts, peft for "
                                "transformers models)."),
    dynamic: DynamicRule = None,
    param: DynamicParam = None,
    exact: bool = typer.Option(False, "--exact", help="Full SVD instead of the randomized solver."),
    include: list[str] = typer.Option(None, "--include", metavar="REGEX",
                                      help="Keep only tensors whose component.parameter matches (repeatable)."),
    exclude: list[str] = typer.Option(None, "--exclude", metavar="REGEX",
                                      help="Leave out tensors whose component.parameter matches (repeatable)."),
    min_diff: float = typer.Option(0.0, "--min-diff", metavar="EPS",
                                   help="Tensors with max |Δ| ≤ EPS count as unchanged."),
    clamp_quantile: float = typer.Option(None, "--clamp-quantile", metavar="Q",
                                         help="Clamp factor entries to the Q-quantile of their absolute values "
                                              "(kohya style; off by default, breaks exactness)."),
    embeddings: bool = typer.Option(False, "--embeddings", help="Turn changed embedding tables into LoRA modules."),
    save_dtype: str = typer.Option("fp32", "--save-dtype", metavar=FLOAT_DTYPES,
                                   help="dtype of the written factors."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the randomized solver's sketch."),
    device: Device = "auto",
    force: Force = False,
    as_json: Json = False,
    show_all: ShowAll = False,
) -> None:
    """Extract a LoRA from a fine-tuned model minus its base (a truncated SVD of each weight difference).

    Tensors are read one pair at a time; unchanged tensors are counted, differences a LoRA cannot
    hold (norms, biases) are listed."""
    if to is not None and to not in _WRITE_LAYOUTS:
        raise UsageError(f"--to {to}: choose one of {', '.join(_WRITE_LAYOUTS)}")
    code = float_code(save_dtype, "--save-dtype")
    from loratool.io.safetensors_file import torch_dtypes
    from loratool.ops.extract import extract_to_file

    with progress_bar(enabled=not as_json) as progress:
        result = extract_to_file(
            finetuned, base, output, to=to, force=force, rank=rank, conv_rank=conv_rank, dynamic=dynamic,
            param=param, exact=exact, include=include or None, exclude=exclude or None, min_diff=min_diff,
            clamp_quantile=clamp_quantile, embeddings=embeddings, device=device,
            out_dtype=torch_dtypes()[code], seed=seed, progress=progress,
        )
    if as_json:
        print_json("extract", result.to_json())
        return
    for message in result.warnings:
        warn(message)
    for skipped in result.not_extracted:
        diff = f", max |Δ| {skipped.max_abs_diff:.3g}" if skipped.max_abs_diff is not None else ""
        warn(f"not extracted: {skipped.component}:{skipped.name} ({skipped.reason}{diff})")
    rows = grouped(result.modules, lambda m: m.component,
                   lambda m: [m.path, m.layer, str(m.rank), f"{m.captured:.2%}", f"{m.rel_error:.3g}"])
    table([Column("module", path=True), Column("layer"), Column("rank", "right"), Column("captured", "right"),
           Column("rel. error", "right")], rows,
          title=f"extracted to {display_path(result.output)} ({result.format})",
          limit=None if show_all else MODULE_ROWS, what="modules",
          notes=["captured: ‖ΔW_k‖F / ‖ΔW‖F from the singular values; rel. error: ‖ΔW − up·down‖F / ‖ΔW‖F "
                 "of the factors as written"])
    worst = result.worst_captured
    say(f"{len(result.modules)} modules extracted ({result.solver} SVD, device {result.device}), "
        f"{result.unchanged} tensors unchanged, {len(result.not_extracted)} not extracted, {result.filtered} "
        f"filtered out; worst captured share {worst:.2%}" if worst is not None else "no modules")
