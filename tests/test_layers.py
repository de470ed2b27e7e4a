"""The layer contracts of pyproject.toml hold (docs/architecture.md), and they bite.

import-linter (grimp) reads every import of the package, TYPE_CHECKING and function-level ones
included, and follows indirect chains: the data side cannot reach the control side even through
a third module. A module nobody classified would slip past every contract, so each module of
proxyd must be on one side or in the shared layers named here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Below both sides, importable by either: the parser API (docs/parser-api.md), the policy
#: package (the live view the data side is handed is the store's), the parser registry, the
#: YAML reader, and the demo servers.
SHARED = {
    "proxyd",
    "proxyd.parser",
    "proxyd.ops",
    "proxyd.errors",
    "proxyd.testing",
    "proxyd.policy",
    "proxyd.registry",
    "proxyd.yamlsrc",
    "proxyd.demo",
}


def _contracts() -> dict[str, dict[str, Any]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["id"]: c for c in data["tool"]["importlinter"]["contracts"]}


def _lint(package_root: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    cmd = [str(tool), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")]
    return subprocess.run(cmd, cwd=package_root, env=env, capture_output=True, text=True, timeout=300)


def test_contracts_kept() -> None:
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(_contracts())} kept, 0 broken" in res.stdout


def test_every_module_is_classified() -> None:
    contracts = _contracts()
    data = set(contracts["data-side"]["source_modules"])
    control = set(contracts["data-side"]["forbidden_modules"])
    assert not data & control
    unclassified = []
    for path in sorted((ROOT / "proxyd").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if name in SHARED or prefixes & (data | control) or prefixes & (SHARED - {"proxyd"}):
            continue
        unclassified.append(name)
    assert not unclassified, f"classify these in pyproject.toml [tool.importlinter]: {unclassified}"


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # The circle issue 21 removed: the relay typed its listener by the daemon's module.
        ("relay.py", "from proxyd.server import Daemon", "the data side never imports the control side"),
        ("listener.py", "from proxyd.metrics import Metrics", "the data side never imports the control side"),
        ("admin.py", "from proxyd.server import Daemon", "the admin API talks to the daemon through its"),
        ("parsers/redis/parser.py", "from proxyd.context import Context", "a parser imports only the"),
    ],
)
def test_a_violation_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """A copy of the package with one forbidden import, under TYPE_CHECKING (where the old one
    hid): lint-imports fails and names the contract."""
    copy = tmp_path / "proxyd"
    shutil.copytree(ROOT / "proxyd", copy, ignore=shutil.ignore_patterns("*.so", "*.c", "*.h", "__pycache__"))
    target = copy / module
    text = target.read_text()
    marker = "from __future__ import annotations\n"
    assert marker in text
    target.write_text(text.replace(marker, f"{marker}from typing import TYPE_CHECKING\n"
                                           f"if TYPE_CHECKING:\n    {line}\n", 1))  # fmt: skip
    res = _lint(tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    broken = res.stdout.split("Broken contracts", 1)[1]
    assert contract in broken
