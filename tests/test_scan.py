"""``info FOLDER``: one header-level row per adapter of a LoRA library, the facts ``info`` gives per file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratool.cli import main
from loratool.io.safetensors_file import read_header
from loratool.ops.inspect import inspect
from loratool.ops.scan import ScanReport, adapter_paths, is_library_folder, scan

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def _library(tmp_path: Path) -> Path:
    lib = tmp_path / "loras"
    (lib / "sd" / "lycoris").mkdir(parents=True)
    (lib / ".cache").mkdir()
    shutil.copy(FIXTURES / "kohya_tiny_sd.safetensors", lib / "sd" / "a.safetensors")
    shutil.copy(FIXTURES / "lycoris_lokr_tiny_sd.safetensors", lib / "sd" / "lycoris" / "lokr.safetensors")
    shutil.copy(FIXTURES / "loralib_tiny.pt", lib / "loralib.pt")
    shutil.copy(FIXTURES / "loralib_tiny.pt.json", lib / "loralib.pt.json")
    shutil.copytree(FIXTURES / "peft_tiny_llama", lib / "llm" / "peft_tiny_llama")
    shutil.copy(FIXTURES / "kohya_tiny_sd.safetensors", lib / ".cache" / "hidden.safetensors")
    (lib / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    (lib / "notes.txt").write_text("not a weight file")
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}, str(lib / "base.safetensors"))
    return lib


NAMES = ["base.safetensors", "broken.safetensors", "loralib.pt", "llm/peft_tiny_llama", "sd/a.safetensors",
         "sd/lycoris/lokr.safetensors"]


@pytest.mark.parametrize("modules", [False, True], ids=["header", "modules"])
def test_rows_agree_with_info_per_file(tmp_path, modules):
    lib = _library(tmp_path)
    assert is_library_folder(lib) and not is_library_folder(FIXTURES / "peft_tiny_llama")
    assert not is_library_folder(FIXTURES / "base" / "tiny_sd") and not is_library_folder(FIXTURES / "base" /
                                                                                           "tiny_llama")
    assert [p.relative_to(lib).as_posix() for p in adapter_paths(lib)] == NAMES
    seen = []
    report = scan(lib, modules=modules, progress=lambda what, done, total: seen.append((done, total)))
    assert seen[-1] == (6, 6)
    by_name = {Path(e.path).relative_to(lib).as_posix(): e for e in report.entries}
    assert by_name["base.safetensors"].format == "checkpoint" and by_name["base.safetensors"].error is None
    broken = by_name["broken.safetensors"]
    assert broken.format is None and "broken.safetensors" in broken.error and "\n" not in broken.error
    for name in ("loralib.pt", "llm/peft_tiny_llama", "sd/a.safetensors", "sd/lycoris/lokr.safetensors"):
        entry, info = by_name[name], inspect(lib / name).to_json()
        assert entry.error is None, entry.error
        assert entry.header_only, name
        assert entry.size_bytes == info["size_bytes"] or name == "loralib.pt"  # info counts the sidecar too
        assert entry.format == info["format"] and entry.trigger_phrases == info["trigger_phrases"], name
        if modules or name != "loralib.pt":  # a loralib file says nothing about its model without its modules
            assert entry.family == info["family"], name
        if modules:
            assert (entry.modules, entry.kinds, entry.dialect) == (info["module_count"], info["kinds"],
                                                                   info["dialect"])
            assert entry.ranks == {"min": info["ranks"]["min"], "max": info["ranks"]["max"]}
            assert entry.alphas == info["alphas"]
    kohya = by_name["sd/a.safetensors"]
    header = read_header(lib / "sd" / "a.safetensors")
    assert kohya.tensors == len(header.tensors) and kohya.dtypes == {"float16": len(header.tensors)}
    assert kohya.hashes == {k: header.metadata[k] for k in ("sshs_model_hash", "sshs_legacy_hash")}
    assert kohya.base_model["ss_sd_model_name"] == header.metadata["ss_sd_model_name"]
    if not modules:
        assert (kohya.rank, kohya.alpha) == (header.metadata["ss_network_dim"], header.metadata["ss_network_alpha"])
        peft = by_name["llm/peft_tiny_llama"]
        config = json.loads((FIXTURES / "peft_tiny_llama" / "adapter_config.json").read_text())
        assert (peft.rank, peft.alpha) == (str(config["r"]), str(config["lora_alpha"]))
    data = report.to_json()
    assert data["file_count"] == 6 and data["error_count"] == 1 and data["formats"]["kohya"] == 1


def test_cli_table_json_and_errors_once(tmp_path, capsys):
    lib = _library(tmp_path)
    assert main(["info", str(lib), "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["command"] == "info" and data["format"] == "folder" and len(data["entries"]) == 6
    assert all("module_count" in e and "modules" not in e for e in data["entries"])
    assert err.replace("\n", "").count("broken.safetensors") == 1
    assert main(["info", str(lib)]) == 0
    out, _ = capsys.readouterr()
    assert "sd/lycoris/lokr.safetensors" in out and "tinycat" in out and "6 adapter(s), 1 unreadable" in out


def test_scan_imports_no_torch(tmp_path):
    lib = _library(tmp_path)
    code = ("import sys\nfrom loratool.ops.scan import scan\n"
            f"r = scan({str(lib)!r})\nassert len(r.entries) == 6\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-500:]


def test_a_folder_with_one_adapter_is_that_adapter(tmp_path):
    shutil.copy(FIXTURES / "kohya_tiny_sd.safetensors", tmp_path / "only.safetensors")
    assert not is_library_folder(tmp_path)
    assert not isinstance(inspect(tmp_path), ScanReport)


def test_worker_processes_give_the_same_rows(tmp_path):
    """A large folder is scanned by worker processes (spawned): the rows, their order and the errors equal the
    in-process scan's."""
    from loratool.ops.scan import PARALLEL_FROM, scan_workers

    lib = _library(tmp_path)
    one, two = scan(lib, workers=1).to_json(), scan(lib, workers=2).to_json()
    one.pop("seconds"), two.pop("seconds")
    assert one == two and one["file_count"] == 6
    assert scan_workers(PARALLEL_FROM - 1) == 1 and scan_workers(10, workers=3) == 3 and scan_workers(2, 8) == 2


def test_header_rows_name_the_dialect_info_names(tmp_path):
    """The dialect column comes from the keys (formats.detect_dialect), no reader run: it equals what ``info``
    reports after reading each file — a trainer dialect, a layout's fixed one (MLX), or none."""
    from test_arch_checkpoints import sd1_unet
    from test_dialects_sd import processor_lora

    from loratool.ops.convert import convert

    lib = tmp_path / "lib"
    lib.mkdir()
    save_file(processor_lora(sd1_unet(), seed=3), lib / "old_diffusers.safetensors")
    shutil.copy(FIXTURES / "kohya_tiny_sd.safetensors", lib / "kohya.safetensors")
    convert(FIXTURES / "peft_tiny_llama", "mlx", lib / "mlx_adapter")
    rows = {Path(e.path).name: e for e in scan(lib, workers=1).entries}
    assert {n: e.dialect for n, e in rows.items()} == {"old_diffusers.safetensors": "diffusers-old",
                                                       "kohya.safetensors": None, "mlx_adapter": "mlx-lm"}
    for name, entry in rows.items():
        assert entry.error is None and entry.dialect == inspect(lib / name).dialect, name
