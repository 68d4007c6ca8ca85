"""``loratool convert``: one layout in, another out (PEFT output is a folder)."""

from __future__ import annotations

import typer
from rich.table import Table

from loratool.cli.app import app
from loratool.cli.options import BaseModel, Device, Dynamic, Family, Force, FromLayout, Param, SidecarConfig
from loratool.cli.render import console, print_json, progress_bar


@app.command("convert")
def convert_command(
    path: str = typer.Argument(..., help="Adapter file, PEFT folder or hf:// reference."),
    to: str = typer.Option(..., "--to", help="Output layout: kohya, diffusers, peft, loralib or gguf (llama.cpp; "
                           "--base gives the base model's config.json)."),
    out: str = typer.Option(..., "-o", "--output", "--out", help="Output file (PEFT: folder)."),
    from_: FromLayout = None,
    base: BaseModel = None,
    config: SidecarConfig = None,
    family: Family = None,
    force: Force = False,
    as_lora: bool = typer.Option(False, "--as-lora", help="Turn LoHa, LoKr, LoCon Tucker, DoRA (needs --base) and "
                                 "full diff modules into plain LoRA: exact where the rank allows, else the best "
                                 "rank N with its error printed."),
    rank: int = typer.Option(None, "--rank", "-r", help="With --as-lora: rank cap of the converted modules."),
    dynamic: Dynamic = None,
    param: Param = None,
    device: Device = "auto",
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (stable contract)."),
) -> None:
    """Convert an adapter between kohya, diffusers, PEFT and loralib layouts (LyCORIS: read only)."""
    from loratool.ops.convert import convert

    if as_lora or rank is not None or dynamic or param is not None:
        _as_lora(path, to, out, from_, base, config, family, force, rank, dynamic, param, device, json_out)
        return
    result = convert(path, to, out, from_format=from_, base=base, config=config, family=family, force=force)
    if json_out:
        print_json(result.to_json())
        return
    table = Table(show_header=False, title=f"{result.source_format} → {result.target_format}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("modules", str(result.modules))
    table.add_row("components", ", ".join(f"{c} ({n})" for c, n in result.components.items()))
    if result.extras:
        table.add_row("extra tensors", str(result.extras))
    table.add_row("dtypes", ", ".join(result.dtypes))
    table.add_row("written", "\n".join(result.files))
    console.print(table)


def _as_lora(path, to, out, from_, base, config, family, force, rank, dynamic, param, device, json_out) -> None:
    from loratool.ops.as_lora import as_lora_file
    from loratool.ops.rank_rules import RankRule

    rule = RankRule(dynamic, param) if dynamic or param is not None else None
    with progress_bar(enabled=not json_out) as progress:
        result, files = as_lora_file(path, to, out, rank=rank, rule=rule, from_format=from_, base=base, config=config,
                                     family=family, force=force, device=device, progress=progress)
    if json_out:
        print_json({**result.to_json(), "to": to, "output": str(out), "files": [str(f) for f in files]})
        return
    table = Table(title=f"{path} → {out} ({to}, plain LoRA)", title_justify="left")
    for col, justify in (("module", "left"), ("kind", "left"), ("rank", "right"), ("→", "right"),
                         ("‖ΔW‖", "right"), ("‖error‖", "right"), ("relative", "right"), ("method", "left")):
        table.add_column(col, justify=justify)
    for m in result.modules:
        table.add_row(f"{m.component}:{m.path}", m.kind, str(m.rank_in), str(m.rank_out), f"{m.norm:.4g}",
                      f"{m.error:.3g}", f"{m.rel_error:.3e}", m.method)
    console.print(table)
    console.print(f"{len(result.modules)} modules converted, {result.unchanged} plain LoRA modules unchanged; "
                  f"max relative error {result.max_rel_error:.3e}; written: {', '.join(map(str, files))}",
                  highlight=False)
