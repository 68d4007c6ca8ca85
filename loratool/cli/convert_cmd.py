"""``loratool convert``: one layout in, another out (PEFT output is a folder)."""

from __future__ import annotations

import typer

from loratool.cli.app import command
from loratool.cli.options import (
    WRITE_LAYOUTS,
    BaseModel,
    Device,
    DynamicParam,
    DynamicRule,
    Family,
    Force,
    FromLayout,
    Json,
    ShowAll,
    SidecarConfig,
)
from loratool.cli.render import Column, counts, display_path, fields, grouped, print_json, progress_bar, say, table

MODULE_ROWS = 30


@command("convert", examples=[
    "loratool convert fixtures/kohya_tiny_sd.safetensors --to peft -o out/tiny_sd_peft",
])
def convert_command(
    path: str = typer.Argument(..., metavar="LORA", help="Adapter file, PEFT folder or hf:// reference."),
    to: str = typer.Option(..., "--to", metavar=WRITE_LAYOUTS,
                           help="Output layout (native: ComfyUI keys; gguf: llama.cpp LoRA, --base gives the base "
                                "model's config.json)."),
    out: str = typer.Option(..., "-o", "--output", "--out", metavar="OUT",
                            help="Output file (PEFT: a folder, one sub-folder per component)."),
    from_: FromLayout = None,
    base: BaseModel = None,
    config: SidecarConfig = None,
    family: Family = None,
    force: Force = False,
    as_lora: bool = typer.Option(False, "--as-lora", help="Turn LoHa, LoKr, LoCon Tucker, DoRA (needs --base) and "
                                 "full diff modules into plain LoRA: exact where the rank allows, else the best "
                                 "rank N with its error printed."),
    rank: int = typer.Option(None, "--rank", "-r", metavar="N",
                             help="With --as-lora: rank cap of the converted modules."),
    dynamic: DynamicRule = None,
    param: DynamicParam = None,
    device: Device = "auto",
    json_out: Json = False,
    show_all: ShowAll = False,
) -> None:
    """Convert an adapter between the kohya, diffusers, PEFT and loralib layouts (LyCORIS files are read only).

    Every module keeps its factors and its scale; only the names and the way alpha is stored change."""
    from loratool.ops.convert import convert

    if as_lora or rank is not None or dynamic or param is not None:
        _as_lora(path, to, out, from_, base, config, family, force, rank, dynamic, param, device, json_out, show_all)
        return
    result = convert(path, to, out, from_format=from_, base=base, config=config, family=family, force=force)
    if json_out:
        print_json("convert", result.to_json())
        return
    rows = [("modules", f"{result.modules}: {counts(result.components)}")]
    if result.extras:
        rows.append(("extra tensors", str(result.extras)))
    rows += [("dtypes", counts(result.dtypes)), ("written", "\n".join(display_path(f) for f in result.files))]
    fields(rows, title=f"converted {result.source_format} → {result.target_format}")


def _as_lora(path, to, out, from_, base, config, family, force, rank, dynamic, param, device, json_out,
             show_all) -> None:
    from loratool.ops.as_lora import as_lora_file
    from loratool.ops.rank_rules import RankRule

    rule = RankRule(dynamic, param) if dynamic or param is not None else None
    with progress_bar(enabled=not json_out) as progress:
        result, files = as_lora_file(path, to, out, rank=rank, rule=rule, from_format=from_, base=base, config=config,
                                     family=family, force=force, device=device, progress=progress)
    if json_out:
        print_json("convert", {**result.to_json(), "to": to, "output": str(out), "files": [str(f) for f in files]})
        return
    rows = grouped(result.modules, lambda m: m.component,
                   lambda m: [m.path, m.kind, str(m.rank_in), str(m.rank_out), f"{m.norm:.4g}", f"{m.error:.3g}",
                              f"{m.rel_error:.3e}", m.method])
    table([Column("module", path=True), Column("kind"), Column("rank", "right"), Column("→", "right"),
           Column("‖ΔW‖", "right"), Column("‖error‖", "right"), Column("relative", "right"), Column("method")], rows,
          title=f"{display_path(path)} → {display_path(out)} ({to}, plain LoRA)",
          limit=None if show_all else MODULE_ROWS, what="modules",
          notes=["→: the plain LoRA's rank; ‖error‖: ‖ΔW_lora − ΔW‖F; relative: ‖error‖ / ‖ΔW‖F"])
    say(f"{len(result.modules)} modules converted, {result.unchanged} plain LoRA modules unchanged; "
        f"max relative error {result.max_rel_error:.3e}; written: {', '.join(display_path(f) for f in files)}")
