"""``hf://`` references resolve through huggingface_hub's own cache, offline.

The cache is laid out the way huggingface_hub writes it (``models--owner--repo/refs/main`` and
``snapshots/<commit>/...``); with ``HF_HUB_OFFLINE=1`` the library itself must find the files
there, so these tests exercise the real resolution path without a network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path):
    repo = tmp_path / "cache" / "models--someone--tiny-loras"
    snap = repo / "snapshots" / COMMIT
    (snap / "llama").mkdir(parents=True)
    shutil.copy(FIXTURES / "kohya_tiny_sd.safetensors", snap / "style.safetensors")
    for f in (FIXTURES / "peft_tiny_llama").iterdir():
        shutil.copy(f, snap / "llama" / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "cache"


def _run(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "loratool", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_hub_file_and_folder_resolve_offline(hub_cache):
    r = _run(hub_cache, "info", "hf://someone/tiny-loras/style.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "kohya" and len(info["modules"]) == 91
    assert str(hub_cache) in info["path"] or any(str(hub_cache) in f for f in info["files"])

    r = _run(hub_cache, "info", "hf://someone/tiny-loras/llama", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "peft" and len(info["modules"]) == 8


def test_hub_miss_is_one_line_exit_2(hub_cache):
    r = _run(hub_cache, "info", "hf://someone/not-cached/style.safetensors")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "hf://someone/not-cached/style.safetensors" in r.stderr
