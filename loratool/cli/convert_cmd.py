"""``loratool convert``: one layout in, another out (PEFT output is a folder)."""

from __future__ import annotations

import typer

from loratool.cli.app import command
from loratool.cli.options import WRITE_LAYOUTS, BaseModel, Family, Force, FromLayout, Json, SidecarConfig
from loratool.cli.render import counts, display_path, fields, print_json


@command("convert", examples=[
    "loratool convert fixtures/kohya_tiny_sd.safetensors --to peft -o out/tiny_sd_peft",
])
def convert_command(
    path: str = typer.Argument(..., metavar="LORA", help="Adapter file, PEFT folder or hf:// reference."),
    to: str = typer.Option(..., "--to", metavar=WRITE_LAYOUTS, help="Output layout."),
    out: str = typer.Option(..., "-o", "--output", "--out", metavar="OUT",
                            help="Output file (PEFT: a folder, one sub-folder per component)."),
    from_: FromLayout = None,
    base: BaseModel = None,
    config: SidecarConfig = None,
    family: Family = None,
    force: Force = False,
    json_out: Json = False,
) -> None:
    """Convert an adapter between the kohya, diffusers, PEFT and loralib layouts (LyCORIS files are read only).

    Every module keeps its factors and its scale; only the names and the way alpha is stored change."""
    from loratool.ops.convert import convert

    result = convert(path, to, out, from_format=from_, base=base, config=config, family=family, force=force)
    if json_out:
        print_json("convert", result.to_json())
        return
    rows = [("modules", f"{result.modules}: {counts(result.components)}")]
    if result.extras:
        rows.append(("extra tensors", str(result.extras)))
    rows += [("dtypes", counts(result.dtypes)), ("written", "\n".join(display_path(f) for f in result.files))]
    fields(rows, title=f"converted {result.source_format} → {result.target_format}")
