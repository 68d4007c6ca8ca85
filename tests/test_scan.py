"""``info FOLDER``: one header-only summary per adapter, the same facts ``info`` gives per file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from loratool.cli import main
from loratool.io.safetensors_file import read_header
from loratool.ops.inspect import inspect
from loratool.ops.scan import SUMMARY_KEYS, ScanReport, adapter_paths, is_library_folder, scan

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _library(tmp_path: Path) -> Path:
    lib = tmp_path / "loras"
    (lib / "sd" / "lycoris").mkdir(parents=True)
    (lib / ".cache").mkdir()
    shutil.copy(FIXTURES / "kohya_tiny_sd.safetensors", lib / "sd" / "a.safetensors")
    shutil.copy(FIXTURES / "lycoris_loha_tiny_sd.safetensors", lib / "sd" / "lycoris" / "loha.safetensors")
    shutil.copy(FIXTURES / "lycoris_lokr_tiny_sd.safetensors", lib / "sd" / "lycoris" / "lokr.safetensors")
    shutil.copy(FIXTURES / "loralib_tiny.pt", lib / "loralib.pt")
    shutil.copy(FIXTURES / "loralib_tiny.pt.json", lib / "loralib.pt.json")
    shutil.copytree(FIXTURES / "peft_tiny_llama", lib / "llm" / "peft_tiny_llama")
    shutil.copy(FIXTURES / "kohya_tiny_sd.safetensors", lib / ".cache" / "hidden.safetensors")
    (lib / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    (lib / "notes.txt").write_text("not a weight file")
    import torch

    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}, str(lib / "base.safetensors"))
    return lib


def test_scan_matches_info_per_file(tmp_path):
    lib = _library(tmp_path)
    assert is_library_folder(lib) and not is_library_folder(FIXTURES / "peft_tiny_llama")
    paths = adapter_paths(lib)
    assert [p.relative_to(lib).as_posix() for p in paths] == [
        "base.safetensors", "broken.safetensors", "loralib.pt", "llm/peft_tiny_llama", "sd/a.safetensors",
        "sd/lycoris/loha.safetensors", "sd/lycoris/lokr.safetensors"]
    quick, deep = scan(lib), scan(lib, modules=True)
    for report in (quick, deep):
        by_name = {Path(e.path).relative_to(lib).as_posix(): e for e in report.entries}
        assert by_name["base.safetensors"].format == "checkpoint" and by_name["base.safetensors"].error is None
        broken = by_name["broken.safetensors"]
        assert broken.format is None and "broken.safetensors" in broken.error and "\n" not in broken.error
        for name in ("loralib.pt", "llm/peft_tiny_llama", "sd/a.safetensors", "sd/lycoris/loha.safetensors",
                     "sd/lycoris/lokr.safetensors"):
            entry, info = by_name[name], inspect(lib / name).to_json()
            assert entry.error is None and entry.header_only
            assert (entry.format, entry.family) == (info["format"], info["family"]), name
            assert entry.size_bytes == info["size_bytes"] or name == "loralib.pt"  # info counts the sidecar too
            if report is deep:
                assert (entry.modules, entry.kinds, entry.ranks) == (
                    info["module_count"], info["kinds"], {"min": info["ranks"]["min"], "max": info["ranks"]["max"]})
            else:
                assert entry.modules is None
        data = report.to_json()
        assert data["file_count"] == 7 and data["error_count"] == 1 and data["formats"]["lycoris"] == 2
    kohya = next(e for e in quick.entries if e.path.endswith("sd/a.safetensors"))
    header = read_header(lib / "sd" / "a.safetensors")
    assert kohya.tensors == len(header.tensors) and kohya.dtypes == {"float16": len(header.tensors)}
    assert kohya.training == {k: v for k, v in header.metadata.items() if k in SUMMARY_KEYS}


def test_cli_folder_json_and_table(tmp_path, capsys):
    lib = _library(tmp_path)
    assert main(["info", str(lib), "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["format"] == "folder" and len(data["entries"]) == 7
    assert err.replace("\n", "").count("broken.safetensors") == 1  # the unreadable file is named once, on stderr
    assert main(["info", str(lib)]) == 0
    out, _ = capsys.readouterr()
    assert "sd/lycoris/lokr.safetensors" in out and "lycoris" in out


def test_a_folder_with_one_adapter_is_that_adapter(tmp_path):
    shutil.copy(FIXTURES / "kohya_tiny_sd.safetensors", tmp_path / "only.safetensors")
    assert not is_library_folder(tmp_path)
    assert not isinstance(inspect(tmp_path), ScanReport)
