"""Every command and code block in README.md and docs/ runs, on a copy of fixtures/.

Fenced blocks declare what they are: ``sh`` (command lines: each ``loratool ...`` line runs
in-process through ``loratool.cli.main``), ``python`` (the cells of one page run in order in one
namespace, notebook-style; an ``output`` block after a cell is what its last expression must
show), ``json`` (must parse), ``text`` / ``output`` (read, not run). The install lines of the
README's two commands are not run (no package installs, no network): their text is checked, and
the demo they end with runs for real.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loratool.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
KINDS = {"sh", "python", "json", "text", "output"}
_FENCE = re.compile(r"^```(\S*)\n(.*?)^```\s*$", re.M | re.S)


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(page.read_text(encoding="utf-8"))]


def command_lines(body: str) -> list[str]:
    """Lines of an ``sh`` block with ``\\`` continuations joined."""
    return [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def workspace(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_block_declares_its_kind(page):
    for kind, body in blocks(page):
        assert kind in KINDS, f"{page.name}: a ```{kind or '(none)'} block: use one of {sorted(KINDS)}\n{body[:200]}"
        if kind == "json":
            json.loads(body)


def _install_lines(page: Path) -> list[str]:
    return [line for kind, body in blocks(page) if kind == "sh"
            for line in command_lines(body) if "pip install" in line]


def test_readme_two_commands_text_and_ci():
    """The README's two commands as they must stay: CI runs the second verbatim."""
    installs = _install_lines(ROOT / "README.md")
    assert installs == [
        "pip install torch==2.13.0 && pip install -e . && bash fixtures/demo.sh",
        "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == installs[1]
    readme = (ROOT / "README.md").read_text()
    assert "python -m venv .venv" in readme and "activate" in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme


RUNNABLE = [p for p in PAGES if any(k in ("sh", "python") for k, _ in blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_commands_and_cells_run(page, tmp_path, monkeypatch, capsys):
    found = blocks(page)
    monkeypatch.chdir(workspace(tmp_path))
    namespace: dict = {"__name__": "__doc_page__"}
    for i, (kind, body) in enumerate(found):
        if kind == "sh":
            for line in command_lines(body):
                if "pip install" in line:
                    continue  # the README's two commands: text checked, the demo run below
                args = shlex.split(line)
                assert args[0] == "loratool", f"{page.name}: a command that is not loratool: {line}"
                code = main(args[1:])
                captured = capsys.readouterr()
                assert code == 0, f"{page.name}: `{line}` exited {code}: {captured.err}"
        elif kind == "python":
            shown = _run_cell(body, namespace, f"{page.name} block {i}")
            if i + 1 < len(found) and found[i + 1][0] == "output":
                assert shown == found[i + 1][1].strip(), f"{page.name} block {i}: shows {shown!r}"


def _run_cell(body: str, namespace: dict, label: str) -> str | None:
    """Run one cell; the repr of its last expression, as a notebook shows it."""
    tree = ast.parse(body, label)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, label, "exec"), namespace)
    if last is None:
        return None
    value = eval(compile(ast.Expression(last.value), label, "eval"), namespace)
    return None if value is None else repr(value)


def test_demo_runs_and_says_where_outputs_are(tmp_path):
    """``bash fixtures/demo.sh`` as the README's first command ends, with ``loratool`` on PATH."""
    root = workspace(tmp_path)
    shutil.rmtree(root / "out")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "loratool").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m loratool \"$@\"\n")
    (shim / "loratool").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "COLUMNS": "100"}
    r = subprocess.run(["bash", str(root / "fixtures" / "demo.sh")], capture_output=True, text=True, env=env,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = re.findall(r"^== (.+)$", r.stdout, re.M)
    commands = re.findall(r"^\$ (loratool .+)$", r.stdout, re.M)
    assert len(commands) == 8 and len(steps) == 9, r.stdout[:2000]
    written = sorted(p.name for p in (root / "out").iterdir())
    assert steps[-1] == f"Outputs, in {root}/out:"
    assert r.stdout.rstrip().splitlines()[-len(written):] == written
    for step, line in zip(steps, commands):  # a step that writes says where
        out = re.search(r"-o (\S+)", line)
        if out:
            assert out.group(1).rstrip("/") in step, (step, line)
