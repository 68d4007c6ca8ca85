import sys
from pathlib import Path

# Test-only helpers (tiny_models, ...) are imported as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


import copy  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_unet64():
    from tiny_models import tiny_unet

    return tiny_unet().double()


@pytest.fixture
def unet64(_tiny_unet64):
    """A fresh float64 ``tiny_unet`` per test (lycoris / PEFT wrap its modules); built once per session."""
    return copy.deepcopy(_tiny_unet64)
