"""Options several commands share, declared once so their names, defaults and help agree."""

from __future__ import annotations

from typing import Annotated

import typer

FromLayout = Annotated[str | None, typer.Option("--from", help="Layout to assume instead of detecting it.")]
BaseModel = Annotated[str | None, typer.Option("--base", help="Base model whose module names restore kohya names.")]
SidecarConfig = Annotated[
    str | None, typer.Option("--config", help="loralib sidecar JSON or PEFT adapter_config.json.")
]
Family = Annotated[
    str | None, typer.Option("--family", help="Model family to assume (sd1, sd2, sdxl, sd3, flux, llm).")
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Dynamic = Annotated[
    str | None, typer.Option("--dynamic", help="Per-module rank rule: sv_ratio, sv_fro or sv_cumulative.")
]
Param = Annotated[float | None, typer.Option("--param", help="P of the --dynamic rule.")]
BlockWeights = Annotated[
    list[str] | None,
    typer.Option("--block-weights", help="LoRA Block Weight preset (INS, MIDD, OUTALL, ...) or vector of 12/17/20/26 "
                 "(SD1/SDXL) or 61 (Flux) numbers, or a kohya --lbws JSON list; once, or once per LoRA."),
]
Strength = Annotated[
    list[str] | None,
    typer.Option("--strength", help="PATTERN:VALUE multiplier for the modules a glob or block name matches "
                 "(e.g. 'text_encoder:0.5', 'up_blocks.*:0.8', 'OUT03:0'); later patterns win."),
]
