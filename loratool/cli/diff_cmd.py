"""``loratool diff A B``: parse, call :func:`loratool.ops.diff.diff`, render (and plot)."""

from __future__ import annotations

from pathlib import Path

import typer

from loratool.cli.app import command
from loratool.cli.options import Force, Json, ShowAll
from loratool.cli.render import Column, display_path, grouped, print_json, progress_bar, say, table, warn

MODULE_ROWS = 30


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.3g}"


@command("diff", examples=[
    "loratool diff fixtures/kohya_tiny_sd.safetensors fixtures/lycoris_loha_tiny_sd.safetensors",
    "loratool diff fixtures/kohya_tiny_sd.safetensors fixtures/diffusers_tiny_sd --json",
])
def diff_command(
    a: str = typer.Argument(..., metavar="A", help="First LoRA (any layout loratool reads)."),
    b: str = typer.Argument(..., metavar="B", help="Second LoRA."),
    plot: Path = typer.Option(None, "--plot", metavar="PNG", help="Also draw cosine, norm ratio and subspace "
                              "overlap per block into this PNG (needs the [plot] extra: matplotlib)."),
    force: Force = False,
    show_all: ShowAll = False,
    as_json: Json = False,
) -> None:
    """Compare two LoRAs from their factors: per module and per block the cosine of ΔW, the norm ratio and the
    subspace overlap, and a verdict (identical, rescaled copy with its factor, resized / derived, unrelated).

    Catches re-uploads and "the same LoRA with another alpha"; nothing is written (except --plot)."""
    from loratool.ops.diff import diff

    if plot is not None:
        from loratool.ops.plot import check_plot_path

        check_plot_path(plot, inputs=[a, b], force=force)
    with progress_bar(enabled=not as_json) as progress:
        report = diff(a, b, progress=progress)
    drawn = None
    if plot is not None:
        from loratool.ops.plot import plot_diff

        drawn = plot_diff(report, plot)
    for w in report.warnings:
        warn(w)
    if as_json:
        print_json("diff", {**report.to_json(), "plot": drawn.to_json() if drawn else None})
        return
    say(f"{display_path(report.a)} vs {display_path(report.b)}: {report.summary}")
    if report.only_a or report.only_b:
        say(f"modules only in A: {len(report.only_a)}, only in B: {len(report.only_b)} (--json lists them)")
    if report.blocks:
        table([Column("block"), Column("modules", "right"), Column("cosine", "right"), Column("norm ratio", "right"),
               Column("overlap", "right")],
              [[bl.block, str(bl.module_count), _num(bl.cosine), _num(bl.norm_ratio), _num(bl.overlap)]
               for bl in report.blocks], title="per block")
    rows = grouped(report.modules, lambda m: m.component,
                   lambda m: [m.path, _num(m.cosine), _num(m.norm_ratio), _num(m.out_overlap), _num(m.in_overlap),
                              f"{m.rank_a}/{m.rank_b}"])
    table([Column("module", path=True), Column("cosine", "right"), Column("norm ratio", "right"),
           Column("out ovl.", "right"), Column("in ovl.", "right"), Column("ranks", "right")], rows,
          title="per module", limit=None if show_all else MODULE_ROWS, what="modules",
          notes=["cosine: ⟨ΔW_A, ΔW_B⟩F / (‖ΔW_A‖F·‖ΔW_B‖F); norm ratio: ‖ΔW_B‖F / ‖ΔW_A‖F; out / in overlap: "
                 "mean cos² of the principal angles between the column / row spaces; ranks: numerical ranks A/B"])
    if drawn is not None:
        say(f"plot: {display_path(drawn.path)} ({', '.join(drawn.panels)})")
