"""Convert an adapter between layouts: ``loratool.load`` then ``loratool.save``.

No maths happens here: the canonical :class:`~loratool.adapter.Adapter` carries every module's
factors and scale, and each writer re-expresses them in its own terms (kohya ``alpha`` tensors,
PEFT ``rank_pattern`` / ``alpha_pattern``, the diffusers ``lora_adapter_metadata`` header, the
loralib sidecar). Formats that cannot hold a module (e.g. a LoHa in loralib) refuse with a
:class:`~loratool.errors.FormatError` before anything is written.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool import api, formats
from loratool.errors import UsageError
from loratool.ops import Progress


@dataclass
class ConvertResult:
    source: str
    source_format: str
    target_format: str
    output: str
    files: list[str]
    modules: int
    components: dict[str, int]  # component -> modules
    extras: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> modules

    def to_json(self) -> dict[str, Any]:
        """The stable ``--json`` contract of ``loratool convert``."""
        return {
            "source": self.source,
            "from": self.source_format,
            "to": self.target_format,
            "output": self.output,
            "files": self.files,
            "module_count": self.modules,
            "components": list(self.components),
            "component_modules": self.components,
            "extra_count": self.extras,
            "dtypes": self.dtypes,
        }


def _inputs(path: str | os.PathLike, config: str | os.PathLike | None) -> tuple[Path, ...]:
    """Every local file the conversion reads (weights, folder, sidecar, config): no output may land on one."""
    if str(path).startswith("hf://"):
        return ()  # hub files live in the cache; the output cannot be one of them by accident
    p = Path(path)
    found = [p, p.with_name(p.name + ".json")]
    if p.is_file() and (p.parent / "adapter_config.json").is_file():
        found.append(p.parent / "adapter_config.json")
    if config is not None:
        found.append(Path(config))
    return tuple(f for f in found if f.exists())


def convert(
    path: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    *,
    from_format: str | None = None,
    base: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    family: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertResult:
    """Read ``path`` (layout ``from_format`` or detected) and write it as layout ``to`` at ``out``."""
    if to not in formats.WRITABLE:
        raise UsageError(f"--to {to!r}: writable layouts are {', '.join(formats.WRITABLE)}")
    if from_format is not None and from_format not in formats.LAYOUTS:
        raise UsageError(f"--from {from_format!r}: known layouts are {', '.join(formats.LAYOUTS)}")
    if progress:
        progress("read", 0, 2)
    model_config = None
    if to == "gguf":  # the base is read for its config.json (architecture, head counts), not for names
        from loratool.formats.gguf_lora import load_model_config

        model_config, base = load_model_config(base), None
    adapter = api.load(path, from_format, base=base, config=config, family=family)
    if progress:
        progress("write", 1, 2)
    written = api.save(adapter, out, to, force=force, inputs=_inputs(path, config), family=family,
                       model_config=model_config)
    if progress:
        progress("write", 2, 2)
    counts = {c: len(adapter.by_component(c)) for c in adapter.components}
    dtypes = dict(Counter(str(m.dtype).removeprefix("torch.") for m in adapter).most_common())
    return ConvertResult(
        source=str(path),
        source_format=adapter.source_format or from_format or "?",
        target_format=to,
        output=str(out),
        files=[str(p) for p in written],
        modules=len(adapter),
        components=counts,
        extras=len(adapter.extras),
        dtypes=dtypes,
    )
