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
Threads = Annotated[
    int | None,
    typer.Option("--threads", min=1,
                 help="CPU threads the maths may use (default: every CPU; per-module work runs single-threaded "
                      "unless more threads are measured to be faster)."),
]
