"""The code base stays ruff- and mypy-clean (versions pinned in the test extras)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from needs import need_binary

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    need_binary(name)
    found = shutil.which(name)
    assert found is not None
    return found


def test_ruff_clean() -> None:
    res = subprocess.run([_tool("ruff"), "check", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_clean() -> None:
    cmd = [sys.executable, "-m", "mypy"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
