"""Options several commands share, declared once so their names, metavars, defaults and help agree.

How to add a command or an option (the pattern every command module follows):

* A command is one module ``loratool/cli/<name>_cmd.py`` listed in ``loratool.cli.COMMANDS``,
  whose function is registered with ``@command("<name>", examples=["loratool <name> ..."])``
  (:func:`loratool.cli.app.command`). Its docstring's first sentence is the summary
  ``loratool -h`` lists; the examples end ``loratool <name> -h`` and are run by the tests.
* An option shared by several commands is an ``Annotated`` alias here; one used once is declared
  in its command. Give every option that takes a value a ``metavar`` people can read: the
  choices joined by ``|`` (``kohya|diffusers|peft|loralib``, from the registry that decides
  them, so help and validation cannot drift) or a placeholder (``N``, ``P``, ``PATH``).
* A ``list[float]`` option that should also take several values after one flag (kohya's
  ``--ratios 0.6 0.4``) names its flags in ``command(..., number_lists=[...])``.
* The command function parses, calls one operation, and renders through
  :mod:`loratool.cli.render` (``print_json(command, data)`` adds ``schema`` and ``command``;
  tables go through ``render.table`` so they fit the terminal).
* Import the operation inside the function: ``loratool -h`` and ``info`` on a header must not
  import torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from loratool import formats
from loratool.float_dtypes import FLOAT_NAMES

# Choices whose deciding modules import torch (``-h`` must not): copies a test keeps equal to
# ``ops.device.DEVICE_CHOICES``, ``ops.rank_rules.RULES`` and ``ops.stack.METHODS``.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
RANK_RULES = ("sv_ratio", "sv_fro", "sv_cumulative")
STACK_METHODS = ("concat", "svd", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def choices(values) -> str:
    """The metavar of an option with a fixed set of values: ``a|b|c``."""
    return "|".join(values)


WRITE_LAYOUTS = choices(formats.WRITABLE)
READ_LAYOUTS = choices(formats.LAYOUTS)
FLOAT_DTYPES = choices(FLOAT_NAMES)

FromLayout = Annotated[
    str | None, typer.Option("--from", metavar=READ_LAYOUTS, help="Layout to assume instead of detecting it.")
]
ToLayout = Annotated[str | None, typer.Option("--to", metavar=WRITE_LAYOUTS, help="Output layout.")]
BaseModel = Annotated[
    str | None,
    typer.Option("--base", metavar="BASE", help="Base model whose module names restore kohya names."),
]
SidecarConfig = Annotated[
    str | None, typer.Option("--config", metavar="CFG", help="loralib sidecar JSON or PEFT adapter_config.json.")
]
Family = Annotated[
    str | None,
    typer.Option("--family", metavar="FAMILY",
                 help="Model family to assume instead of detecting it (sd1, sd2, sdxl, sd3, flux, llm, ...)."),
]
Device = Annotated[
    str, typer.Option("--device", metavar=choices(DEVICE_CHOICES), help="Where the matrix work runs.")
]
DynamicRule = Annotated[
    str | None,
    typer.Option("--dynamic", metavar=choices(RANK_RULES),
                 help="Pick each module's rank from its singular values σ (capped at --rank): sv_ratio keeps "
                      "σᵢ ≥ σ₁/P, sv_fro the fewest with √(Σσᵢ²/Σσ²) ≥ P, sv_cumulative with Σσᵢ/Σσ ≥ P."),
]
DynamicParam = Annotated[float | None, typer.Option("--param", metavar="P", help="P of the --dynamic rule.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON document instead of tables (docs/commands.md).")
]
ShowAll = Annotated[bool, typer.Option("--all", help="List every module (tables show the first ones).")]
BlockWeights = Annotated[
    list[str] | None,
    typer.Option("--block-weights", metavar="PRESET|VECTOR",
                 help="LoRA Block Weight preset (INS, MIDD, OUTALL, ...) or vector of 12/17/20/26 "
                 "(SD1/SDXL) or 61 (Flux) numbers, or a kohya --lbws JSON list; once, or once per LoRA."),
]
Strength = Annotated[
    list[str] | None,
    typer.Option("--strength", metavar="PATTERN:VALUE",
                 help="Multiplier for the modules a glob or block name matches "
                 "(e.g. 'text_encoder:0.5', 'up_blocks.*:0.8', 'OUT03:0'); later patterns win."),
]
