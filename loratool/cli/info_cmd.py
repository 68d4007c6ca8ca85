"""``loratool info``: what an adapter holds (header only unless ``--stats``), or which model family a
base checkpoint is. Rendering only; it imports no torch (the header-only path stays torch-free)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from loratool.cli.app import command
from loratool.cli.options import BaseModel, Family, Force, FromLayout, Json, ShowAll, SidecarConfig, Threads
from loratool.cli.render import (
    Column,
    counts,
    display_path,
    fields,
    grouped,
    human_size,
    print_json,
    progress_bar,
    say,
    table,
    warn,
)
from loratool.cli.training_view import other_rows, training_rows

if TYPE_CHECKING:
    from loratool.ops.inspect import CheckpointReport, InfoReport, ModuleInfo
    from loratool.ops.scan import ScanReport

MAX_VALUE_CHARS = 120
MODULE_ROWS = 40
SCAN_ROWS = 200
# Markers a module row may carry, and what each means (printed under the table when used).
MARKERS = {
    "*": "alpha not stored: alpha = rank assumed (scale 1)",
    "ᴷ": "LoKr: the rank of ΔW = w1 ⊗ w2, rank(w1)·rank(w2)",
    "ᴰ": "DoRA: a magnitude vector rescales each output row of W + ΔW to its norm",
    "ᴿ": "rsLoRA: scale = alpha / √rank",
    "ᵀ": "fan_in_fan_out: the base stores this weight as [in, out]",
}
STATS_NOTE = ("‖ΔW‖F: Frobenius norm of ΔW (scale included); eff. rank: exp(entropy of σᵢ/Σσ); "
              "num. rank: σᵢ above σ₁·max(m, n)·eps")


def _short(value: str) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 1] + "…"


def _kind(m: ModuleInfo) -> str:
    flags = ("ᴰ" if m.dora else "") + ("ᴿ" if m.rslora else "") + ("ᵀ" if m.fan_in_fan_out else "")
    return f"{m.kind} {m.layer}" + (f" {flags}" if flags else "")


def _rank(m: ModuleInfo) -> str:
    return f"{m.rank}ᴷ" if m.kind == "lokr" else str(m.rank)


def _alpha(m: ModuleInfo) -> str:
    return "-" if m.alpha is None else f"{m.alpha:g}" + ("*" if m.alpha_assumed else "")


def _summary_rows(report: InfoReport) -> list[tuple[str, str]]:
    data = report.to_json()
    ranks = data["ranks"]
    fmt = report.format + (f" ({report.dialect} dialect)" if report.dialect else "")
    rows = [("format", fmt)]
    if report.trigger_phrases:
        rows.append(("trigger", " | ".join(report.trigger_phrases)))
    family = report.family or "unknown"
    rows.append(("family", family + (f" ({report.family_evidence})" if report.family_evidence else "")))
    if report.variant:
        rows.append(("variant", report.variant))
    if report.widths:
        rows.append(("needs widths", ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in report.widths.items())))
    rows += [(k, _short(v)) for k, v in report.base_model.items()]
    files = ", ".join(display_path(f) for f in report.files)
    rows.append(("size", f"{human_size(report.size_bytes)} ({files})"))
    comps = report.component_modules
    where = f": {counts(comps)}" if len(comps) > 1 else f" ({', '.join(comps)})"
    rows.append(("modules", f"{len(report.modules)}{where}"))
    kinds = Counter(f"{m.kind} {m.layer}" for m in report.modules)
    rows.append(("kinds", counts(dict(kinds.most_common()))))
    if report.modules:
        by_rank = dict(sorted(ranks["histogram"].items(), key=lambda kv: -int(kv[0])))
        span = "" if ranks["min"] == ranks["max"] else f"{ranks['min']}–{ranks['max']}: "
        rows.append(("ranks", span + counts(by_rank)))
    rows += [("alphas", counts(data["alphas"])), ("scales", counts(data["scales"])), ("dtypes", counts(data["dtypes"]))]
    if data["dora_modules"]:
        rows.append(("DoRA modules", str(data["dora_modules"])))
    if report.extras:
        rows.append(("extra tensors", str(len(report.extras))))
    return rows


def _module_table(report: InfoReport, show_all: bool) -> None:
    columns = [Column("module", path=True), Column("kind"), Column("rank", "right"), Column("alpha", "right"),
               Column("scale", "right"), Column("shape"), Column("dtype")]
    stats = [Column("‖ΔW‖F", "right"), Column("eff. rank", "right"), Column("num. rank", "right")]

    def cells(m: ModuleInfo) -> list[str]:
        row = [m.path, _kind(m), _rank(m), _alpha(m), f"{m.scale:.4g}", "×".join(map(str, m.shape)), m.dtype]
        if report.stats:
            s = m.stats
            row += ["-", "-", "-"] if s is None else [f"{s.norm:.4g}", f"{s.effective_rank:.2f}",
                                                      str(s.numerical_rank)]
        return row

    if report.stats:
        columns += stats
    comps = report.component_modules
    rows = grouped(report.modules, lambda m: m.component, cells, lambda c: f"{c} ({comps.get(c, 0)} modules)")
    data = [r for r in rows if isinstance(r, list)]
    marked = " ".join(" ".join(r) for r in data)
    # A column with one value for every module says nothing per row: it goes to a note.
    constant = [i for i in (1, 3, 4, 6) if len(data) > 1 and len({r[i] for r in data}) == 1]
    notes = [f"{columns[i].header} {data[0][i]}" for i in constant]
    keep = [i for i in range(len(columns)) if i not in constant]
    columns = [columns[i] for i in keep]
    rows = [[r[i] for i in keep] if isinstance(r, list) else r for r in rows]
    legend = [f"every module: {', '.join(notes)}"] if notes else []
    legend += [f"{mark} {meaning}" for mark, meaning in MARKERS.items() if mark in marked]
    if report.stats:
        legend.append(STATS_NOTE)
    table(columns, rows, title="modules", limit=None if show_all else MODULE_ROWS, what="modules", notes=legend)


def render(report: InfoReport, show_all: bool = False) -> None:
    fields(_summary_rows(report), title=Path(report.path).name)
    if report.modules:
        _module_table(report, show_all)
    if report.block_stats:
        from loratool.cli.charts import bar_chart

        bar_chart([(b["block"], b["norm"], f"{b['module_count']} mod., eff. rank {b['effective_rank']:.1f}")
                   for b in report.block_stats], title="‖ΔW‖F per block")
    if report.extras:
        rows = [[e["component"], e["name"], "×".join(map(str, e["shape"])), e["dtype"]] for e in report.extras]
        table([Column("component"), Column("name", path=True), Column("shape"), Column("dtype")], rows,
              title="extra tensors (whole weights)")
    training = training_rows(report.training)
    if training:
        fields([(k, _short(v)) for k, v in training], title="training settings")
    spec = [(k, _short(v)) for k, v in report.modelspec.items() if v.strip()]
    if spec:
        fields(spec, title="modelspec")
    others = other_rows({k: v for k, v in report.metadata.items()
                         if k not in report.training and k not in report.modelspec
                         and not k.startswith(("ss_", "modelspec."))})
    if others:
        fields([(k, _short(v)) for k, v in others], title="other metadata")
    if report.tags:
        table([Column("tag"), Column("count", "right")], [[t, str(c)] for t, c in report.tags],
              title=f"top {len(report.tags)} caption tags")
    for w in report.warnings:
        warn(w)


def render_checkpoint(report: CheckpointReport) -> None:
    container = ", GGUF" if report.container == "gguf" else ""
    rows = [("format", f"base checkpoint ({report.kind}{container})"), ("family", report.family or "unknown")]
    if report.variant:
        rows.append(("variant", report.variant))
    if report.architecture:
        rows.append(("architecture", report.architecture))
    rows += [
        ("size", f"{human_size(report.size_bytes)} ({len(report.files)} file{'s' if len(report.files) != 1 else ''})"),
        ("tensors", str(report.tensor_count)),
        ("parameters", f"{report.parameter_count:,}"),
        ("dtypes", counts(report.dtypes)),
    ]
    rows += [("quantized", f"{n} weight{'s' if n != 1 else ''}: {label}") for label, n in report.quantization.items()]
    rows.append(("components", ", ".join(f"{c} ({n} tensors)" for c, n in report.components.items()) or "-"))
    if report.mapped is not None:
        rows.append(("key map", f"{report.mapped} canonical parameters, {len(report.unmapped)} stored keys unmapped"))
    fields(rows, title=Path(report.path).name)
    others = other_rows(report.metadata)
    if others:
        fields([(k, _short(v)) for k, v in others], title="metadata")
    for w in report.warnings:
        warn(w)


def _base_name(base_model: dict[str, str]) -> str:
    for key in ("ss_sd_model_name", "base_model_name_or_path", "modelspec.architecture", "ss_base_model_version"):
        if base_model.get(key):
            return base_model[key]
    return "-"


def render_scan(report: ScanReport, show_all: bool = False) -> None:
    """One row per file of a library folder (errors named once, on stderr)."""
    root = Path(report.path)
    rows = []
    for e in report.entries:
        p = Path(e.path)
        name = str(p.relative_to(root)) if p.is_relative_to(root) else e.path
        if e.error is not None:
            rows.append([name, "error", *["-"] * 5, human_size(e.size_bytes), "-"])
            continue
        fmt = (e.format or "-") + (f" ({e.dialect})" if e.dialect else "")
        trigger = e.trigger_phrases[0] if e.trigger_phrases else "-"
        digest = e.hashes.get("sshs_model_hash", "")[:10] or "-"
        rows.append([name, fmt, e.family or "unknown", e.rank, e.alpha, _short(trigger)[:40],
                     _short(_base_name(e.base_model))[:40], human_size(e.size_bytes), digest])
    deep = any(e.modules is not None for e in report.entries)
    table([Column("file", path=True, sep="/"), Column("format"), Column("family"), Column("rank", "right"),
           Column("alpha", "right"), Column("trigger"), Column("base model"), Column("size", "right"),
           Column("hash")], rows, limit=None if show_all else SCAN_ROWS, what="files",
          title=f"{display_path(report.path)}: {len(report.entries)} adapter(s), {report.errors} unreadable, "
                f"{report.seconds:.2f} s",
          notes=[("rank / alpha: " + ("the modules' (--modules)" if deep else "as declared (ss_network_dim / "
                  "_alpha, PEFT r / lora_alpha); --modules reads each file's modules")),
                 "hash: sshs_model_hash (sha256 of the tensor data, CivitAI AutoV3) as stored, first 10 digits"])
    for w in report.warnings:
        warn(w)


def render_blocks(report, json_out: bool) -> None:
    if json_out:
        print_json("info", report.to_json())
        return
    rows = [[block, str(len(mods)), _short(", ".join(mods))] for block, mods in report.blocks.items() if block and mods]
    table([Column("block"), Column("modules", "right"), Column("first modules")], rows,
          title=f"{Path(report.path).name}: LoRA Block Weight entries ({report.family or 'unknown family'})")
    outside = report.blocks.get("", [])
    if outside:
        warn(f"{len(outside)} modules are in no block (block weights leave them at 1): {_short(', '.join(outside))}")


@command("info", examples=["loratool info fixtures/kohya_tiny_sd.safetensors",
                           "loratool info fixtures/peft_tiny_llama --stats --json",
                           "loratool info fixtures/kohya_tiny_sd.safetensors --blocks"])
def info_command(
    path: str = typer.Argument(..., metavar="PATH",
                               help="Adapter file, PEFT folder or hf:// reference (or a base checkpoint, or a folder "
                                    "of adapters: one header-only line per file)."),
    json_out: Json = False,
    stats: bool = typer.Option(False, "--stats", help="Read the tensors: per-module ‖ΔW‖F and effective rank."),
    show_all: ShowAll = False,
    from_: FromLayout = None,
    base: BaseModel = None,
    config: SidecarConfig = None,
    family: Family = None,
    blocks: bool = typer.Option(False, "--blocks", help="List which modules each LoRA Block Weight entry "
                                "(BASE, IN04, M00, OUT05 / Flux CLIP, D07, S12…) controls."),
    threads: Threads = None,
    plot: Path = typer.Option(None, "--plot", metavar="PNG", help="Draw ΔW norm and effective rank per block and "
                              "the singular values of the largest modules into this PNG (reads the tensors, as "
                              "--stats; needs the [plot] extra: matplotlib)."),
    force: Force = False,
    modules: bool = typer.Option(False, "--modules", help="On a folder of LoRAs: read each file's modules too "
                                 "(exact ranks, alphas, dialect; about ten times slower than the header scan)."),
) -> None:
    """Show an adapter's format, trigger phrase, modules, ranks, alphas, dtypes, base model and training metadata.

    On a base checkpoint (single-file SD/SDXL/Flux/SD3, diffusers component or pipeline folder, HF
    model): its model family, tensor count, dtype mix and size, from the headers alone. No tensor
    data is read without --stats."""
    from loratool.ops.scan import is_library_folder

    if is_library_folder(path):
        from loratool.ops.scan import scan

        with progress_bar(enabled=not json_out) as progress:
            found = scan(path, family=family, modules=modules, progress=progress, workers=threads)
        if json_out:
            print_json("info", found.to_json())
            for w in found.warnings:
                warn(w)
        else:
            render_scan(found, show_all)
        return
    from loratool.ops.inspect import CheckpointReport, inspect
    from loratool.ops.scan import ScanReport

    if blocks:
        from loratool.ops.block_weights import block_report

        render_blocks(block_report(path, from_, base=base, config=config, family=family), json_out)
        return
    if plot is not None:
        from loratool.ops.plot import check_plot_path

        check_plot_path(plot, inputs=[path], force=force)
        stats = True
    with progress_bar(enabled=(stats or Path(path).is_dir()) and not json_out) as progress:
        report = inspect(path, from_, base=base, config=config, family=family, stats=stats, threads=threads,
                         progress=progress)
    drawn = None
    if plot is not None and isinstance(report, CheckpointReport):
        warn(f"{path} is a base model: --plot draws adapters only; nothing drawn")
    elif plot is not None:
        from loratool.api import load
        from loratool.ops.plot import plot_info

        drawn = plot_info(report, load(path, from_, base=base, config=config, family=family), plot)
    if json_out:
        print_json("info", {**report.to_json(), **({"plot": drawn.to_json()} if drawn else {})})
        for w in report.warnings:
            warn(w)
    elif isinstance(report, CheckpointReport):
        render_checkpoint(report)
    elif isinstance(report, ScanReport):
        render_scan(report, show_all)
    else:
        render(report, show_all)
        if drawn is not None:
            say(f"plot: {display_path(drawn.path)} ({', '.join(drawn.panels)})")
