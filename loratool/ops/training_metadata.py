"""What a trainer's header metadata says about the training run: trigger phrases and caption tags.

Keys are the ones sd-scripts writes (kohya-ss/sd-scripts ``train_network.py``, ``library/
sai_model_spec.py``, ``library/config_util.py``):

* ``modelspec.trigger_phrase`` -- the phrase the author declares (``--metadata_trigger_phrase``).
* ``ss_datasets`` -- a JSON list of datasets, written when a dataset config is used; each has
  ``subsets`` (DreamBooth subsets carry ``class_tokens`` and ``is_reg``) and ``tag_frequency``
  ({image folder: {tag: count}}).
* ``ss_tag_frequency`` -- {image folder: {tag: count}}, the union of the datasets' folders (each
  folder counted once).
* Image folders named the DreamBooth way, ``<repeats>_<class tokens>`` (``10_sks dog``):
  sd-scripts takes the class tokens from the name when no config gives them. ``ss_dataset_dirs``
  lists the training folders, ``ss_reg_dataset_dirs`` the regularisation ones.

Torch-free: ``info`` on a header must not import torch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

TOP_TAGS = 20
_DREAMBOOTH_DIR = re.compile(r"^(\d+)_(.+)$")


def _json(metadata: dict[str, str], key: str) -> Any:
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, TypeError, ValueError):
        return None


def _datasets(metadata: dict[str, str]) -> list[dict[str, Any]]:
    value = _json(metadata, "ss_datasets")
    return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []


def _folders(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{image folder: {tag: count}} from ``ss_tag_frequency`` and every dataset's ``tag_frequency``."""
    out: dict[str, dict[str, Any]] = {}
    freq = _json(metadata, "ss_tag_frequency")
    if isinstance(freq, dict):
        out.update({str(k): v for k, v in freq.items() if isinstance(v, dict)})
    for dataset in _datasets(metadata):
        per_dir = dataset.get("tag_frequency")
        if isinstance(per_dir, dict):
            for folder, tags in per_dir.items():  # a folder in several datasets counts once, as sd-scripts does
                if isinstance(tags, dict):
                    out.setdefault(str(folder), tags)
    return out


def trigger_phrases(metadata: dict[str, str]) -> list[str]:
    """The phrases that call the LoRA up: the declared one, then DreamBooth class tokens."""
    found: list[str] = []

    def add(text: Any) -> None:
        if isinstance(text, str) and text.strip() and text.strip() not in found:
            found.append(text.strip())

    add(metadata.get("modelspec.trigger_phrase"))
    datasets = _datasets(metadata)
    for dataset in datasets:
        for subset in dataset.get("subsets") or ():
            if isinstance(subset, dict) and not subset.get("is_reg"):
                add(subset.get("class_tokens"))
    if datasets:
        return found  # the subsets said which folders train and with which tokens
    for folder in _training_folders(metadata):
        m = _DREAMBOOTH_DIR.match(folder.strip())
        if m:
            add(m.group(2))
    return found


def _training_folders(metadata: dict[str, str]) -> list[str]:
    """Image folders of training images, regularisation folders left out: ``ss_dataset_dirs`` holds
    only those; ``ss_tag_frequency`` holds both, less the ones ``ss_reg_dataset_dirs`` names."""
    dirs = _json(metadata, "ss_dataset_dirs")
    if isinstance(dirs, dict) and dirs:
        return [str(k) for k in dirs]
    reg = _json(metadata, "ss_reg_dataset_dirs")
    reg_names = set(reg) if isinstance(reg, dict) else set()
    return [k for k in _folders(metadata) if k not in reg_names]


def top_tags(metadata: dict[str, str], warnings: list[str], limit: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent caption tags over every image folder (``ss_tag_frequency`` and ``ss_datasets``)."""
    if metadata.get("ss_tag_frequency") and not isinstance(_json(metadata, "ss_tag_frequency"), dict):
        warnings.append("ss_tag_frequency is not the JSON sd-scripts writes; its tags are not shown")
    total: Counter[str] = Counter()
    for tags in _folders(metadata).values():
        for tag, count in tags.items():
            try:
                total[str(tag).strip()] += int(count)
            except (TypeError, ValueError):
                continue
    return total.most_common(limit)
