"""``loratool check LORA BASE``: parse, call :func:`loratool.ops.check.check`, render; exit 0 / 1 / 2."""

from __future__ import annotations

import typer

from loratool.cli.app import command
from loratool.cli.match_view import print_groups
from loratool.cli.options import Json
from loratool.cli.render import display_path, fields, print_json, say


def _identity(identity: dict) -> str:
    text = identity.get("family") or "unknown"
    if identity.get("variant"):
        text += f", {identity['variant']}"
    widths = ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in (identity.get("widths") or {}).items())
    return text + (f"; widths {widths}" if widths else "")


@command("check", examples=[
    "loratool check fixtures/kohya_tiny_sd.safetensors fixtures/base/tiny_sd",
    "loratool check fixtures/kohya_tiny_sd.safetensors fixtures/base/tiny_sd/unet --json",
])
def check_command(
    lora: str = typer.Argument(..., metavar="LORA", help="LoRA file or folder (any layout loratool reads)."),
    base: str = typer.Argument(..., metavar="BASE",
                               help="Base model: .safetensors file, sharded or diffusers folder, hf:// ref."),
    ignore_family: bool = typer.Option(False, "--ignore-family", help="Check as merge --ignore-family merges: "
                                       "a LoRA of an unrelated family is no refusal."),
    as_json: Json = False,
) -> int:
    """Say how much of a LoRA a merge into BASE would place and why it would skip the rest, one line per cause
    with its fix, writing nothing.

    Causes: wrong family or variant, a component the base lacks, another naming (dialect) or prefix, fused ↔ split
    projections, shape mismatches (both shapes and the likely cause), weights the base does not have. Exit 0
    when every module would merge, 1 when any would be skipped (or the merge refused), 2 on bad input."""
    from loratool.ops.check import check

    report = check(lora, base, ignore_family=ignore_family)
    if as_json:
        print_json("check", report.to_json())
        return report.exit_code
    fields([("LoRA", f"{display_path(report.lora)} ({report.format}; needs {_identity(report.identity)})"),
            ("base", f"{display_path(report.base)} ({report.base_family or 'unknown family'}"
                     + (f", {report.base_architecture})" if report.base_architecture else ")"))],
           title="check")
    say(f"{report.matched_total} of {report.module_count} modules ({report.share:.0%}) would merge"
        + (f"; {report.refused}" if report.refused else ""))
    print_groups([g.to_json() for g in report.groups], say)
    return report.exit_code
