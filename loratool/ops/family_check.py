"""Whether an adapter's model family fits a base checkpoint's, before anything is merged.

Names alone can place a LoRA on the wrong model: an SD1 LoRA's CLIP ``q_proj`` / ``k_proj`` /
``v_proj`` land on a Llama base's attention through the prefix rule when the widths happen to agree.
So when both families are known (``Adapter.family``, set on read from names, shapes and metadata;
the base's from its headers and ``config.json`` / ``model_index.json``) and are not related
(:func:`loratool.arch.evidence.related`: the same family, SD1 ↔ SD2, a family and its stand-alone
``clip`` / ``t5`` text encoders), the merge is refused naming both; ``ignore_family`` (``merge
--ignore-family``) merges anyway. An unknown family on either side is no reason to refuse.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import MatchError

if TYPE_CHECKING:
    from loratool.adapter import Adapter
    from loratool.io.checkpoint import Checkpoint


def json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing or not a JSON object."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def base_family_of(ckpt: Checkpoint, shapes: Mapping[str, tuple[int, ...]] | None = None
                   ) -> tuple[str | None, str | None]:
    """(family, architecture) of a base checkpoint from its headers (``shapes``: {key: shape} of every
    stored tensor, read from the headers when not given) and the JSON beside its weights."""
    from loratool.arch.checkpoints import base_family

    if shapes is None:
        shapes = {key: tuple(f.info(key).shape) for _, _, f in ckpt.parts() for key in f.keys()}
    if ckpt.kind == "pipeline":
        from loratool.io.checkpoint import pipeline_index

        index = pipeline_index(ckpt.root)
        return base_family(shapes, pipeline=json_object(index) if index is not None else None)
    folder = ckpt.root if ckpt.is_folder else ckpt.root.parent
    return base_family(shapes, config=json_object(folder / "config.json"))


def family_mismatches(adapters: Sequence[Adapter], names: Sequence[str], ckpt: Checkpoint
                      ) -> tuple[str | None, list[tuple[int, str]]]:
    """(the base's family, [(adapter index, its family)] for every adapter whose known family is not related
    to the known family of ``ckpt``); the base family is None when unknown (then nothing is refused)."""
    from loratool import arch
    from loratool.arch.evidence import related

    if not any(a.family is not None for a in adapters):
        return None, []
    base, _ = base_family_of(ckpt)
    if base is None:
        return None, []
    return base, [(i, a.family) for i, a in enumerate(adapters)
                  if a.family is not None and not related(a.family, base, arch.families())]


def check_families(adapters: Sequence[Adapter], names: Sequence[str], ckpt: Checkpoint) -> None:
    """Refuse (:class:`MatchError`) an adapter whose known family is not the known family of ``ckpt``."""
    base, wrong = family_mismatches(adapters, names, ckpt)
    if wrong:
        i, family = wrong[0]
        raise MatchError(
            f"{names[i]} is a LoRA for the {family} family, but the base {ckpt.root} is of the {base} family: its "
            f"modules would land on unrelated weights; use the right base (or --ignore-family to merge anyway)"
        )
