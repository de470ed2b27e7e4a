"""The optional native build: a wheel carries proxyd._native when a C compiler is present, and
the build still succeeds without one (proxyd then runs on its Python path); the switch that
forces the Python path at run time; and which path ``proxyd --version`` and ``/metrics`` report."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from needs import need_binary

from proxyd import engine, native
from proxyd.metrics import Metrics
from proxyd.policy import flat

REPO = Path(__file__).resolve().parent.parent


def _wheel(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    src = tmp_path / "src"
    shutil.copytree(REPO / "proxyd", src / "proxyd", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / f, src / f)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w")]
    if importlib.util.find_spec("setuptools") is not None and importlib.util.find_spec("wheel") is not None:
        pip.append("--no-build-isolation")  # offline
    proc = subprocess.run([*pip, "."], cwd=src, capture_output=True, text=True, check=False,
                          env={**os.environ, **env}, timeout=300)  # fmt: skip
    names: list[str] = []
    for whl in (tmp_path / "w").glob("proxyd-*.whl"):
        names += zipfile.ZipFile(whl).namelist()
    return proc, names


def test_wheel_without_a_compiler_still_builds_pure(tmp_path: Path) -> None:
    proc, names = _wheel(tmp_path, {"CC": "/nonexistent/cc"})
    assert proc.returncode == 0, proc.stderr
    assert "proxyd/engine.py" in names
    assert not [n for n in names if "_native" in n and n.endswith(".so")]


def test_wheel_with_a_compiler_carries_the_extension(tmp_path: Path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        need_binary("gcc")
    proc, names = _wheel(tmp_path, {})
    assert proc.returncode == 0, proc.stderr
    assert [n for n in names if n.startswith("proxyd/_native") and n.endswith(".so")], names


def _version(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "proxyd", "--version"], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True, timeout=60)  # fmt: skip
    return out.stdout.strip()


def test_version_says_which_path_runs() -> None:
    assert _version({"PROXYD_PURE": "1"}).endswith("(data path: python)")
    expected = "native" if engine.native_module() is not None else "python"
    assert _version({"PROXYD_PURE": ""}).endswith(f"(data path: {expected})")


def test_info_metric_names_the_path() -> None:
    text = Metrics().render().decode()
    assert f'data_path="{engine.IMPLEMENTATION}"' in text
    assert "proxyd_build_info{" in text


def test_pure_switch_selects_the_reference() -> None:
    if engine.pure_forced():
        assert engine.Engine is engine.PyEngine
        assert engine.IMPLEMENTATION == "python"
    elif engine.native_module() is not None:
        assert engine.Engine is engine.native_module().Engine
        assert engine.IMPLEMENTATION == "native"


def test_one_selector_for_every_twin() -> None:
    """proxyd.native decides; the names proxyd.engine kept for older imports are its objects."""
    assert engine.Engine is native.Engine
    assert engine.IMPLEMENTATION == native.IMPLEMENTATION
    assert engine.native_module is native.native_module
    assert engine.pure_forced is native.pure_forced


def test_a_missing_build_leaves_nothing_in_its_place(tmp_path: Path) -> None:
    """Without the extension, ``proxyd._native`` must not resolve, so the Python path takes over: a
    directory of that name (say, for the C sources) would be imported as a namespace package."""
    skip = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(REPO / "proxyd", tmp_path / "proxyd", ignore=skip)
    spec = importlib.machinery.PathFinder.find_spec("proxyd._native", [str(tmp_path / "proxyd")])
    assert spec is None, spec


def test_the_flat_policy_interface_is_versioned() -> None:
    """The compiled module reads the policy through one versioned interface and refuses another."""
    mod = native.native_module()
    if mod is None:  # pragma: no cover - CI always builds it
        if os.environ.get("PROXYD_REQUIRE_BINARIES", "") not in ("", "0"):
            pytest.fail("proxyd._native is not built (required: PROXYD_REQUIRE_BINARIES=1)")
        pytest.skip("proxyd._native is not built")
    with pytest.raises(ValueError, match="interface version 3, this build reads version 2"):
        mod.setup_policy(version=flat.VERSION + 1, Context=object, ALLOWED=object())
    with pytest.raises(ValueError, match="interface version 1, this build reads version 2"):
        mod.setup_policy(version=1, Context=object, ALLOWED=object())
