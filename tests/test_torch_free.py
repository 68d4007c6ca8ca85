"""``loratool info`` (header only), ``--help`` and early errors never import torch
(:mod:`loratool.header_only`), and the header-only report is the one the real tensors give.

Every layout fixture, base checkpoint folders and single files are run through the CLI in one
fresh interpreter; after each command ``"torch" in sys.modules`` must still be False. A reader
or a family that needs torch while reading headers shows up here by name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file
from test_info import _sd_single_file

import loratool.ops.inspect as inspect_mod
from loratool.ops.inspect import inspect

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LAYOUT_FIXTURES = [
    "kohya_tiny_sd.safetensors", "lycoris_loha_tiny_sd.safetensors", "lycoris_lokr_tiny_sd.safetensors",
    "diffusers_tiny_sd", "diffusers_tiny_sd/pytorch_lora_weights.safetensors", "peft_tiny_llama",
    "loralib_tiny.pt",
]
BASES = ["base/tiny_sd", "base/tiny_sd/unet", "base/tiny_llama"]

RUNNER = r"""
import json, sys
from loratool.cli import main
out = []
for args in json.loads(sys.argv[1]):
    rc = main(args)
    out.append({"args": args, "rc": rc, "torch": "torch" in sys.modules})
    if out[-1]["torch"]:
        break
sys.stdout.write("\n@@" + json.dumps(out))
"""


def _run(commands: list[list[str]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)], capture_output=True, text=True,
                          timeout=120)
    assert "@@" in proc.stdout, proc.stderr[-2000:]
    return json.loads(proc.stdout.rsplit("@@", 1)[1])


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    import torch
    from test_family_merge import bfl_from_diffusers, tiny_flux

    tmp = tmp_path_factory.mktemp("bases")
    sdxl, _ = _sd_single_file(tmp, "sdxl")
    flux = tmp / "flux1.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in bfl_from_diffusers(tiny_flux().state_dict()).items()}, str(flux))
    return [str(sdxl), str(flux)]


def test_info_help_and_early_errors_never_import_torch(tmp_path, single_files):
    paths = [str(FIXTURES / f) for f in LAYOUT_FIXTURES + BASES] + single_files
    nope = str(tmp_path / "nope.safetensors")
    out = str(tmp_path / "out.safetensors")
    commands = [["info", p, "--json"] for p in paths] + [["info", p] for p in paths] + [
        ["info", str(FIXTURES)], ["info", str(FIXTURES), "--json"],  # a folder of adapters: one line each
        ["--help"], ["info", "--help"], ["resize", "--help"], ["merge", "--help"],
        ["info", nope], ["info", str(FIXTURES / "kohya_tiny_sd.safetensors"), "--no-such-flag"],
        ["resize", nope, "-r", "4", "-o", out], ["resize", paths[0], "-r", "4", "-o", out, "--threads", "0"],
        ["stack", nope, paths[0], "-o", out], ["extract", nope, paths[0], "-o", out],
        ["convert", nope, "--to", "kohya", "-o", out], ["merge", nope, paths[0], "-o", out],
    ]
    results = _run(commands)
    assert [r for r in results if r["torch"]] == []
    assert len(results) == len(commands)
    codes = [r["rc"] for r in results]
    ok = 2 * len(paths) + 6
    assert codes[:ok] == [0] * ok
    assert all(rc == 2 for rc in codes[ok:])


@pytest.mark.parametrize("name", LAYOUT_FIXTURES + BASES)
def test_header_only_report_is_the_full_read_report(name, monkeypatch):
    path = FIXTURES / name
    fast = inspect(path).to_json()
    monkeypatch.setattr(inspect_mod, "header_view", lambda src: None)  # force the real tensors
    monkeypatch.setattr("loratool.formats.source.header_view", lambda src: None)
    slow = inspect(path).to_json()
    assert fast.pop("header_only") is True
    slow.pop("header_only")
    assert fast == slow
