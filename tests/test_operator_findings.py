"""What a new operator ran into (issue 17, items 13-16): the bundled config starts without a
warning, a log file in a missing directory is refused at check time, the test parsers are not
offered outside the test suite, and admin API changes leave a line in the daemon's log.

Commands run as real subprocesses (``python -m proxyd ...``); daemons that need a log captured run
in-process with their logger pointed at a list.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from needs import free_port
from proxyutil import addr, daemon, r2d2_server, tcp_server
from test_operator_messages import POLICY, acli, cli, without_test_parsers, write

from proxyd import adminclient
from proxyd.accesslog import make_logger

ROOT = Path(__file__).resolve().parents[1]

# --- item 14: the bundled config starts without a descriptor warning ------------------------------

#: The open-files limit of a shell here (soft and hard): what `./dev run` starts the daemon with.
SHELL_NOFILE = 20000


def _bundled_copy(tmp_path: Path) -> tuple[Path, int]:
    """config/ copied as shipped, only its addresses moved to free ports (others may run tests)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    cfg = tmp_path / "config" / "proxyd.yaml"
    admin = free_port()
    text = cfg.read_text()
    assert '"127.0.0.1:9001"' in text and '"127.0.0.1:9901"' in text
    text = text.replace('"127.0.0.1:9001"', f'"127.0.0.1:{free_port()}"')
    cfg.write_text(text.replace('"127.0.0.1:9901"', f'"127.0.0.1:{admin}"'))
    return cfg, admin


#: Runs `proxyd` under that limit (lowered when the test runner's is higher; a limit cannot be
#: raised without privileges), as a shell's `ulimit -n` would, without a preexec_fn.
UNDER_SHELL_LIMITS = f"""
import resource, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard == resource.RLIM_INFINITY or hard > {SHELL_NOFILE}:
    resource.setrlimit(resource.RLIMIT_NOFILE, ({SHELL_NOFILE}, {SHELL_NOFILE}))
from proxyd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_bundled_config_starts_without_a_descriptor_warning(tmp_path: Path) -> None:
    cfg, admin = _bundled_copy(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", UNDER_SHELL_LIMITS, "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the daemon exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    events = [json.loads(line)["event"] for line in err.decode().splitlines()]
    assert "listening" in events and "stopped" in events
    assert "file descriptor limit too low" not in events, err.decode()


# --- item 15: access_log.path in a directory that does not exist ---------------------------------

LOG_CONFIG = 'listeners:\n  - name: a\n    address: "127.0.0.1:0"\n    upstream: "127.0.0.1:9"\n' \
             "access_log:\n  requests: all\n  path: {path}\n"  # fmt: skip


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_log_in_a_missing_directory_is_refused_with_file_line_and_field(
    tmp_path: Path, command: str
) -> None:
    cfg = write(tmp_path, LOG_CONFIG.format(path="logs/access.log"))
    res = cli(command, "-c", str(cfg), timeout=60)
    assert res.returncode == 1
    missing = tmp_path / "logs"
    assert res.stderr.strip() == (
        f"{cfg}:7: access_log.path: the directory {missing} does not exist "
        "(proxyd creates the log file, not its directory)"
    )
    assert not missing.exists()


def test_a_log_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    cfg = write(tmp_path, LOG_CONFIG.format(path="logs"))
    res = cli("check", "-c", str(cfg))
    assert res.returncode == 1
    assert (
        res.stderr.strip()
        == f"{cfg}:7: access_log.path: {tmp_path / 'logs'} is a directory; name a file in it"
    )


def test_a_log_in_an_existing_directory_is_fine(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    res = cli("check", "-c", str(write(tmp_path, LOG_CONFIG.format(path="logs/access.log"))))
    assert res.returncode == 0, res.stderr


# --- item 16: the test parsers are the suite's, not built-ins --------------------------------------


def test_outside_the_suite_the_unknown_parser_error_lists_real_parsers_only(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'listeners:\n  - name: a\n    address: "127.0.0.1:0"\n    l7proto: nope\n')
    res = cli("check", "-c", str(cfg), env=without_test_parsers())
    assert res.returncode == 1
    line = res.stderr.strip()
    assert line.startswith(f"{cfg}:4: listeners[a].l7proto: unknown parser 'nope' (known: ")
    known = line.split("(known: ", 1)[1].rstrip(")").split(", ")
    assert {"r2d2", "memcache", "redis", "http", "cassandra"} <= set(known)
    assert not [n for n in known if n.startswith("test.")]
    listed = cli("parsers", env=without_test_parsers()).stdout
    assert "test." not in listed and "testparsers" not in listed


def test_the_builtins_hold_no_test_parser() -> None:
    from proxyd.registry import BUILTINS

    assert not [
        name for name, target in BUILTINS.items() if "testparsers" in target or name.startswith("test.")
    ]


def test_inside_the_suite_a_daemon_subprocess_takes_a_test_parser(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'listeners:\n  - name: a\n    address: "127.0.0.1:0"\n'
                          '    l7proto: test.lineparser\n    upstream: "127.0.0.1:9"\n')  # fmt: skip
    res = cli("check", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert cli("check", "-c", str(cfg), env=without_test_parsers()).returncode == 1


# --- item 13: admin API changes are logged ----------------------------------------------------------


class Lines:
    """A LineWriter stand-in that keeps the daemon's log lines."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def msg(self, message: bytes) -> None:
        self.records.append(json.loads(message))

    info = warning = error = debug = msg

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == event]


def _capture(d: Any) -> Lines:
    lines = Lines()
    d.log = make_logger(lines)
    return lines


ADMIN_CONFIG = """
listeners:
  - name: r2d2
    address: "127.0.0.1:0"
    l7proto: r2d2
    upstream: "127.0.0.1:9"
policy:
  paths: [policy/]
access_log:
  path: access.log
admin:
  address: "127.0.0.1:0"
  socket: admin.sock
  token_file: admin.token
"""


async def test_every_admin_change_is_logged_with_who_what_and_the_revision(tmp_path: Path) -> None:
    files = {"policy/r2d2.yaml": POLICY.format(name="from-a-file"), "admin.token": "s3cret\n"}
    two = write(tmp_path, POLICY.format(name="one") + "---\n" + POLICY.format(name="two"), "two.yaml")
    one = write(tmp_path, POLICY.format(name="one").replace("READ", "HALT"), "one.yaml")
    bad = write(tmp_path, POLICY.format(name="three").replace("cmd: READ", "colour: red"), "bad.yaml")
    token = str(tmp_path / "admin.token")
    async with daemon(ADMIN_CONFIG, tmp_path, files=files) as d:
        lines = _capture(d)
        host, port = d.admin_address()  # type: ignore[misc]
        sock = str(tmp_path / "admin.sock")
        tcp = ["--admin", f"{host}:{port}", "--token-file", token]
        assert (await acli("policy", "--socket", sock, "import", str(two)))[0] == 0
        assert (await acli("policy", *tcp, "import", str(one)))[0] == 0
        assert (await acli("policy", "--socket", sock, "import", str(bad)))[0] == 1
        assert (await acli("policy", *tcp, "delete", "two"))[0] == 0
        assert (await acli("policy", "--socket", sock, "delete", "from-a-file"))[0] == 1
        assert (await acli("policy", "--admin", f"{host}:{port}", "delete", "one"))[0] == 1  # no token
        revision = d.policy.revision
    changed = lines.events("policy changed through the admin API")
    assert [(c["via"], c["method"], c["added"], c["replaced"], c["deleted"]) for c in changed] == [
        ("socket", "POST", ["one", "two"], [], []),
        ("token", "POST", [], ["one"], []),
        ("token", "DELETE", [], [], ["two"]),
    ]
    assert [c["revision"] for c in changed] == [revision - 2, revision - 1, revision]
    rejected = lines.events("policy change through the admin API rejected")
    assert [(r["via"], r["method"], r["status"]) for r in rejected] == [
        ("socket", "POST", 400), ("socket", "DELETE", 404), ("tcp without token", "DELETE", 401),
    ]  # fmt: skip
    assert any("rules.l7[0].colour" in e for e in rejected[0]["errors"])
    assert "comes from the file" in rejected[1]["errors"][0]
    assert [r["revision"] for r in rejected] == [revision - 1, revision, revision]  # what stays in force


async def test_a_put_logs_what_it_replaced_and_what_it_dropped(tmp_path: Path) -> None:
    files = {"policy/r2d2.yaml": POLICY.format(name="from-a-file"), "admin.token": "s3cret\n"}
    two = write(tmp_path, POLICY.format(name="one") + "---\n" + POLICY.format(name="two"), "two.yaml")
    three = write(tmp_path, POLICY.format(name="two") + "---\n" + POLICY.format(name="three"), "three.yaml")
    async with daemon(ADMIN_CONFIG, tmp_path, files=files) as d:
        lines = _capture(d)
        target = adminclient.AdminTarget(socket=tmp_path / "admin.sock")
        status, _ = await asyncio.to_thread(
            adminclient.request, target, "POST", "/v1/policy", two.read_bytes()
        )
        assert status == 200
        status, _ = await asyncio.to_thread(
            adminclient.request, target, "PUT", "/v1/policy", three.read_bytes()
        )
        assert status == 200
    put = lines.events("policy changed through the admin API")[-1]
    assert (put["via"], put["method"], put["added"], put["replaced"], put["deleted"]) == (
        "socket", "PUT", ["three"], ["two"], ["one"],
    )  # fmt: skip


# --- item 16: docs that say what the code does -------------------------------------------------------

READS_ON = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
spec:
  endpointSelector: {{matchLabels: {{app: r2d2}}}}
  ingress:
    - fromEndpoints: [{{}}]
      toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules: {{l7proto: r2d2, l7: [{{cmd: READ}}]}}
"""

R2D2_CONFIG = """
listeners:
  - name: r2d2
    address: "127.0.0.1:0"
    l7proto: r2d2
    upstream: "127.0.0.1:{port}"
identities:
  - cidr: 127.0.0.0/8
    labels: {{app: r2d2}}
policy:
  paths: [policy/]
access_log:
  path: access.log
admin:
  socket: admin.sock
"""


def _doc_row(doc: str, field: str) -> str:
    text = (ROOT / "docs" / doc).read_text()
    return next(line for line in text.splitlines() if line.startswith(f"| {field} |"))


async def test_the_policy_field_of_l7_lines_is_as_documented(tmp_path: Path) -> None:
    async def ask(r: asyncio.StreamReader, w: asyncio.StreamWriter, line: bytes) -> bytes:
        w.write(line + b"\r\n")
        await w.drain()
        return (await asyncio.wait_for(r.readline(), 5)).rstrip(b"\r\n")

    async with tcp_server(r2d2_server) as up:
        files = {"policy/readers.yaml": READS_ON.format(name="readers", port=up[1])}
        async with daemon(R2D2_CONFIG.format(port=up[1]), tmp_path, files=files) as d:
            r, w = await asyncio.open_connection(*addr(d, "r2d2"))
            assert await ask(r, w, b"READ /a") == b"OK READ /a"
            assert await ask(r, w, b"WRITE /a") == b"ERROR"  # no l7 rule of `readers` matches
            # A new revision that denies this connection at L3/L4 by default deny: no document
            # decides the next request's denial.
            (tmp_path / "policy" / "readers.yaml").write_text(READS_ON.format(name="readers", port=1))
            assert d.reload_policy("test")
            assert await ask(r, w, b"READ /a") == b"ERROR"
            w.close()
    requests = [x for x in map(json.loads, (tmp_path / "access.log").read_text().splitlines())
                if x["event"] == "l7" and x["entry_type"] == "request"]  # fmt: skip
    assert [(x["verdict"], x["policy"]) for x in requests] == [
        ("forwarded", "readers"), ("denied", "readers"), ("denied", None),
    ]  # fmt: skip
    row = _doc_row("access-log-and-metrics.md", "`policy`")
    assert "`denied` or `audit` at L7: the document whose rule admitted the connection and put the `l7` " \
           "rules in force, none of which matched" in row  # fmt: skip
    assert "now denies by default deny" in row and "`policy: null`" in row
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    assert '"fields":{"command":"set","key":"sess:1"},"policy":null' not in deployment


async def test_get_v1_policy_source_and_where_are_as_documented(tmp_path: Path) -> None:
    files = {"policy/readers.yaml": "# the readers\n" + READS_ON.format(name="readers", port=9000)}
    extra = write(tmp_path, READS_ON.format(name="extra", port=9001), "extra.yaml")
    async with daemon(R2D2_CONFIG.format(port=9), tmp_path, files=files):
        sock = str(tmp_path / "admin.sock")
        assert (await acli("policy", "--socket", sock, "import", str(extra)))[0] == 0
        rc, out, _ = await acli("policy", "--socket", sock, "get")
    assert rc == 0
    docs = {x["name"]: x for x in json.loads(out)["documents"]}
    path = str(tmp_path / "policy" / "readers.yaml")
    assert (docs["readers"]["source"], docs["readers"]["where"], docs["readers"]["origin"]) == (
        path, f"{path}:2", "file",
    )  # fmt: skip
    assert (docs["extra"]["source"], docs["extra"]["where"], docs["extra"]["origin"]) == (
        "admin-api", None, "imported",
    )  # fmt: skip
    row = _doc_row("admin-api.md", "`GET /v1/policy`")
    assert "`source` is the file the document was read from (`admin-api` for an imported one)" in row
    assert "`where` is `file:line`" in row and "`source` is `file:line`" not in row


async def test_sighup_applies_what_the_docs_say_and_keeps_what_they_say(tmp_path: Path) -> None:
    text = R2D2_CONFIG.format(port=9)
    files = {"policy/readers.yaml": READS_ON.format(name="readers", port=9)}
    async with daemon(text, tmp_path, files=files) as d:
        (tmp_path / "logs").mkdir()
        new = (text.replace("app: r2d2}", "app: other}")
               .replace("access_log:\n  path: access.log", "access_log:\n  path: logs/other.log")
               .replace("policy:\n", "limits:\n  max_connections: 3\n  idle_timeout: 7s\npolicy:\n")
               .replace("identities:", '  - name: added\n    address: "127.0.0.1:0"\n'
                        '    upstream: "127.0.0.1:9"\nidentities:'))  # fmt: skip
        (tmp_path / "proxyd.yaml").write_text(new)
        assert await d.reload()
        assert d.identities.labels_for("127.0.0.1") == {"app": "other"}
        assert sorted(d.listeners) == ["added", "r2d2"]
        for lr in d.listeners.values():
            assert (lr.limits.max_connections, lr.limits.idle_timeout) == (3, 7.0), lr.config.name
        assert d.config.access_log.path == str(tmp_path / "access.log")  # a restart applies it
    assert not (tmp_path / "logs" / "other.log").exists()
    doc = (ROOT / "docs" / "deployment.md").read_text()
    table = doc.split("## 6. Upgrading and reloading", 1)[1].split("\n\n")
    rows = [line for block in table for line in block.splitlines() if line.startswith("| ")]
    by_change = {row.split(" | ")[0][2:]: row for row in rows}
    assert "systemctl reload" in by_change["`policy.paths`, `policy.mode`, `identities`"]
    assert "systemctl reload" in by_change["`listeners` (added, removed, changed), `limits`, `upstream_mark`"]
    first = "`access_log`, `admin`, `policy.state_dir`"  # then the keys later issues added
    restart = [row for change, row in by_change.items() if change.startswith(first)]
    assert len(restart) == 1 and "systemctl restart" in restart[0]
    assert "config (listeners, redirect, limits)" not in doc
    signals = _doc_row("configuration.md", "SIGHUP")
    assert (
        "`identities`, `limits`" in signals
        and "Not applied until a restart: `access_log`, `admin`" in signals
    )
