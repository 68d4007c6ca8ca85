"""The grouped lines ``check`` prints and ``merge`` warns with for modules a merge skips: one line per group,
its module count, cause, what the modules share, why, and the fix. Nothing here imports torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

EXAMPLES = 2  # module names shown per line (--json lists every one)


def group_line(group: dict[str, Any]) -> str:
    n = group["module_count"]
    shown = group["examples"][:EXAMPLES]
    more = ", …" if n > len(shown) else ""
    return (f"{n} module{'s' if n != 1 else ''}, {group['title']} ({group['group']}; e.g. {', '.join(shown)}{more}): "
            f"{group['reason']}. Fix: {group['fix']}.")


def print_groups(groups: Sequence[dict[str, Any]], out: Callable[[str], None]) -> None:
    for group in groups:
        out(group_line(group))
