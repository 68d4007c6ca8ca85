"""Defaults of ``extract`` that the command line declares before torch is imported."""

DEFAULT_RANK = 16
