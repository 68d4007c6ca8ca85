"""What each layout writes (one file or a folder) and the output check every writer and op runs.

A layout's output kind follows from the layout and the name given: ``kohya`` writes one
``.safetensors`` file, ``loralib`` one ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors`` file (and its
sidecar), ``peft`` a folder (``OUT/`` or ``OUT/<component>/`` per component), ``diffusers`` a file when
the name ends in ``.safetensors``, else a folder holding ``pytorch_lora_weights.safetensors``. A name
that contradicts the kind (``--to peft -o x.safetensors``, ``--to kohya -o x.pt``) is refused, and
``--force`` replaces a folder only when every file in it is one of :data:`ADAPTER_FILES` (at the top,
or in a component folder): a folder that only an adapter writer of loratool could have made.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from loratool.components import COMPONENTS
from loratool.errors import FormatError, OutputError
from loratool.io.atomic import FILE_SUFFIXES, check_output

# Files loratool's adapter writers put in a folder (PEFT, diffusers).
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors",
                           "adapters.safetensors"})  # (MLX-LM's weights beside its adapter_config.json)
# layout -> the suffixes its file outputs may have (layouts absent here write folders; diffusers: both)
FILE_LAYOUTS = {"kohya": (".safetensors",), "loralib": (".pt", ".pth", ".bin", ".safetensors"),
                "diffusers": (".safetensors",)}
FOLDER_LAYOUTS = ("peft", "diffusers", "mlx")


def adapter_file(rel: PurePosixPath) -> bool:
    """A file an adapter writer of loratool puts in an output folder (``rel``: relative to the folder)."""
    parts = rel.parts
    return (len(parts) == 1 or (len(parts) == 2 and parts[0] in COMPONENTS)) and parts[-1] in ADAPTER_FILES


def is_folder_output(layout: str, out: str | os.PathLike) -> bool:
    suffix = Path(out).suffix.lower()
    if layout in FILE_LAYOUTS and (layout not in FOLDER_LAYOUTS or suffix in FILE_LAYOUTS[layout]):
        return False
    if layout in FOLDER_LAYOUTS:
        return True
    raise FormatError(f"cannot write layout {layout!r}")


def check_target(layout: str, out: str | os.PathLike, inputs=(), force: bool = False) -> Path:
    """:func:`loratool.io.atomic.check_output` for an output of ``layout`` at ``out`` (see the module doc)."""
    out = Path(out)
    folder = is_folder_output(layout, out)
    suffix = out.suffix.lower()
    if not folder and suffix in FILE_SUFFIXES and suffix not in FILE_LAYOUTS[layout]:
        raise OutputError(f"{out}: a {layout} file ends in {' or '.join(FILE_LAYOUTS[layout])}, not {out.suffix}")
    return check_output(out, inputs, force, folder=folder, owned=adapter_file if folder else None)
