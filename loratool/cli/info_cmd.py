"""``loratool info``: what an adapter holds (header only unless ``--stats``), or which model family a
base checkpoint is."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from loratool.cli.app import app
from loratool.cli.options import BaseModel, Family, FromLayout, SidecarConfig
from loratool.cli.render import console, print_json, progress_bar, warn

if TYPE_CHECKING:
    from loratool.ops.inspect import CheckpointReport, InfoReport

MAX_VALUE_CHARS = 120


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _counts(d: dict) -> str:
    return ", ".join(f"{k}×{v}" if v != 1 else str(k) for k, v in d.items()) or "-"


def _short(value: str) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 1] + "…"


def _summary(report: InfoReport) -> Table:
    data = report.to_json()
    table = Table(title=Path(report.path).name, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("format", report.format)
    if report.dialect:
        table.add_row("dialect", report.dialect)
    table.add_row("size", f"{human_size(report.size_bytes)} ({', '.join(report.files)})")
    table.add_row("family", report.family or "unknown")
    for k, v in report.base_model.items():
        table.add_row(k, _short(v))
    table.add_row("components", _counts(report.component_modules))
    table.add_row("modules", str(len(report.modules)))
    table.add_row("kinds", _counts(data["kinds"]))
    table.add_row("layers", _counts(data["layers"]))
    ranks = data["ranks"]
    if report.modules:
        table.add_row("ranks", f"{ranks['min']}–{ranks['max']}  (rank×count: {_counts(ranks['histogram'])})")
    table.add_row("alphas", _counts(data["alphas"]))
    table.add_row("scales", _counts(data["scales"]))
    table.add_row("dtypes", _counts(data["dtypes"]))
    if data["dora_modules"]:
        table.add_row("DoRA modules", str(data["dora_modules"]))
    if report.extras:
        table.add_row("extra tensors", str(len(report.extras)))
    return table


def _modules(report: InfoReport) -> Table:
    table = Table(title="modules", title_justify="left")
    for col in ("component", "module", "kind", "layer", "rank", "alpha", "scale", "shape", "dtype"):
        table.add_column(col, justify="right" if col in ("rank", "alpha", "scale") else "left")
    if report.stats:
        for col in ("‖ΔW‖F", "eff. rank", "num. rank"):
            table.add_column(col, justify="right")
    for m in report.modules:
        flags = "".join((" +DoRA" if m.dora else "", " (rsLoRA)" if m.rslora else "", " ᵀ" if m.fan_in_fan_out else ""))
        row = [m.component, m.name + flags, m.kind, m.layer, str(m.rank),
               "-" if m.alpha is None else f"{m.alpha:g}" + ("*" if m.alpha_assumed else ""),
               f"{m.scale:.4g}", "×".join(map(str, m.shape)), m.dtype]
        if m.stats is not None:
            row += [f"{m.stats.norm:.4g}", f"{m.stats.effective_rank:.2f}", str(m.stats.numerical_rank)]
        table.add_row(*row)
    return table


def _kv(title: str, items: dict[str, str]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for k, v in items.items():
        table.add_row(k, _short(v))
    return table


def _print(table: Table) -> None:
    console.print(table)


def render_checkpoint(report: CheckpointReport) -> None:
    table = Table(title=Path(report.path).name, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("format", f"base checkpoint ({report.kind})")
    table.add_row("family", report.family or "unknown")
    if report.architecture:
        table.add_row("architecture", report.architecture)
    table.add_row("size", f"{human_size(report.size_bytes)} ({len(report.files)} file(s))")
    table.add_row("tensors", str(report.tensor_count))
    table.add_row("parameters", f"{report.parameter_count:,}")
    table.add_row("dtypes", _counts(report.dtypes))
    table.add_row("components", _counts(report.components))
    if report.mapped is not None:
        table.add_row("key map", f"{report.mapped} canonical parameters, {len(report.unmapped)} stored keys unmapped")
    _print(table)
    if report.metadata:
        _print(_kv("metadata", report.metadata))
    for w in report.warnings:
        warn(w)


def render(report: InfoReport) -> None:
    _print(_summary(report))
    if report.modules:
        _print(_modules(report))
    if report.extras:
        table = Table(title="extra tensors (whole weights)", title_justify="left")
        for col in ("component", "name", "shape", "dtype"):
            table.add_column(col)
        for e in report.extras:
            table.add_row(e["component"], e["name"], "×".join(map(str, e["shape"])), e["dtype"])
        _print(table)
    if report.training:
        _print(_kv("training settings", report.training))
    if report.modelspec:
        _print(_kv("modelspec", report.modelspec))
    others = {k: v for k, v in report.metadata.items()
              if k not in report.training and k not in report.modelspec and not k.startswith(("ss_", "modelspec."))}
    if others:
        _print(_kv("other metadata", others))
    if report.tags:
        table = Table(title=f"top {len(report.tags)} tags", title_justify="left")
        table.add_column("tag")
        table.add_column("count", justify="right")
        for tag, count in report.tags:
            table.add_row(tag, str(count))
        _print(table)
    for w in report.warnings:
        warn(w)


@app.command("info")
def info_command(
    path: str = typer.Argument(..., help="Adapter file, PEFT folder or hf:// reference (or a base checkpoint)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (stable contract)."),
    stats: bool = typer.Option(False, "--stats", help="Read the tensors: per-module ‖ΔW‖F and effective rank."),
    from_: FromLayout = None,
    base: BaseModel = None,
    config: SidecarConfig = None,
    family: Family = None,
) -> None:
    """Show format, modules, ranks, alphas, dtypes, base model hints and training metadata.

    On a base checkpoint (single-file SD/SDXL/Flux/SD3, diffusers component or pipeline folder, HF
    model): its model family, tensor count, dtype mix and size, from the headers alone."""
    from loratool.ops.inspect import CheckpointReport, inspect

    with progress_bar(enabled=stats and not json_out) as progress:
        report = inspect(path, from_, base=base, config=config, family=family, stats=stats, progress=progress)
    if json_out:
        print_json(report.to_json())
        for w in report.warnings:
            warn(w)
    elif isinstance(report, CheckpointReport):
        render_checkpoint(report)
    else:
        render(report)
