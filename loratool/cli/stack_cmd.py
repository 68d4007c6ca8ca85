"""``loratool stack LORA LORA ... -o OUT``: parse, call :func:`loratool.ops.stack.stack_files`, render."""

from __future__ import annotations

from pathlib import Path

import typer

from loratool.cli.app import command
from loratool.cli.options import (
    FLOAT_DTYPES,
    STACK_METHODS,
    BaseModel,
    BlockWeights,
    Device,
    DynamicParam,
    DynamicRule,
    Family,
    Force,
    Json,
    ShowAll,
    Strength,
    ToLayout,
    choices,
)
from loratool.cli.render import Column, display_path, grouped, print_json, progress_bar, say, table, warn
from loratool.errors import UsageError

MODULE_ROWS = 30


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
    method: str = typer.Option(
        "concat", "--method", metavar=choices(STACK_METHODS),
        help="concat (exact, ranks add up), svd (best rank N), or on each module's ΔW as mergekit defines them: "
             "ties, dare_ties, dare_linear, magnitude_prune (then the best rank N)."),
    rank: int = typer.Option(None, "--rank", "-r", metavar="N",
                             help="Output rank for --method svd, ties, dare_*, magnitude_prune."),
    density: float = typer.Option(None, "--density", metavar="D", help="Fraction of each ΔW kept by ties / dare_* / "
                                  "magnitude_prune (mergekit's default 1)."),
    majority_sign: str = typer.Option("total", "--majority-sign", metavar="total|frequency",
                                      help="TIES sign election: total (sum) or frequency (count)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the DARE masks (one torch stream, module by "
                             "module)."),
    normalize: bool = typer.Option(None, "--normalize/--no-normalize", help="Divide by the sum of kept weights "
                                   "(default: the method's, as mergekit)."),
    rescale: bool = typer.Option(None, "--rescale/--no-rescale", help="Rescale pruned deltas to their L1 norm "
                                 "(default: the method's, as mergekit)."),
    factor_space: bool = typer.Option(False, "--factor-space", help="Run the method on the A and B factors as "
                                      "PEFT add_weighted_adapter does (to compare with PEFT)."),
    dynamic: DynamicRule = None,
    param: DynamicParam = None,
    block_weights: BlockWeights = None,
    strength: Strength = None,
    to: ToLayout = None,
    dtype: str = typer.Option(None, "--dtype", metavar=FLOAT_DTYPES,
                              help="dtype of the written factors (default: what the stacking computed)."),
    device: Device = "auto",
    family: Family = None,
    base: BaseModel = None,
    force: Force = False,
    as_json: Json = False,
    show_all: ShowAll = False,
) -> None:
    """Add LoRAs into one: ΔW = Σ wᵢ·ΔWᵢ over the union of their modules.

    Inputs may differ in layout, rank, alpha and module set; the output is written in --to or the
    first input's layout."""
    if len(loras) < 2:
        raise UsageError(f"stack needs two or more LoRAs, got {len(loras)}: `loratool stack LORA LORA... -o OUT`")
    from loratool.ops.stack import stack_files

    options = None
    if method not in ("concat", "svd") or density is not None or factor_space or dynamic or param is not None:
        from loratool.ops.combine_methods import CombineOptions
        from loratool.ops.rank_rules import RankRule

        options = CombineOptions(
            density=1.0 if density is None else density, majority_sign=majority_sign, seed=seed,
            normalize=normalize, rescale=rescale, factor_space=factor_space,
            rule=RankRule(dynamic, param) if dynamic or param is not None else None)
    with progress_bar(enabled=not as_json) as progress:
        result = stack_files(loras, output, weights or None, method=method, rank=rank, to=to, device=device,
                             force=force, family=family, base=base, dtype=dtype, progress=progress, options=options,
                             block_weights=block_weights, strength_patterns=strength)
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
    if result.combine is not None and not result.combine.get("factor_space"):
        rows = grouped(result.modules, lambda m: m.component,
                       lambda m: [m.path, str(m.rank_out), f"{m.norm:.4g}", f"{m.error:.4g}",
                                  f"{m.error / m.norm if m.norm else 0.0:.3e}"])
        table([Column("module", path=True), Column("rank", "right"), Column("‖ΔW‖", "right"),
               Column("‖error‖", "right"), Column("relative", "right")], rows,
              title=f"{result.method}: best rank-N factorization, Frobenius error per module",
              limit=None if show_all else MODULE_ROWS, what="modules")
    ranks = [m.rank_out for m in result.modules]
    dtype_note = f"; dtype {result.dtype}" if result.dtype else ""
    say(f"{len(result.modules)} modules, rank {min(ranks, default=0)}–{max(ranks, default=0)}; "
        f"Frobenius norm kept: mean {result.mean_fro_kept:.4f}; device {result.device}{dtype_note}")
