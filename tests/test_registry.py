"""The parser registry: built-ins, entry points, duplicate and bad registrations; and a third-party
parser (examples/c3po) pip-installed into this interpreter, found by name, and proxied through."""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proxyutil import addr, daemon, tcp_server

from proxyd import registry as registry_mod
from proxyd.parser import ConnectionContext, Parser, ParserFactory
from proxyd.parsers.r2d2 import R2d2Factory
from proxyd.parsers.testparsers import PasserFactory
from proxyd.registry import BUILTINS, ENTRY_POINT_GROUP, Registry, RegistryError, UnknownParserError

ROOT = Path(__file__).resolve().parents[1]
C3PO = ROOT / "examples" / "c3po"

# --- built-ins and registration rules ----------------------------------------------------------


def test_builtins_are_registered_by_name() -> None:
    reg = Registry.load(entry_point_plugins=False)
    for name in BUILTINS:
        assert name in reg
        assert reg.get(name).name == name
    assert dict(reg.items())["r2d2"].origin == "built-in"
    assert isinstance(reg.get("r2d2"), R2d2Factory)
    assert [name for name, _ in reg.items()] == sorted(BUILTINS)


def test_unknown_name() -> None:
    with pytest.raises(UnknownParserError):
        Registry.load(entry_point_plugins=False).get("c3po-but-not-installed")
    assert "nope" not in Registry()


def test_a_name_registered_twice_is_an_error() -> None:
    reg = Registry()
    reg.register("p", PasserFactory(), "first")
    with pytest.raises(RegistryError, match="registered twice: first and second"):
        reg.register("p", PasserFactory(), "second")


def test_a_factory_registered_under_another_name_is_an_error() -> None:
    with pytest.raises(RegistryError, match="calls itself 'r2d2'"):
        Registry().register("droid", R2d2Factory(), "test")


class _FakeEntryPoints:
    """Stands in for importlib.metadata.entry_points(group=...)."""

    def __init__(self, *eps: importlib.metadata.EntryPoint) -> None:
        self.eps = eps

    def __call__(self, *, group: str) -> tuple[importlib.metadata.EntryPoint, ...]:
        assert group == ENTRY_POINT_GROUP
        return self.eps


def ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


class AnotherFactory(ParserFactory):
    """A well-formed third-party factory, for the entry-point tests below."""

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        raise NotImplementedError


ANOTHER_INSTANCE = AnotherFactory()
NOT_A_FACTORY = object()


def test_entry_point_naming_a_class_or_an_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        registry_mod,
        "entry_points",
        _FakeEntryPoints(
            ep("another", f"{__name__}:AnotherFactory"), ep("inst", f"{__name__}:ANOTHER_INSTANCE")
        ),
    )
    reg = Registry.load()
    assert isinstance(reg.get("another"), AnotherFactory)
    assert reg.get("inst") is ANOTHER_INSTANCE
    assert dict(reg.items())["another"].origin == f"entry point another = {__name__}:AnotherFactory"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (f"{__name__}:NOT_A_FACTORY", "is not a proxyd.parser.ParserFactory"),
        ("builtins:dict", "is not a proxyd.parser.ParserFactory"),
        (f"{__name__}:R2d2Factory", "calls itself 'r2d2'"),  # a factory with another name
        ("no_such_module_anywhere:Factory", "cannot load entry point bad"),
        (f"{__name__}:Missing", "cannot load entry point bad"),
    ],
)
def test_bad_entry_points_are_errors(monkeypatch: pytest.MonkeyPatch, value: str, words: str) -> None:
    monkeypatch.setattr(registry_mod, "entry_points", _FakeEntryPoints(ep("bad", value)))
    with pytest.raises(RegistryError, match=words):
        Registry.load()


def test_entry_point_clashing_with_a_builtin_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        registry_mod, "entry_points", _FakeEntryPoints(ep("r2d2", "proxyd.parsers.r2d2:R2d2Factory"))
    )
    with pytest.raises(RegistryError, match="'r2d2' registered twice: built-in and entry point r2d2"):
        Registry.load()


# --- a third-party parser, installed ---------------------------------------------------------


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def c3po_installed() -> Iterator[None]:
    """pip-install examples/c3po into this interpreter; uninstall it afterwards."""
    was_installed = _c3po_dist() is not None
    # Build with the interpreter's own setuptools when it is 77 or newer (wheels built in, SPDX
    # license strings); otherwise let pip fetch a build backend into an isolated environment.
    local = ["--no-build-isolation"] if _can_build_wheels_locally() else []
    res = _pip("install", "--no-deps", *local, str(C3PO))
    assert res.returncode == 0, res.stderr
    importlib.invalidate_caches()
    try:
        yield
    finally:
        # setuptools builds in the source tree: leave the example as checked out.
        shutil.rmtree(C3PO / "build", ignore_errors=True)
        for info in (C3PO / "src").glob("*.egg-info"):
            shutil.rmtree(info, ignore_errors=True)
        if not was_installed:
            _pip("uninstall", "-y", "proxyd-c3po")
            importlib.invalidate_caches()
            sys.modules.pop("proxyd_c3po", None)


def _can_build_wheels_locally() -> bool:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(p) for p in version.split(".")[:2])
    return (major, minor) >= (77, 0)


def _c3po_dist() -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution("proxyd-c3po")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_installed_package_is_seen_by_importlib_metadata(c3po_installed: None) -> None:
    dist = _c3po_dist()
    assert dist is not None
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    assert [e.value for e in eps if e.name == "c3po"] == ["proxyd_c3po:C3poFactory"]


def test_registry_loads_it_by_name(c3po_installed: None) -> None:
    reg = Registry.load()
    assert "c3po" in reg
    factory = reg.get("c3po")
    assert type(factory).__name__ == "C3poFactory"
    assert factory.rule_keys == ("line",)
    origin = dict(reg.items())["c3po"].origin
    assert origin.startswith("entry point c3po = proxyd_c3po:C3poFactory")
    assert "(dist proxyd" in origin
    assert "r2d2" in reg  # the built-ins are still there


def test_proxyd_parsers_lists_it(c3po_installed: None) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxyd", "parsers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("c3po "))
    assert "entry point c3po = proxyd_c3po:C3poFactory" in row
    assert "line" in row


async def test_proxying_through_it_by_name(c3po_installed: None, tmp_path: Path) -> None:
    received: list[bytes] = []

    async def droid_server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while line := await r.readline():
            received.append(line)
            w.write(b"OK " + line)
            await w.drain()

    async with tcp_server(droid_server) as up:
        config = f"""
listeners:
  - name: droids
    address: "127.0.0.1:0"
    upstream: "{up[0]}:{up[1]}"
    l7proto: c3po
    parser_config:
      deny_reply: "ERROR no droids"
access_log:
  path: access.log
"""
        async with daemon(config, tmp_path) as d:
            r, w = await asyncio.open_connection(*addr(d, "droids"))
            w.write(b"hello\r\n")
            assert await asyncio.wait_for(r.readline(), 5) == b"OK hello\r\n"
            w.write(b"hello C-3PO\r\n")
            assert await asyncio.wait_for(r.readline(), 5) == b"ERROR no droids\r\n"
            w.write(b"bye\r\n")
            assert await asyncio.wait_for(r.readline(), 5) == b"OK bye\r\n"
            w.close()
            await w.wait_closed()
    assert received == [b"hello\r\n", b"bye\r\n"]  # the C-3PO line never reached the server

    entries = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    l7 = [(e["verdict"], e["fields"].get("line")) for e in entries if e.get("event") == "l7"]
    assert ("forwarded", "hello") in l7
    assert ("denied", "hello C-3PO") in l7
    assert all(e["l7proto"] == "c3po" for e in entries if e.get("event") == "l7")


def test_the_example_package_own_tests_pass_against_the_installed_copy(c3po_installed: None) -> None:
    """examples/c3po/tests are outside ``testpaths``; run them here so CI covers them too."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(C3PO / "tests")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


async def test_writing_a_parser_try_it_works_as_written(c3po_installed: None, tmp_path: Path) -> None:
    """docs/writing-a-parser.md's "try it": its config, its demo server and its nc line, as written."""
    import re

    from proxyd.demo.r2d2_server import handle

    doc = (ROOT / "docs" / "writing-a-parser.md").read_text()
    config = re.search(r"```yaml\n# c3po\.yaml\n(.*?)```", doc, re.S)
    block = re.search(r"```console\n\$ python -m proxyd\.demo\.r2d2_server.*?```", doc, re.S)
    assert config and block, "the try-it config or console block moved"
    assert 'upstream: "127.0.0.1:9000"' in config.group(1)  # a fixed upstream: nc is not redirected
    exchanges = re.findall(r"\$ printf '([^']*)' \| nc -q1 127\.0\.0\.1 15010\n([^$`]*)", block.group(0))
    assert len(exchanges) == 2
    async with tcp_server(handle) as up:
        text = config.group(1).replace("127.0.0.1:9000", f"{up[0]}:{up[1]}")
        text = text.replace("127.0.0.1:15010", "127.0.0.1:0").replace("127.0.0.1:9901", "127.0.0.1:0")
        async with daemon(text + "access_log:\n  path: access.log\n", tmp_path) as d:
            for sent, want in exchanges:
                r, w = await asyncio.open_connection(*addr(d, "droids"))
                w.write(sent.encode().decode("unicode_escape").encode("latin-1"))
                w.write_eof()
                got = await asyncio.wait_for(r.read(), 5)
                w.close()
                assert got.replace(b"\r\n", b"\n").decode() == want
    entries = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    denied = [e["fields"] for e in entries if e.get("event") == "l7" and e["verdict"] == "denied"]
    assert denied == [{"line": "READ C-3PO", "reason": "banned"}]  # as the page says
