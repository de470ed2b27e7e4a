"""What an operator sees when something is wrong: each message names the thing at fault.

Every test runs the real command line (``python -m proxyd ...``) against files and, where a daemon
is needed, a daemon on a free loopback port started in this test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from needs import free_port
from proxyutil import daemon, r2d2_server, tcp_server

ROOT = Path(__file__).resolve().parents[1]

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
spec:
  endpointSelector: {{matchLabels: {{app: r2d2}}}}
  ingress:
    - toPorts:
        - ports: [{{port: "9000", protocol: TCP}}]
          rules: {{l7proto: r2d2, l7: [{{cmd: READ}}]}}
"""


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxyd", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


def without_test_parsers() -> dict[str, str]:
    """The environment of a daemon outside the test suite: no test parsers registered."""
    plugins = str(ROOT / "tests" / "parser_plugins")  # what conftest.py adds
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p and p != plugins)}


async def acli(*args: str) -> tuple[int, str, str]:
    """The CLI as a subprocess, without blocking the loop that serves the in-process daemon."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxyd", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write(tmp_path: Path, text: str, name: str = "proxyd.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- explain: bad --src / --dst are clean errors (bug 1) ---------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "words"),
    [
        ("nonsense", "127.0.0.1:9000", "--src: 'nonsense' is not an IP address"),
        ("[::1", "127.0.0.1:9000", "--src: '[::1' is not an address"),
        ("127.0.0.1:99999", "127.0.0.1:9000", "--src: port 99999 out of range"),
        ("127.0.0.1", "nonsense", "--dst: must be HOST:PORT"),
        ("127.0.0.1", "localhost:9000", "--dst: 'localhost' is not an IP address"),
    ],
)
def test_explain_bad_addresses_are_one_line_errors(src: str, dst: str, words: str) -> None:
    res = cli("explain", "-c", "config/proxyd.yaml", "--src", src, "--dst", dst)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("proxyd explain: ") and words in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("src", ["127.0.0.1", "127.0.0.1:4000", "::1", "[::1]:4000"])
def test_explain_accepts_every_documented_src_form(src: str) -> None:
    res = cli("explain", "-c", "config/proxyd.yaml", "--src", src, "--dst", "127.0.0.1:9000")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("listener: r2d2")


# --- policy import / get / delete (bug 2 and item 8) --------------------------------------------


def test_policy_import_of_a_missing_file_says_so_not_admin_api(tmp_path: Path) -> None:
    res = cli("policy", "--admin", "127.0.0.1:1", "import", str(tmp_path / "nonexist.yaml"))
    assert res.returncode == 1
    missing = tmp_path / "nonexist.yaml"
    assert res.stderr.strip() == f"proxyd policy import: cannot read {missing}: No such file or directory"
    assert "admin API" not in res.stderr


def test_policy_get_against_a_dead_address_names_it() -> None:
    port = free_port()
    res = cli("policy", "--admin", f"127.0.0.1:{port}", "get")
    assert res.returncode == 1
    assert f"cannot reach the daemon's admin API at http://127.0.0.1:{port}:" in res.stderr
    assert "Connection refused" in res.stderr


async def test_policy_import_names_the_file_and_delete_explains_file_documents(tmp_path: Path) -> None:
    bad = write(tmp_path, POLICY.format(name="extra").replace("cmd: READ", "colour: red"), "extra.yaml")
    good = write(tmp_path, POLICY.format(name="extra"), "good.yaml")
    files = {"policy/r2d2.yaml": POLICY.format(name="from-a-file")}
    async with tcp_server(r2d2_server) as up:
        config = f"""
listeners:
  - name: r2d2
    address: "127.0.0.1:0"
    l7proto: r2d2
    upstream: "{up[0]}:{up[1]}"
policy:
  paths: [policy/]
access_log:
  path: access.log
admin:
  address: "127.0.0.1:0"
  socket: admin.sock
"""
        async with daemon(config, tmp_path, files=files) as d:
            assert d.admin_address() is not None
            at = str(tmp_path / "admin.sock")  # changes go over the admin socket
            rc, _, err = await acli("policy", "--socket", at, "import", str(bad))
            assert rc == 1
            lines = err.strip().splitlines()
            assert lines and all(line.startswith(f"{bad}:") for line in lines), err
            assert "rules.l7[0].colour" in err and "admin-api" not in err
            rc, out, err = await acli("policy", "--socket", at, "import", str(good))
            assert (rc, err) == (0, "") and out.startswith("Revision: ")
            rc, _, err = await acli("policy", "--socket", at, "delete", "from-a-file")
            assert rc == 1
            assert "'from-a-file' comes from the file" in err and "r2d2.yaml" in err
            assert "policy.paths" in err and "edit or remove the file" in err
            rc, _, err = await acli("policy", "--socket", at, "delete", "nothing-by-that-name")
            assert rc == 1 and err.strip() == "no imported policy named 'nothing-by-that-name'"
            rc, out, _ = await acli("policy", "--socket", at, "delete", "extra")
            assert rc == 0 and out.startswith("Revision: ")


# --- config: missing policy files, port in use ----------------------------------------------------


def test_missing_policy_path_is_reported_at_its_config_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'listeners:\n  - name: a\n    address: "127.0.0.1:0"\npolicy:\n  paths:\n'
                          "    - there.yaml\n    - missing.yaml\n")  # fmt: skip
    write(tmp_path, POLICY.format(name="there"), "there.yaml")
    res = cli("check", "-c", str(cfg))
    assert res.returncode == 1
    missing = tmp_path / "missing.yaml"
    assert res.stderr.strip() == f"{cfg}:7: policy.paths[1]: no such file or directory: {missing}"


def test_port_in_use_names_the_listener_and_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write(tmp_path, f'listeners:\n  - name: web\n    address: "127.0.0.1:{port}"\n'
                              '    upstream: "127.0.0.1:9"\n')  # fmt: skip
        res = cli("run", "-c", str(cfg))
        assert res.returncode == 1
        in_use = f"cannot bind 127.0.0.1:{port}: Address already in use"
        assert f"proxyd: cannot start: listener 'web': {in_use}" in res.stderr
        cfg = write(tmp_path, 'listeners:\n  - name: web\n    address: "127.0.0.1:0"\n    upstream: '
                              f'"127.0.0.1:9"\nadmin:\n  address: "127.0.0.1:{port}"\n')  # fmt: skip
        res = cli("run", "-c", str(cfg))
        assert res.returncode == 1
        assert f"proxyd: cannot start: admin.address: {in_use}" in res.stderr


# --- signals --------------------------------------------------------------------------------------


async def test_stop_is_logged_when_it_starts_not_when_the_drain_ends(tmp_path: Path) -> None:
    async with tcp_server(r2d2_server) as up:
        config = (f'listeners:\n  - name: r2d2\n    address: "127.0.0.1:0"\n    upstream: "{up[0]}:{up[1]}"\n'
                  "access_log:\n  path: access.log\nlimits:\n  drain_timeout: 60s\n")  # fmt: skip
        async with daemon(config, tmp_path) as d:
            host, port = d.listeners["r2d2"].bound_address()
            _, w = await asyncio.open_connection(host, port)  # stays open: the drain waits for it
            for _ in range(100):
                if d.active_connections():
                    break
                await asyncio.sleep(0.01)
            events: list[str] = []
            real_info = d.log.info

            def spy(event: str, **kw: object) -> None:
                events.append(event)
                real_info(event, **kw)

            d.log.info = spy
            stopping = asyncio.ensure_future(d.stop())
            await asyncio.sleep(0.1)
            assert not stopping.done()  # still draining the open connection ...
            assert events and events[0].startswith("stopping"), events  # ... and it said so at once
            w.close()
            await asyncio.wait_for(stopping, 5)
            assert events[-1] == "stopped"


async def test_sighup_with_nothing_changed_keeps_the_revision(tmp_path: Path) -> None:
    files = {"policy/r2d2.yaml": POLICY.format(name="p")}
    config = 'listeners:\n  - name: r2d2\n    address: "127.0.0.1:0"\n    l7proto: r2d2\n    upstream: "127.0.0.1:9"\npolicy:\n  paths: [policy/]\naccess_log:\n  path: access.log\n'  # noqa: E501
    async with daemon(config, tmp_path, files=files) as d:
        before = d.policy.revision
        assert await d.reload()
        assert await d.reload()
        assert d.policy.revision == before
        (tmp_path / "policy" / "r2d2.yaml").write_text(POLICY.format(name="p").replace("READ", "HALT"))
        assert await d.reload()
        assert d.policy.revision == before + 1


# --- parsers, --help, iptables hint ---------------------------------------------------------------


def test_parsers_lists_the_test_parsers_only_where_the_tests_register_them() -> None:
    assert "test.passer" in cli("parsers").stdout  # conftest.py registers them for the suite
    plain = cli("parsers", env=without_test_parsers()).stdout
    assert "test." not in plain and "r2d2" in plain


@pytest.mark.parametrize("command", ["run", "check", "parsers", "explain", "iptables"])
def test_every_command_help_has_a_description(command: str) -> None:
    out = cli(command, "--help").stdout
    usage, _, rest = out.partition("\n\n")
    assert usage.startswith(f"usage: proxyd {command}")
    description = rest.split("\n\n", 1)[0]
    assert not description.startswith(("options:", "positional")), out
    assert len(description.split()) >= 10


def test_iptables_without_redirect_listeners_says_why_the_chains_are_empty(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'listeners:\n  - name: a\n    address: "127.0.0.1:0"\n')
    res = cli("iptables", "-c", str(cfg))
    assert res.returncode == 0
    assert "-j REDIRECT" not in res.stdout
    assert "no listener has a redirect: block" in res.stderr
    cfg = write(tmp_path, 'listeners:\n  - name: a\n    address: "0.0.0.0:15001"\n'
                          "    redirect: {ports: [11211]}\n")  # fmt: skip
    res = cli("iptables", "-c", str(cfg))
    assert "-j REDIRECT" in res.stdout and res.stderr == ""


# --- packaging: the documented wheel builds, without setuptools' license warning ------------------


def _copy_tracked(src: Path, dest: Path) -> None:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=src, capture_output=True, check=True,
                           timeout=30).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, names):
        f = src / name
        if f.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / name)


@pytest.mark.parametrize("project", [".", "examples/c3po"])
def test_python_m_build_makes_a_wheel_without_license_deprecation(tmp_path: Path, project: str) -> None:
    if shutil.which("git") is None:
        pytest.skip("needs git to list the tracked files")
    _copy_tracked(ROOT, tmp_path / "src")
    res = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist")],
        cwd=tmp_path / "src" / project, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "project.license` as a TOML table is deprecated" not in out
    assert "License classifiers are deprecated" not in out
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        assert "License-Expression: Apache-2.0" in z.read(meta).decode()
        if project == ".":
            assert "proxyd/cli.py" in z.namelist()


async def test_access_log_lines_are_as_documented(tmp_path: Path) -> None:
    """A real session's lines carry the example lines' fields of docs/access-log-and-metrics.md."""
    doc = (ROOT / "docs" / "access-log-and-metrics.md").read_text()
    l7_doc, conn_doc = (json.loads(x) for x in doc.split("```json\n", 1)[1].split("```", 1)[0].splitlines())
    async with tcp_server(r2d2_server) as up:
        files = {"policy/r2d2.yaml": POLICY.format(name="r2d2-demo").replace('"9000"', f'"{up[1]}"')}
        config = (f'listeners:\n  - name: r2d2\n    address: "127.0.0.1:0"\n    l7proto: r2d2\n'
                  f'    upstream: "{up[0]}:{up[1]}"\n'
                  f"identities:\n  - cidr: {up[0]}/32\n    labels: {{app: r2d2}}\n"
                  "policy:\n  paths: [policy/]\naccess_log:\n  path: access.log\n")  # fmt: skip
        async with daemon(config, tmp_path, files=files) as d:
            r, w = await asyncio.open_connection(*d.listeners["r2d2"].bound_address())
            try:
                w.write(b"HALT\r\n")  # denied: the policy allows READ only
                assert await asyncio.wait_for(r.readline(), 5) == b"ERROR\r\n"
                w.write_eof()  # a normal end: the client half-closes, the server follows
                assert await asyncio.wait_for(r.read(), 5) == b""
            finally:
                w.close()
            for _ in range(200):
                if not d.active_connections():
                    break
                await asyncio.sleep(0.01)
    entries = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    l7 = next(e for e in entries if e["event"] == "l7")
    conn = next(e for e in entries if e["event"] == "connection")
    assert set(l7) == set(l7_doc)
    assert (l7["verdict"], l7["policy"], l7["fields"]) == ("denied", "r2d2-demo", {"cmd": "HALT", "file": ""})
    assert set(conn) == set(conn_doc)  # no closed_by, no reason: as the example shows
    assert conn["verdict"] == "forwarded"
