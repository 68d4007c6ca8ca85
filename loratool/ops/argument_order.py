"""Recognising arguments given in the wrong order: a LoRA where a base model goes (``merge``), or
the base model before the fine-tune (``extract``), named before any slow work starts.

What tells a LoRA from a model is its tensor names: every LoRA-like layout (LoRA, LoHa, LoKr, OFT,
DoRA, kohya alphas) marks its keys, no model does. A file is called a LoRA when at least half its
keys are marked and a model when none is (a model with one oddly named parameter stays a model).
Headers only, torch-free.

What tells a fine-tune from its base:

* metadata: a diffusers component's ``config.json`` records the model it was loaded from in
  ``_name_or_path`` (``ModelMixin.save_pretrained`` keeps it: ``_automatically_saved_args`` in
  diffusers ``models/modeling_utils.py``), as transformers < 5 did in its ``config.json``
  (5.x drops it in ``PretrainedConfig.to_diff_dict``); sd-scripts names the base in
  ``ss_sd_model_name``. The side that names the other is the fine-tune.
* names: one side called like a base (``base``, ``original``, ``pretrained``) and the other like a
  fine-tune (``finetune``, ``ft``, ``tuned``, ``merged``, ``trained``, ``dreambooth``). Weaker, so
  a warning, not an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from loratool.errors import LoratoolError, UsageError

# Key fragments no base model has and every LoRA-like layout does (LoRA, LoHa, LoKr, OFT, DoRA, alphas).
LORA_MARKERS = re.compile(r"(lora|hada_|lokr_|oft_|dora_scale|magnitude_vector|\.alpha$|\.diff(_b)?$)", re.IGNORECASE)
_BASE_WORDS = re.compile(r"(^|[^a-z])(base|original|orig|pretrained|vanilla)([^a-z]|$)")
_TUNED_WORDS = re.compile(r"(^|[^a-z])(finetuned?|fine_tuned?|ft|tuned|merged|trained|dreambooth|db)([^a-z]|$)")


def looks_like_base(keys: list[str]) -> bool:
    """True for a weights file that is no adapter: tensors, none of them named like a LoRA part."""
    return bool(keys) and not any(LORA_MARKERS.search(k) for k in keys)


def _kind_of_keys(keys: list[str]) -> str | None:
    """``"lora"`` when most keys are LoRA parts, ``"model"`` when none is, None in between."""
    if not keys:
        return None
    marked = sum(1 for k in keys if LORA_MARKERS.search(k))
    return "model" if marked == 0 else "lora" if 2 * marked >= len(keys) else None


def _local(ref: str | os.PathLike) -> Path | None:
    text = str(ref)
    if text.startswith("hf://"):
        return None
    path = Path(text)
    return path if path.exists() else None


def _header_keys(path: Path) -> list[str]:
    from loratool.io.safetensors_file import read_header

    try:
        return list(read_header(path).tensors)
    except LoratoolError:
        return []  # the reader that opens it for real names what is wrong with it


def local_kind(ref: str | os.PathLike) -> str | None:
    """``"lora"``, ``"model"`` or None (not local, or cannot tell) from names and headers only."""
    path = _local(ref)
    if path is None:
        return None
    if path.is_dir():
        if any((path / n).is_file() for n in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")):
            return "lora"
        if any((path / n).is_file() for n in ("model_index.json", "modular_model_index.json")) \
                or any(path.glob("*.safetensors.index.json")):
            return "model"
        files = sorted(path.glob("*.safetensors"))
        return _kind_of_keys(_header_keys(files[0])) if (path / "config.json").is_file() and files else None
    return _kind_of_keys(_header_keys(path)) if path.suffix.lower() == ".safetensors" else None


def check_merge_order(base: str | os.PathLike, loras: list) -> None:
    """A :class:`UsageError` when the base is a LoRA or a LoRA argument is a model."""
    named = [lora for lora in loras if isinstance(lora, (str, os.PathLike))]
    if local_kind(base) == "lora":
        swap = next((lora for lora in named if local_kind(lora) == "model"), None)
        hint = (f"did you mean `loratool merge {swap} {base}`?" if swap is not None
                else "the base model comes first: `loratool merge BASE LORA... -o OUT`")
        raise UsageError(f"{base}: this is a LoRA, not a base model; {hint}")
    for lora in named:
        if local_kind(lora) == "model":
            raise UsageError(f"{lora}: this is a model, not a LoRA; merge takes the base model first, then LoRAs "
                             "(`loratool merge BASE LORA... -o OUT`)")


def _origin(ref: str | os.PathLike) -> str | None:
    """The model this one says it came from (config ``_name_or_path``, ``ss_sd_model_name``)."""
    path = _local(ref)
    if path is None:
        return None
    folder = path if path.is_dir() else path.parent
    configs = [folder / "config.json", *sorted(folder.glob("*/config.json"))]
    for cfg in configs:
        try:
            value = json.loads(cfg.read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value.strip():
            return value.strip()
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from loratool.io.safetensors_file import read_header

        try:
            return read_header(path).metadata.get("ss_sd_model_name") or None
        except LoratoolError:
            return None
    return None


# Folder names every model has (diffusers components, the usual file stem): naming one says nothing.
_GENERIC = frozenset({"", "unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "model",
                      "diffusion_pytorch_model"})


def _tail(text: str) -> str:
    return Path(text.rstrip("/\\")).name.removesuffix(".safetensors").lower()


def _names(origin: str, ref: str | os.PathLike) -> bool:
    """Whether ``origin`` (a path or hub id a config records) names the model at ``ref``: the same
    folder when ``origin`` exists here, else the same distinctive last name (a hub repo downloaded
    into a folder of its name)."""
    path = Path(str(ref))
    if not origin:
        return False
    recorded = Path(origin)
    if recorded.exists():
        with contextlib.suppress(OSError):
            return recorded.resolve() in {path.resolve(), path.resolve().parent}
        return False
    name = _tail(origin)
    return name not in _GENERIC and name in {_tail(str(ref)), _tail(str(path.resolve().parent))}


def _word_side(ref: str | os.PathLike) -> str | None:
    name = Path(str(ref).rstrip("/")).name.lower()
    base, tuned = bool(_BASE_WORDS.search(name)), bool(_TUNED_WORDS.search(name))
    return "base" if base and not tuned else "tuned" if tuned and not base else None


def check_extract_order(finetuned: str | os.PathLike, base: str | os.PathLike) -> list[str]:
    """A :class:`UsageError` when the inputs are LoRAs or metadata says they are swapped; the
    warnings to show when only their names suggest it."""
    for ref, what in ((finetuned, "FINETUNED"), (base, "BASE")):
        if local_kind(ref) == "lora":
            raise UsageError(f"{ref}: this is a LoRA; extract takes two full models "
                             f"(`loratool extract FINETUNED BASE -o OUT`), {what} here")
    hint = f"did you mean `loratool extract {base} {finetuned}`?"
    origin = _origin(base)
    if origin is not None and _names(origin, finetuned) and not _names(_origin(finetuned) or "", base):
        raise UsageError(f"{base} says it was made from {finetuned} ({origin!r}): the fine-tune and its base "
                         f"look swapped; {hint}")
    if _word_side(finetuned) == "base" and _word_side(base) == "tuned":
        return [f"{finetuned} is named like a base model and {base} like a fine-tune; if they are swapped, "
                f"the LoRA is the negative of the fine-tune ({hint})"]
    return []
