"""Local folder paths out of what a written file says about itself.

Metadata travels with a shared file, and an absolute path in it (``/home/jane/loras/…``,
``C:\\Users\\jane\\…``, ``~/models/…``) tells strangers a user name and a folder layout. Trainers
already store names only where they can (sd-scripts writes ``ss_sd_model_name`` and image folders
by ``os.path.basename``); PEFT's ``save_pretrained`` does not (``base_model_name_or_path`` is the
path the base was loaded from). Every adapter loratool writes goes through :func:`local_names`:
each absolute path inside a metadata or config string becomes its last part. URLs and hub ids
(``owner/repo``) are not absolute paths and stay.
"""

from __future__ import annotations

import re
from typing import Any

# An absolute POSIX path (two parts at least, not inside a URL or a word), a home path, or a
# Windows drive path (backslashes single or JSON-escaped).
_POSIX = re.compile(r"(?<![\w.:/~\\])(?:~)?/(?:[^\s/\"'|;,<>]+/)+[^\s/\"'|;,<>]*")
_WINDOWS = re.compile(r"(?<![\w])[A-Za-z]:(?:\\{1,2}[^\\\s\"'|;,<>]+)+")


def _name(match: re.Match) -> str:
    parts = [p for p in re.split(r"[/\\]+", match.group(0)) if p]
    return parts[-1] if parts else match.group(0)


def strip_local_paths(text: str) -> str:
    """``text`` with every absolute local path replaced by its last part."""
    return _WINDOWS.sub(_name, _POSIX.sub(_name, text))


def local_names(value: Any) -> Any:
    """A copy of ``value`` (strings, lists and dicts of them, nested) with local paths stripped."""
    if isinstance(value, str):
        return strip_local_paths(value)
    if isinstance(value, dict):
        return {k: local_names(v) for k, v in value.items()}
    if isinstance(value, list):
        return [local_names(v) for v in value]
    return value
