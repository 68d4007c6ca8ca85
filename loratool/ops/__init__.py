"""Operations on adapters and base models. They never print: they return results and report
progress through a ``progress(description, done, total)`` callback."""

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
