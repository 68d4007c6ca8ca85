"""The one exception family users see.

Anything raised as a ``LoratoolError`` is an expected, user-actionable failure: the CLI prints
its message on one line to stderr and exits with code 2. Any other exception is a bug (exit 1).
"""


class LoratoolError(Exception):
    """A failure the user can act on; the message must say what and where."""


class InputError(LoratoolError):
    """An input file or folder is missing, unreadable, corrupt or unsafe."""


class FormatError(LoratoolError):
    """The layout is unknown, ambiguous, or a key cannot be mapped."""


class MatchError(LoratoolError):
    """Adapter modules do not fit the base model (missing targets, shape mismatch)."""


class OutputError(LoratoolError):
    """The output cannot be written as asked (exists, equals an input, disk full)."""


class NonFiniteError(LoratoolError):
    """A tensor holds NaN or Inf."""


class UsageError(LoratoolError):
    """Arguments contradict each other or are out of range."""
