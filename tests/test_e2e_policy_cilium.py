"""Cilium's meaning through the daemon: visibility, empty lists, endpoint-only selectors, entities.

Each test starts the daemon with a policy in Cilium's shape and real clients on loopback
addresses with different identities, and checks both directions of each change: a client the
old (permissive) reading admitted is now refused, and a client Cilium admits, which the old
reading refused or could not even load, is now admitted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from proxyutil import addr, daemon, r2d2_server, tcp_server, wait_for

from proxyd.policy.loader import parse_text
from proxyd.registry import Registry

CONFIG = """
listeners:
  - name: r2d2
    address: "127.0.0.1:0"
    l7proto: r2d2
    upstream: "{host}:{port}"
identities:
  - cidr: {host}/32
    labels: {{app: r2d2}}
  - cidr: 127.0.0.2/32
    labels: {{role: reader}}
  - cidr: 127.0.0.3/32
    entity: host
  - cidr: 127.0.0.5/32
    labels: {{role: admin}}
policy:
  paths: [policy.yaml]
access_log:
  path: access.log
"""
READER, HOST, WORLD, ADMIN = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"  # .4: no entry

HEAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
spec:
  endpointSelector:
    matchLabels:
      app: r2d2
  ingress:
"""


async def outcome(d_addr: tuple[str, int], src: str) -> bytes:
    """What ``READ /x`` from ``src`` gets: the server's answer, ERROR, or b"" (closed at accept)."""
    r, w = await asyncio.open_connection(*d_addr, local_addr=(src, 0))
    try:
        w.write(b"READ /x\r\n")
        await w.drain()
        return (await asyncio.wait_for(r.readline(), 5)).rstrip(b"\r\n")
    except ConnectionResetError:
        return b""
    finally:
        w.close()


async def run(tmp_path: Path, policy: str, clients: list[str]) -> dict[str, bytes]:
    async with tcp_server(r2d2_server) as up:
        text = CONFIG.format(host=up[0], port=up[1])
        async with daemon(text, tmp_path, files={"policy.yaml": policy.replace("PORT", str(up[1]))}) as d:
            got = {src: await outcome(addr(d, "r2d2"), src) for src in clients}
            await wait_for(lambda: not d.active_connections())
    return got


def log(tmp_path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]


async def test_visibility_l7proto_without_l7_parses_and_allows(tmp_path: Path) -> None:
    # Item 1. Before: "needs at least one rule", the document did not load. Now Cilium's
    # visibility idiom: parsed by r2d2, every request allowed and logged.
    policy = (
        HEAD.format(name="visibility")
        + """\
  - fromEndpoints:
    - matchLabels: {role: reader}
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      rules:
        l7proto: r2d2
"""
    )
    got = await run(tmp_path, policy, [READER, ADMIN])
    assert got == {READER: b"OK READ /x", ADMIN: b""}
    requests = [e for e in log(tmp_path) if e.get("event") != "connection" and e.get("fields")]
    assert [(e["fields"]["cmd"], e["verdict"], e["policy"]) for e in requests] == [
        ("READ", "forwarded", "visibility")
    ]


async def test_explicit_empty_from_endpoints_admits_nobody(tmp_path: Path) -> None:
    # Item 5. Before: `fromEndpoints: []` read as absent, so with toPorts every remote was in
    # (reader, world, host). Now it selects nothing; only the admin rule admits.
    policy = (
        HEAD.format(name="empty-list")
        + """\
  - fromEndpoints: []
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
  - fromEndpoints:
    - matchLabels: {role: admin}
"""
    )
    got = await run(tmp_path, policy, [READER, WORLD, HOST, ADMIN])
    assert got == {READER: b"", WORLD: b"", HOST: b"", ADMIN: b"OK READ /x"}


async def test_wildcard_endpoint_selector_and_cidr_match_what_cilium_matches(tmp_path: Path) -> None:
    # Item 10. Before: `fromEndpoints: [{}]` admitted world and the host, and fromCIDR admitted
    # the labelled reader. Now {} admits endpoints only and CIDR rules only world.
    policy = (
        HEAD.format(name="endpoints-and-cidr")
        + """\
  - fromEndpoints:
    - {}
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      rules: {l7proto: r2d2, l7: [{cmd: READ}]}
  - fromCIDR: [127.0.0.2/32, 127.0.0.4/32]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      rules: {l7proto: r2d2, l7: [{cmd: WRITE}]}
"""
    )
    got = await run(tmp_path, policy, [READER, WORLD, HOST])
    assert got == {READER: b"OK READ /x", WORLD: b"ERROR", HOST: b""}
    # The world client is in through fromCIDR, whose l7 rules allow WRITE only; the reader is
    # in through {} (READ allowed), not through the CIDR that covers its address.


async def test_entities_through_the_daemon(tmp_path: Path) -> None:
    # Item 11. Before: fromEntities was "not supported by proxyd", the document did not load.
    policy = (
        HEAD.format(name="entities")
        + """\
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
  - fromEntities: [host]
"""
    )
    assert parse_text(policy.replace("PORT", "80"), "p.yaml", Registry.load())
    got = await run(tmp_path, policy, [WORLD, HOST, READER])
    assert got == {WORLD: b"OK READ /x", HOST: b"OK READ /x", READER: b""}
    denied = [e for e in log(tmp_path) if e.get("event") == "connection" and e.get("verdict") == "denied"]
    assert [e["src"].split(":")[0] for e in denied] == [READER]


def test_proxyd_check_accepts_every_cilium_form_in_the_fixtures(tmp_path: Path) -> None:
    """`proxyd check` on the Cilium-shaped fixture policies: accepted, with only warnings."""
    import subprocess
    import sys

    fixtures = Path(__file__).parent / "policy" / "fixtures"
    identities = (fixtures / "identities" / "namespaces.yaml").read_text()
    config = (
        "listeners:\n  - {name: r2d2, address: '127.0.0.1:0', l7proto: r2d2, upstream: '127.0.0.1:9'}\n"
        "identities:\n" + "".join(f"  {line}\n" for line in identities.splitlines())
        + f"policy:\n  paths: [{fixtures}]\n"
    )  # fmt: skip
    (tmp_path / "proxyd.yaml").write_text(config)
    res = subprocess.run(
        [sys.executable, "-m", "proxyd", "check", "--config", str(tmp_path / "proxyd.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "OK (1 listeners, 10 policy documents)" in res.stdout
    # The selector keys no identities entry carries are named (the fixtures' app/role/env ones).
    assert "selector key 'role': no identities entry carries it" in res.stderr
    assert "k8s:io.kubernetes.pod.namespace" not in res.stderr  # the identities carry it
