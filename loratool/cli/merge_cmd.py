"""``loratool merge BASE LORA [LORA ...] -o OUT``: parse, call :func:`loratool.ops.merge.merge`, render."""

from __future__ import annotations

from pathlib import Path

import typer

from loratool.cli.app import command
from loratool.cli.options import FLOAT_DTYPES, BlockWeights, Device, Force, Json, Strength
from loratool.cli.render import Column, display_path, print_json, progress_bar, say, table, warn

UNMATCHED_SHOWN = 20


@command("merge", number_lists=["--alpha", "-a"], examples=[
    "loratool merge fixtures/base/tiny_sd fixtures/kohya_tiny_sd.safetensors --alpha 0.7 -o out/merged_tiny_sd",
    "loratool merge base/ a.safetensors b_peft/ --alpha 0.8 0.5 -o merged/",
])
def merge_command(
    base: str = typer.Argument(..., metavar="BASE",
                               help="Base model: .safetensors file, sharded or diffusers folder, hf:// ref."),
    loras: list[str] = typer.Argument(..., metavar="LORA...",
                                      help="One or more LoRA files/folders (any layout loratool reads)."),
    output: Path = typer.Option(..., "-o", "--output", metavar="OUT",
                                help="Output file (file base) or folder (folder base)."),
    alpha: list[float] = typer.Option(
        None, "--alpha", "-a", metavar="S",
        help="Strength λ in W + λ·ΔW: one for every LoRA, or one per LoRA in order, several after one flag "
             "(--alpha 0.8 0.5) or the flag repeated; negative values subtract (default 1).",
    ),
    dtype: str = typer.Option(None, "--dtype", metavar=FLOAT_DTYPES,
                              help="Output dtype of float tensors (default: each tensor's own)."),
    device: Device = "auto",
    strict: bool = typer.Option(False, "--strict", help="Unmatched adapter modules are an error."),
    force: Force = False,
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Write NaN/Inf results instead of failing."),
    sync: bool = typer.Option(False, "--sync", help="Flush the output to disk before renaming it into place "
                              "(survives a power loss; slower: the disk's write speed)."),
    ignore_family: bool = typer.Option(False, "--ignore-family", help="Merge even when a LoRA's model family "
                                       "(sd1, sdxl, flux, llm, ...) is not the base's."),
    block_weights: BlockWeights = None,
    strength: Strength = None,
    as_json: Json = False,
) -> None:
    """Merge LoRAs into a base model (W' = W + Σ λᵢ·ΔWᵢ), streaming one tensor at a time.

    The output mirrors the base: the same files, tensor names, dtypes and metadata; untouched tensors
    are copied byte for byte."""
    from loratool.ops.merge import merge

    with progress_bar(enabled=not as_json) as progress:
        result = merge(
            base, loras, output, alpha or None, dtype=dtype, device=device, strict=strict, force=force,
            allow_nonfinite=allow_nonfinite, sync=sync, ignore_family=ignore_family, progress=progress,
            block_weights=block_weights, strength_patterns=strength,
        )
    if as_json:
        print_json("merge", result.to_json())
        return
    for message in result.warnings:
        warn(message)
    if result.unmatched:
        shown = ", ".join(result.unmatched[:UNMATCHED_SHOWN])
        more = f" and {len(result.unmatched) - UNMATCHED_SHOWN} more (--json lists them)" \
            if len(result.unmatched) > UNMATCHED_SHOWN else ""
        warn(f"{len(result.unmatched)} adapter modules match no base weight and were skipped: {shown}{more}")
    if result.dropped_files:
        warn(f"weight files not merged and not copied: {', '.join(result.dropped_files)}")
    rows = [[display_path(a), f"{s:g}"] for a, s in zip(result.adapters, result.strengths)]
    table([Column("LoRA", path=True, sep="/"), Column("strength", "right")], rows,
          title=f"merged into {display_path(result.output)}")
    table([Column("component"), Column("modules matched", "right")],
          [[comp, str(n)] for comp, n in result.matched.items()])
    say(f"{result.merged_tensors} tensors merged, {result.skipped} copied, {len(result.unmatched)} modules unmatched; "
        f"{result.seconds:.2f} s, peak memory {result.peak_rss_mb:.0f} MB, device {result.device}")
