"""``loratool merge BASE LORA [LORA ...] -o OUT``: parse, call :func:`loratool.ops.merge.merge`, render."""

from __future__ import annotations

from pathlib import Path

import typer

from loratool.cli.app import command
from loratool.cli.match_view import print_groups
from loratool.cli.options import FLOAT_DTYPES, BlockWeights, Device, Force, Json, Strength, Threads
from loratool.cli.render import Column, display_path, print_json, progress_bar, say, table, warn


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
                              help="Output dtype of float tensors (default: each tensor's own; quantized weights "
                                   "are written dequantized in it)."),
    device: Device = "auto",
    threads: Threads = None,
    strict: bool = typer.Option(False, "--strict", help="Unmatched adapter modules are an error."),
    force: Force = False,
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Write NaN/Inf results instead of failing."),
    sync: bool = typer.Option(False, "--sync", help="Flush the output to disk before renaming it into place "
                              "(survives a power loss; slower: the disk's write speed)."),
    ignore_family: bool = typer.Option(False, "--ignore-family", help="Merge even when a LoRA's model family "
                                       "(sd1, sdxl, flux, llm, ...) is not the base's."),
    block_weights: BlockWeights = None,
    strength: Strength = None,
    rounding: str = typer.Option("nearest", "--rounding", metavar="nearest|stochastic",
                                 help="How merged float8 weights are rounded: nearest (ties to even) or stochastic "
                                      "(seeded per tensor, ComfyUI-style)."),
    seed: int = typer.Option(0, "--seed", metavar="N",
                             help="Seed of --rounding stochastic (the same seed gives the same bytes)."),
    requantize: bool = typer.Option(False, "--requantize", help="bitsandbytes bases: write 4-bit / 8-bit weights "
                                    "again instead of bf16 (the update mostly vanishes; reported)."),
    base_16bit: str = typer.Option(None, "--base-16bit", metavar="ORIGINAL",
                                   help="The 16-bit original of a bitsandbytes BASE: checked to pair with it, then "
                                        "merged into (the output mirrors it)."),
    as_json: Json = False,
) -> None:
    """Merge LoRAs into a base model (W' = W + Σ λᵢ·ΔWᵢ), streaming one tensor at a time.

    The output mirrors the base: the same files, tensor names, dtypes and metadata; untouched tensors
    are copied byte for byte. Quantized bases (fp8, ComfyUI / kohya scaled fp8, GGUF, bitsandbytes)
    are merged in float32 and rounded once back to their kind (scales recomputed); how much of each
    module's update survived is reported (docs/quantized.md)."""
    from loratool.ops.merge import merge

    with progress_bar(enabled=not as_json) as progress:
        result = merge(
            base, loras, output, alpha or None, dtype=dtype, device=device, threads=threads, strict=strict, force=force,
            allow_nonfinite=allow_nonfinite, sync=sync, ignore_family=ignore_family, progress=progress,
            block_weights=block_weights, strength_patterns=strength, rounding=rounding, seed=seed,
            requantize=requantize, base_16bit=base_16bit,
        )
    for message in result.warnings:
        warn(message)
    if as_json:
        print_json("merge", result.to_json())
        return
    if result.unmatched:
        warn(f"{len(result.unmatched)} adapter modules match no base weight and were skipped (--json lists them; "
             f"loratool check explains them the same way):")
        print_groups(result.unmatched_groups, warn)
    if result.dropped_files:
        warn(f"weight files not merged and not copied: {', '.join(result.dropped_files)}")
    rows = [[display_path(a), f"{s:g}"] for a, s in zip(result.adapters, result.strengths)]
    table([Column("LoRA", path=True, sep="/"), Column("strength", "right")], rows,
          title=f"merged into {display_path(result.output)}")
    table([Column("component"), Column("modules matched", "right")],
          [[comp, str(n)] for comp, n in result.matched.items()])
    if result.kept is not None:
        kept = result.kept
        say(f"update kept after rounding to the base's storage kind: {kept['overall']:.1%} overall "
            f"(aligned {kept['overall_aligned']:.1%}) over {len(kept['tensors'])} weight(s); lowest: "
            f"{min(m['kept'] for m in kept['tensors']):.1%}")
    say(f"{result.merged_tensors} tensors merged, {result.skipped} copied, {len(result.unmatched)} modules unmatched; "
        f"{result.seconds:.2f} s, peak memory {result.peak_rss_mb:.0f} MB, device {result.device}")
