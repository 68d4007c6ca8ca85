"""Hugging Face Hub references: ``hf://owner/repo[@revision][/path/in/repo]``.

Resolved through ``huggingface_hub`` so its cache and ``HF_HUB_OFFLINE`` apply. A reference
naming a file downloads that file (and, for PEFT folders, its ``adapter_config.json``
sibling); a reference naming a repo or folder downloads that folder's snapshot.

Before asking the hub, one TCP connection to the endpoint (or the HTTPS proxy) is tried with a
short timeout: when it fails, only the local cache is read, so a machine without network answers
at once from the cache or with one line, instead of after huggingface_hub's retries (~30 s).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from loratool.errors import InputError

PREFIX = "hf://"
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
PROBE_TIMEOUT_S = 3.0


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


@functools.cache
def unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached (one short connection attempt), or None when it can."""
    # imported here: urllib.request pulls in http.client and ssl, a tenth of a fresh `info` on a local file
    import socket
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or ""
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(url.scheme)
    target = urllib.parse.urlsplit(proxy) if proxy else url
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname or host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{target.hostname}:{port}: {exc.strerror or exc.__class__.__name__}"
    return None


def resolve(ref: str | os.PathLike) -> Path:
    """A local path for ``ref``; hub references are downloaded (or taken from the cache)."""
    if not is_hub_ref(ref):
        return Path(ref)
    repo_id, revision, sub = parse_ref(str(ref))
    try:
        from huggingface_hub import constants, hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise InputError("huggingface_hub is not installed; cannot resolve hub references") from None
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)
    local = why is not None
    try:
        if sub.endswith(_FILE_SUFFIXES):
            return Path(hf_hub_download(repo_id, sub, revision=revision, local_files_only=local))
        patterns = [f"{sub}/*"] if sub else None
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=local))
        return root / sub if sub else root
    except LocalEntryNotFoundError:
        raise InputError(
            f"{ref}: not in the local cache and the hub cannot be asked ({why or 'connection failed'})"
        ) from None
    except HfHubHTTPError as exc:
        raise InputError(f"{ref}: hub request failed ({str(exc).splitlines()[0][:200]})") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{ref}: cannot resolve ({exc.__class__.__name__}: {str(exc)[:200]})") from None
