"""``proxyd explain`` asks the running daemon (GET /v1/explain) and says when it answers from the
files alone; a destination no listener judges is refused in both (issue 17, item 12).

The daemon runs in-process on free loopback ports; the CLI runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from needs import free_port
from proxyutil import daemon
from test_operator_messages import acli, write

from proxyd.config import parse_config
from proxyd.explainer import ExplainRefused, explain_connection, pick_listener
from proxyd.policy.engine import PolicySet
from proxyd.policy.identity import IdentityMap
from proxyd.policy.loader import parse_text
from proxyd.registry import Registry

READERS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
spec:
  endpointSelector: {{matchLabels: {{app: r2d2}}}}
  ingress:
    - fromEndpoints: [{{matchLabels: {{role: reader}}}}]
      toPorts:
        - ports: [{{port: "9000", protocol: TCP}}]
          rules: {{l7proto: r2d2, l7: [{{cmd: {cmd}}}]}}
"""

CONFIG = """\
listeners:
  - name: r2d2
    address: "127.0.0.1:{front}"
    l7proto: r2d2
    upstream: "127.0.0.2:9000"
identities:
  - cidr: 127.0.0.2/32
    labels: {{app: r2d2}}
  - cidr: 127.0.0.3/32
    labels: {{role: reader}}
policy:
  paths: [policy/]
access_log:
  path: access.log
admin:
  address: "127.0.0.1:0"
  socket: admin.sock
"""

FILES = {"policy/readers.yaml": READERS.format(name="from-a-file", cmd="READ")}


def _get(host: str, admin_port: int, **query: str) -> tuple[int, dict[str, Any]]:
    url = f"http://{host}:{admin_port}/v1/explain?{urllib.parse.urlencode(query)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_explain_asks_the_daemon_and_sees_imported_documents(tmp_path: Path) -> None:
    imported = write(tmp_path, READERS.format(name="imported-halt", cmd="HALT"), "extra.yaml")
    async with daemon(CONFIG.format(front=free_port()), tmp_path, files=FILES) as d:
        cfg = str(tmp_path / "proxyd.yaml")
        ask = ("explain", "--config", cfg, "--src", "127.0.0.3", "--dst", "127.0.0.2:9000")
        rc, before, err = await acli(*ask)
        assert (rc, err) == (0, "")
        assert "imported-halt" not in before
        rc, _, _ = await acli("policy", "--config", cfg, "import", str(imported))
        assert rc == 0
        rc, out, err = await acli(*ask)
        assert (rc, err) == (0, "")  # the daemon answered: no note
        assert out.startswith("listener: r2d2 (ingress, l7proto r2d2)\n")
        assert f"policy revision: {d.policy.revision}" in out
        assert "imported-halt" in out and "{cmd: HALT}" in out and "{cmd: READ}" in out
        # --files reads the files (state_dir is not set: the import is not among them).
        rc, files_out, err = await acli(*ask, "--files")
        assert (rc, err) == (0, "")
        assert "imported-halt" not in files_out and "{cmd: READ}" in files_out


async def test_the_daemon_answers_with_the_identities_in_force_not_an_unreloaded_edit(tmp_path: Path) -> None:
    async with daemon(CONFIG.format(front=free_port()), tmp_path, files=FILES):
        cfg = tmp_path / "proxyd.yaml"
        cfg.write_text(cfg.read_text().replace("role: reader", "role: writer"))  # not reloaded
        ask = ("explain", "--config", str(cfg), "--src", "127.0.0.3", "--dst", "127.0.0.2:9000")
        rc, live, _ = await acli(*ask)
        assert rc == 0 and "{role: reader}" in live and "L3/L4 verdict: allowed" in live
        rc, files, _ = await acli(*ask, "--files")
        assert rc == 0 and "{role: writer}" in files and "L3/L4 verdict: DENIED" in files


async def test_get_v1_explain_is_an_open_read_over_tcp(tmp_path: Path) -> None:
    async with daemon(CONFIG.format(front=free_port()), tmp_path, files=FILES) as d:
        host, port = d.admin_address()  # type: ignore[misc]
        status, data = await asyncio.to_thread(_get, host, port, src="127.0.0.3:4000", dst="127.0.0.2:9000")
        assert status == 200, data
        assert data["listener"] == {
            "name": "r2d2", "address": d.config.listeners[0].address, "direction": "ingress",
            "l7proto": "r2d2", "upstream": "127.0.0.2:9000", "policy_mode": "enforce",
        }  # fmt: skip
        assert data["revision"] == d.policy.revision
        assert data["config"] == str(tmp_path / "proxyd.yaml")
        assert data["explanation"]["l4_allowed"] is True
        assert data["explanation"]["remote_labels"] == {"role": "reader"}
        assert data["text"].startswith("listener: r2d2 (ingress, l7proto r2d2)\ndirection: ingress")
        # dst as an address and a port=
        status, by_port = await asyncio.to_thread(
            _get, host, port, src="127.0.0.3", dst="127.0.0.2", port="9000"
        )
        assert status == 200 and by_port["explanation"]["dst"] == "127.0.0.2:9000"
        assert by_port["explanation"]["sni"] is None
        query = {"src": "127.0.0.3", "dst": "127.0.0.2:9000", "sni": "a.b"}
        status, tls = await asyncio.to_thread(_get, host, port, **query)
        assert status == 200 and tls["explanation"]["sni"] == "a.b" and "sni: a.b" in tls["text"]
        status, bad = await asyncio.to_thread(_get, host, port, src="nonsense", dst="127.0.0.2")
        assert status == 400
        assert bad["errors"] == [
            "src: 'nonsense' is not an IP address (IP, IP:PORT or [IPv6]:PORT)",
            "dst: must be HOST:PORT, not '127.0.0.2' (IP:PORT, [IPv6]:PORT, or IP and port=)",
        ]


async def test_a_dst_the_daemon_never_judges_is_refused_by_the_daemon_and_the_files(tmp_path: Path) -> None:
    front = free_port()
    async with daemon(CONFIG.format(front=front), tmp_path, files=FILES) as d:
        host, port = d.admin_address()  # type: ignore[misc]
        own = f"127.0.0.1:{front}"
        status, data = await asyncio.to_thread(_get, host, port, src="127.0.0.3", dst=own)
        assert status == 400
        (why,) = data["errors"]
        assert why == (f"listener 'r2d2' sends every connection to its fixed upstream 127.0.0.2:9000 and "
                       f"judges it with that destination, never {own} (that is the listener's own "
                       "address): ask with --dst 127.0.0.2:9000")  # fmt: skip
        cfg = str(tmp_path / "proxyd.yaml")
        for extra in ((), ("--files",), ("--listener", "r2d2")):
            rc, out, err = await acli("explain", "--config", cfg, "--src", "127.0.0.3", "--dst", own, *extra)
            assert (rc, out) == (2, "")
            assert err == f"proxyd explain: {why}\n"


async def test_unreachable_daemon_is_said_and_the_files_answer(tmp_path: Path) -> None:
    dead = free_port()
    cfg = write(tmp_path, CONFIG.format(front=free_port()).replace('"127.0.0.1:0"', f'"127.0.0.1:{dead}"'))
    (tmp_path / "policy").mkdir()
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    rc, out, err = await acli(
        "explain", "--config", str(cfg), "--src", "127.0.0.3", "--dst", "127.0.0.2:9000"
    )
    assert rc == 0
    assert out.startswith("listener: r2d2 (ingress, l7proto r2d2)\n") and "{cmd: READ}" in out
    (note,) = err.splitlines()
    assert note.startswith(f"proxyd explain: answering from the files alone ({cfg}, its policy.paths")
    assert "not from the running daemon" in note
    assert f"no daemon answers at unix socket {tmp_path / 'admin.sock'}" in note
    assert f"no daemon answers at http://127.0.0.1:{dead} (Connection refused)" in note
    rc, out, err = await acli("explain", "--admin", f"127.0.0.1:{dead}", "--src", "127.0.0.3",
                              "--dst", "127.0.0.2:9000")  # fmt: skip
    assert (rc, out) == (1, "")
    assert err.startswith(f"proxyd explain: cannot reach the daemon's admin API: no daemon answers at "
                          f"http://127.0.0.1:{dead}")  # fmt: skip


# --- which listener judges a destination (the files and the daemon share this) -------------------

LISTENERS = """\
listeners:
  - {name: fixed, address: "127.0.0.1:15000", upstream: "10.0.0.1:80", l7proto: r2d2}
  - {name: memcache, address: "0.0.0.0:15001", redirect: {ports: [11211]}}
  - {name: redis, address: "0.0.0.0:15002", redirect: {ports: [6379]}, policy_mode: audit}
"""


def _listeners(text: str = LISTENERS) -> Any:
    return parse_config(text, Path("/etc/proxyd/proxyd.yaml"), Registry.load()).listeners


@pytest.mark.parametrize(
    ("dst", "name"),
    [(("10.0.0.1", 80), "fixed"), (("10.0.0.9", 11211), "memcache"), (("10.0.0.9", 6379), "redis")],
)
def test_the_listener_is_the_one_that_judges_the_destination(dst: tuple[str, int], name: str) -> None:
    assert pick_listener(_listeners(), dst)[0].name == name


@pytest.mark.parametrize(
    ("dst", "listener", "words"),
    [
        (("127.0.0.1", 15000), None, "no listener judges 127.0.0.1:15000"),
        (("127.0.0.1", 15000), "fixed", "never 127.0.0.1:15000 (that is the listener's own address)"),
        (("10.0.0.2", 80), "fixed", "fixed upstream 10.0.0.1:80"),
        (("127.0.0.1", 15001), "memcache", "refuses a connection addressed to its own address 0.0.0.0:15001"),
        (("127.0.0.1", 15002), "memcache", "is proxyd listener 'redis'"),
        (("10.0.0.9", 5432), None, "no listener judges 10.0.0.9:5432"),
        (("10.0.0.9", 5432), "nope", "no listener named 'nope' (listeners: fixed, memcache, redis)"),
    ],
)
def test_destinations_no_listener_judges_are_refused(
    dst: tuple[str, int], listener: str | None, words: str
) -> None:
    with pytest.raises(ExplainRefused) as exc:
        pick_listener(_listeners(), dst, listener)
    assert words in str(exc.value)


def test_a_port_outside_a_named_listeners_redirect_is_a_warning() -> None:
    lc, warnings = pick_listener(_listeners(), ("10.0.0.9", 5432), "memcache")
    assert lc.name == "memcache"
    assert warnings == ["listener 'memcache' gets redirects for ports 11211 only (redirect.ports): port 5432 "
                        "reaches it only through rules proxyd does not install"]  # fmt: skip


def test_two_catch_all_listeners_need_a_name() -> None:
    two = 'listeners:\n  - {name: a, address: "0.0.0.0:1"}\n  - {name: b, address: "0.0.0.0:2"}\n'
    with pytest.raises(ExplainRefused, match=r"several listeners could judge 10.0.0.9:80 \(a, b\)"):
        pick_listener(_listeners(two), ("10.0.0.9", 80))


def test_an_audit_listener_is_explained_in_audit_mode() -> None:
    deny = parse_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: nobody}\n"
        "spec:\n  endpointSelector: {}\n  ingress: [{fromEndpoints: [{matchLabels: {app: nobody}}]}]\n",
        "deny.yaml",
        Registry.load(),
    )
    ids = IdentityMap.from_entries([("10.0.0.0/24", {"app": "db"})])
    answer = explain_connection(_listeners(), PolicySet(deny), ids, ("10.0.0.5", 1), ("10.0.0.9", 6379))
    assert answer.mode == "audit"
    assert "L3/L4 verdict: DENIED (audit mode: allowed and logged)" in answer.explanation.text()
    enforced = explain_connection(_listeners(), PolicySet(deny), ids, ("10.0.0.5", 1), ("10.0.0.9", 11211))
    assert "L3/L4 verdict: DENIED: default deny" in enforced.explanation.text()


async def test_a_listener_on_port_0_is_judged_at_the_port_it_got(tmp_path: Path) -> None:
    text = CONFIG.format(front=0).replace('upstream: "127.0.0.2:9000"', "redirect: {ports: [9000]}")
    async with daemon(text, tmp_path, files=FILES) as d:
        host, port = d.admin_address()  # type: ignore[misc]
        bound = d.listeners["r2d2"].bound_address()[1]
        status, data = await asyncio.to_thread(_get, host, port, src="127.0.0.3", dst=f"127.0.0.1:{bound}")
        assert status == 400
        assert "refuses a connection addressed to its own address" in data["errors"][0]
        status, data = await asyncio.to_thread(_get, host, port, src="127.0.0.3", dst="127.0.0.2:9000")
        assert status == 200 and data["listener"]["address"] == f"127.0.0.1:{bound}"
