import sys
from pathlib import Path

# Test-only helpers (tiny_models, ...) are imported as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
