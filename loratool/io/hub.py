"""Hugging Face Hub references: ``hf://owner/repo[@revision][/path/in/repo]``.

Resolved through ``huggingface_hub`` so its cache and ``HF_HUB_OFFLINE`` apply. A reference
naming a file downloads that file (and, for PEFT folders, its ``adapter_config.json``
sibling); a reference naming a repo or folder downloads that folder's snapshot.
"""

from __future__ import annotations

import os
from pathlib import Path

from loratool.errors import InputError

PREFIX = "hf://"
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")


def is_hub_ref(ref: str | os.PathLike) -> bool:
    return str(ref).startswith(PREFIX)


def parse_ref(ref: str) -> tuple[str, str | None, str]:
    """``hf://owner/repo@rev/sub/file`` -> (``owner/repo``, ``rev``, ``sub/file``)."""
    body = ref[len(PREFIX):].strip("/")
    parts = body.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise InputError(f"{ref}: a hub reference looks like hf://owner/repo[@revision]/path")
    repo, revision = parts[1], None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return f"{parts[0]}/{repo}", revision, "/".join(parts[2:])


def resolve(ref: str | os.PathLike) -> Path:
    """A local path for ``ref``; hub references are downloaded (or taken from the cache)."""
    if not is_hub_ref(ref):
        return Path(ref)
    repo_id, revision, sub = parse_ref(str(ref))
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise InputError("huggingface_hub is not installed; cannot resolve hub references") from None
    try:
        if sub.endswith(_FILE_SUFFIXES):
            return Path(hf_hub_download(repo_id, sub, revision=revision))
        patterns = [f"{sub}/*"] if sub else None
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        return root / sub if sub else root
    except LocalEntryNotFoundError:
        raise InputError(f"{ref}: not in the local cache and the hub cannot be reached (HF_HUB_OFFLINE?)") from None
    except HfHubHTTPError as exc:
        raise InputError(f"{ref}: hub request failed ({str(exc).splitlines()[0][:200]})") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{ref}: cannot resolve ({exc.__class__.__name__}: {str(exc)[:200]})") from None
