"""``loratool stack LORA LORA ... -o OUT``: parse, call :func:`loratool.ops.stack.stack_files`, render."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from loratool.cli.app import app
from loratool.cli.options import BaseModel, BlockWeights, Device, Dynamic, Family, Force, Param, Strength
from loratool.cli.render import console, print_json, progress_bar, warn


@app.command("stack")
def stack_command(
    loras: list[str] = typer.Argument(..., help="Two or more LoRA files/folders (any layouts loratool reads)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (or folder for PEFT)."),
    weights: list[float] = typer.Option(
        None, "--weights", "-w", help="One weight per LoRA, in order (repeat the option; default 1 each)."
    ),
    method: str = typer.Option(
        "concat", "--method", help="concat (exact, ranks add up), svd (best rank N), or on each module's ΔW as "
        "mergekit defines them: ties, dare_ties, dare_linear, magnitude_prune (then the best rank N)."),
    rank: int = typer.Option(None, "--rank", "-r", help="Output rank for --method svd, ties, dare_*, magnitude_prune."),
    density: float = typer.Option(None, "--density", help="Fraction of each ΔW kept by ties / dare_* / "
                                  "magnitude_prune (mergekit's default 1)."),
    majority_sign: str = typer.Option("total", "--majority-sign", help="TIES sign election: total (sum) or "
                                      "frequency (count)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the DARE masks (one torch stream, module by module)."),
    normalize: bool = typer.Option(None, "--normalize/--no-normalize", help="Divide by the sum of kept weights "
                                   "(default: the method's, as mergekit)."),
    rescale: bool = typer.Option(None, "--rescale/--no-rescale", help="Rescale pruned deltas to their L1 norm "
                                 "(default: the method's, as mergekit)."),
    factor_space: bool = typer.Option(False, "--factor-space", help="Run the method on the A and B factors as "
                                      "PEFT add_weighted_adapter does (to compare with PEFT)."),
    dynamic: Dynamic = None,
    param: Param = None,
    block_weights: BlockWeights = None,
    strength: Strength = None,
    to: str = typer.Option(None, "--to", help="Output layout (default: the first input's)."),
    device: Device = "auto",
    family: Family = None,
    base: BaseModel = None,
    force: Force = False,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of a table."),
) -> None:
    """Add LoRAs into one: ΔW = Σ wᵢ·ΔWᵢ over the union of their modules."""
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
                             force=force, family=family, base=base, progress=progress, options=options,
                             block_weights=block_weights, strength_patterns=strength)
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
    if result.combine is not None and not result.combine.get("factor_space"):
        errors = Table(title=f"{result.method}: best rank-N factorization, Frobenius error per module",
                       show_header=True)
        for col, justify in (("module", "left"), ("rank", "right"), ("‖ΔW‖", "right"), ("‖error‖", "right"),
                             ("relative", "right")):
            errors.add_column(col, justify=justify)
        for m in result.modules:
            errors.add_row(f"{m.component}:{m.path}", str(m.rank_out), f"{m.norm:.4g}", f"{m.error:.4g}",
                           f"{m.error / m.norm if m.norm else 0.0:.3e}")
        console.print(errors)
    ranks = [m.rank_out for m in result.modules]
    console.print(
        f"{len(result.modules)} modules, rank {min(ranks, default=0)}–{max(ranks, default=0)}; "
        f"Frobenius norm kept: mean {result.mean_fro_kept:.4f}; device {result.device}",
        highlight=False,
    )
