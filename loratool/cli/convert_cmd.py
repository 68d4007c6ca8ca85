"""``loratool convert``: one layout in, another out (PEFT output is a folder)."""

from __future__ import annotations

import typer
from rich.table import Table

from loratool.cli.app import app
from loratool.cli.options import BaseModel, Family, Force, FromLayout, SidecarConfig
from loratool.cli.render import console, print_json


@app.command("convert")
def convert_command(
    path: str = typer.Argument(..., help="Adapter file, PEFT folder or hf:// reference."),
    to: str = typer.Option(..., "--to",
                           help="Output layout: kohya, diffusers, peft, loralib or native (ComfyUI keys)."),
    out: str = typer.Option(..., "-o", "--output", "--out", help="Output file (PEFT: folder)."),
    from_: FromLayout = None,
    base: BaseModel = None,
    config: SidecarConfig = None,
    family: Family = None,
    force: Force = False,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (stable contract)."),
) -> None:
    """Convert an adapter between kohya, diffusers, PEFT and loralib layouts (LyCORIS: read only)."""
    from loratool.ops.convert import convert

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
