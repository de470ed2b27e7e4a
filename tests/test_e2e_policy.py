"""Policy through the daemon: L7 and L3/L4 enforcement, audit, reloads, admin API, CLI."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from proxyutil import addr, daemon, r2d2_server, tcp_server, wait_for, write_atomic

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: r2d2-policy
spec:
  endpointSelector:
    matchLabels: {app: r2d2}
  ingress:
    - fromEndpoints:
        - matchLabels: {role: reader}
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            l7proto: r2d2
            l7:
              - cmd: READ
                file: "^/public/"
    - fromEndpoints:
        - matchLabels: {role: admin}
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            l7proto: r2d2
            l7: [{}]
"""

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
    labels: {{role: admin}}
policy:
  paths: [policy.yaml]
  mode: {mode}
access_log:
  path: access.log
admin:
  address: "127.0.0.1:0"
"""


def setup(up: tuple[str, int], mode: str = "enforce") -> tuple[str, dict[str, str]]:
    return (
        CONFIG.format(host=up[0], port=up[1], mode=mode),
        {"policy.yaml": POLICY.replace("PORT", str(up[1]))},
    )


async def client(d_addr: tuple[str, int], src: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*d_addr, local_addr=(src, 0))


async def ask(r: asyncio.StreamReader, w: asyncio.StreamWriter, line: bytes) -> bytes:
    w.write(line + b"\r\n")
    await w.drain()
    return (await asyncio.wait_for(r.readline(), 5)).rstrip(b"\r\n")


def log_lines(tmp_path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]


async def test_allowed_and_denied_clients_side_by_side(tmp_path: Path) -> None:
    up_server = tcp_server(r2d2_server, "127.0.0.1")
    async with up_server as up:
        text, files = setup(up)
        async with daemon(text, tmp_path, files=files) as d:
            reader = await client(addr(d, "r2d2"), "127.0.0.2")
            admin = await client(addr(d, "r2d2"), "127.0.0.3")
            assert await ask(*reader, b"READ /public/a") == b"OK READ /public/a"
            assert await ask(*admin, b"READ /secret/b") == b"OK READ /secret/b"
            assert await ask(*reader, b"READ /secret/b") == b"ERROR"  # denied, connection kept
            assert await ask(*reader, b"HALT") == b"ERROR"
            assert await ask(*reader, b"READ /public/c") == b"OK READ /public/c"
            assert await ask(*admin, b"HALT") == b"OK HALT"
            # Pipelined: the ERROR takes the denied request's place among the replies.
            r, w = reader
            w.write(b"READ /public/1\r\nWRITE /x\r\nREAD /public/2\r\n")
            lines = [await asyncio.wait_for(r.readline(), 5) for _ in range(3)]
            assert lines == [b"OK READ /public/1\r\n", b"ERROR\r\n", b"OK READ /public/2\r\n"]
            for _, w in (reader, admin):
                w.close()
            await wait_for(lambda: not d.active_connections())
            metrics = d.metrics.render().decode()
    assert 'proxyd_l7_requests_total{l7proto="r2d2",verdict="denied"} 3.0' in metrics
    denied = [e for e in log_lines(tmp_path) if e.get("verdict") == "denied"]
    assert {e["fields"]["file"] for e in denied} == {"/secret/b", "", "/x"}
    assert all(e["policy"] == "r2d2-policy" and e["src"].startswith("127.0.0.2:") for e in denied)


async def test_l3_l4_denial_at_accept(tmp_path: Path) -> None:
    async with tcp_server(r2d2_server) as up:
        text, files = setup(up)
        async with daemon(text, tmp_path, files=files) as d:
            r, w = await client(addr(d, "r2d2"), "127.0.0.9")  # no labels: not allowed in
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            metrics = d.metrics.render().decode()
    assert 'proxyd_connection_denials_total{listener="r2d2"} 1.0' in metrics
    (conn,) = [e for e in log_lines(tmp_path) if e["event"] == "connection"]
    assert conn["verdict"] == "denied" and conn["reason"].startswith("policy")


async def test_audit_mode_forwards_and_logs(tmp_path: Path) -> None:
    async with tcp_server(r2d2_server) as up:
        text, files = setup(up, mode="audit")
        async with daemon(text, tmp_path, files=files) as d:
            reader = await client(addr(d, "r2d2"), "127.0.0.2")
            assert await ask(*reader, b"READ /secret/b") == b"OK READ /secret/b"
            reader[1].close()
            await wait_for(lambda: not d.active_connections())
    audit = [e for e in log_lines(tmp_path) if e.get("verdict") == "audit"]
    assert audit and audit[0]["fields"]["file"] == "/secret/b" and audit[0]["policy"] == "r2d2-policy"


async def test_reload_under_live_traffic(tmp_path: Path) -> None:
    """50 connections keep sending while the policy changes: none is lost, and the next request
    of each gets the new verdict."""
    async with tcp_server(r2d2_server) as up:
        text, files = setup(up)
        async with daemon(text, tmp_path, files=files) as d:
            conns = [await client(addr(d, "r2d2"), "127.0.0.2") for _ in range(50)]
            for c in conns:
                assert await ask(*c, b"READ /public/x") == b"OK READ /public/x"
                assert await ask(*c, b"READ /private/x") == b"ERROR"
            stop = asyncio.Event()
            errors: list[str] = []

            async def traffic(c: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
                for _ in range(200):  # bounded
                    if stop.is_set():
                        return
                    got = await ask(*c, b"READ /public/x")
                    if got != b"OK READ /public/x":
                        errors.append(got.decode())

            tasks = [asyncio.create_task(traffic(c)) for c in conns]
            await asyncio.sleep(0.05)
            revision = d.policy.revision
            write_atomic(
                tmp_path / "policy.yaml",
                files["policy.yaml"].replace('file: "^/public/"', 'file: "^/(public|private)/"'),
            )
            assert d.reload_policy("test")
            assert d.policy.revision == revision + 1
            stop.set()
            await asyncio.gather(*tasks)
            assert errors == []
            for c in conns:  # every connection survived and sees the new policy
                assert await ask(*c, b"READ /private/x") == b"OK READ /private/x"
            # A broken policy is rejected whole; the old one stays in force.
            write_atomic(tmp_path / "policy.yaml", "apiVersion: cilium.io/v2\nkind: Nope\n")
            assert not d.reload_policy("test")
            assert d.policy.revision == revision + 1
            assert await ask(*conns[0], b"READ /private/y") == b"OK READ /private/y"
            assert await ask(*conns[0], b"HALT") == b"ERROR"
            metrics = d.metrics.render().decode()
            # The file watcher sees the same rename and may reject the file again by the time
            # the metrics are read (each rejected attempt is counted): at least this one.
            failures = re.search(r'proxyd_policy_reloads_total\{result="failure"\} ([0-9.]+)', metrics)
            assert failures is not None and float(failures.group(1)) >= 1
            assert f"proxyd_policy_revision {revision + 1}.0" in metrics
            for _, w in conns:
                w.close()


async def test_policy_file_change_is_picked_up(tmp_path: Path) -> None:
    async with tcp_server(r2d2_server) as up:
        text, files = setup(up)
        async with daemon(text, tmp_path, files=files) as d:
            c = await client(addr(d, "r2d2"), "127.0.0.2")
            assert await ask(*c, b"HALT") == b"ERROR"
            revision = d.policy.revision
            (tmp_path / "policy.yaml").write_text(
                files["policy.yaml"].replace(
                    "l7:\n              - cmd: READ",
                    "l7:\n              - cmd: HALT\n              - cmd: READ",
                )
            )
            await wait_for(lambda: d.policy.revision > revision, timeout=10)
            assert await ask(*c, b"HALT") == b"OK HALT"
            c[1].close()


async def test_admin_policy_api(tmp_path: Path) -> None:
    async with tcp_server(r2d2_server) as up:
        text, files = setup(up)
        text += "  token_file: admin.token\n"
        files["admin.token"] = "s3cret-token\n"
        auth = {"Authorization": "Bearer s3cret-token"}
        async with daemon(text, tmp_path, files=files) as d:
            host, port = d.admin_address()  # type: ignore[misc]
            base = f"http://{host}:{port}/v1/policy"
            c = await client(addr(d, "r2d2"), "127.0.0.2")
            assert await ask(*c, b"WRITE /public/a") == b"ERROR"
            headers = {**auth, "Content-Type": "application/yaml"}
            async with aiohttp.ClientSession(headers=headers) as http:
                bad = (
                    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                    "metadata: {name: x}\nspec:\n  toFQDNs: []\n"
                )
                async with http.put(base, data=bad) as resp:
                    assert resp.status == 400
                    errors = (await resp.json())["errors"]
                assert any("toFQDNs" in e for e in errors)
                assert await ask(*c, b"WRITE /public/a") == b"ERROR"  # old policy still enforced
                extra = (
                    POLICY.replace("r2d2-policy", "writers")
                    .replace("PORT", str(up[1]))
                    .replace("cmd: READ", "cmd: WRITE")
                )
                async with http.put(base, data=extra) as resp:
                    assert resp.status == 200
                    revision = (await resp.json())["revision"]
                assert await ask(*c, b"WRITE /public/a") == b"OK WRITE /public/a"
                async with http.get(base) as resp:
                    body = await resp.json()
                assert body["revision"] == revision
                assert {doc["name"] for doc in body["documents"]} == {"r2d2-policy", "writers"}
                async with http.delete(f"{base}/writers", headers=auth) as resp:
                    assert resp.status == 200
                assert await ask(*c, b"WRITE /public/a") == b"ERROR"
                async with http.delete(f"{base}/writers", headers=auth) as resp:
                    assert resp.status == 404
            c[1].close()


def test_check_reports_bad_policy(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(
        POLICY.replace("PORT", "9000").replace('file: "^/public/"', 'file: "^/(public"')
    )
    (tmp_path / "proxyd.yaml").write_text(CONFIG.format(host="127.0.0.1", port=9000, mode="enforce"))
    res = subprocess.run([sys.executable, "-m", "proxyd", "check", "--config", str(tmp_path / "proxyd.yaml")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1
    assert "policy.yaml:18:" in res.stderr and "file" in res.stderr and "regular expression" in res.stderr


def test_explain_cli(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY.replace("PORT", "9000"))
    (tmp_path / "proxyd.yaml").write_text(CONFIG.format(host="127.0.0.1", port=9000, mode="enforce"))
    cmd = [
        "explain",
        "--config",
        str(tmp_path / "proxyd.yaml"),
        "--src",
        "127.0.0.2",
        "--dst",
        "127.0.0.1:9000",
    ]
    res = subprocess.run([sys.executable, "-m", "proxyd", *cmd],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "role: reader" in res.stdout or "role=reader" in res.stdout
    assert "cmd: READ" in res.stdout and "L3/L4 verdict: allowed" in res.stdout


async def test_policy_cli_import_get_delete(tmp_path: Path) -> None:
    """`proxyd policy import/get/delete` against the running daemon's admin API."""
    from proxyd.cli import main as cli

    async with tcp_server(r2d2_server) as up:
        text, files = setup(up)
        text += "  token_file: admin.token\n"
        files["admin.token"] = "cli-token\n"
        async with daemon(text, tmp_path, files=files) as d:
            host, port = d.admin_address()  # type: ignore[misc]
            pol = ["policy", "--admin", f"{host}:{port}", "--token-file", str(tmp_path / "admin.token")]
            c = await client(addr(d, "r2d2"), "127.0.0.2")
            assert await ask(*c, b"WRITE /public/a") == b"ERROR"
            good = tmp_path / "writers.yaml"
            good.write_text(
                POLICY.replace("r2d2-policy", "writers")
                .replace("PORT", str(up[1]))
                .replace("cmd: READ", "cmd: WRITE")
            )
            assert await asyncio.to_thread(cli, [*pol, "import", str(good)]) == 0
            assert await ask(*c, b"WRITE /public/a") == b"OK WRITE /public/a"
            bad = tmp_path / "bad.json"
            bad.write_text('[{"endpointSelector": {}, "ingress": [{"toFQDNs": []}]}]')
            assert await asyncio.to_thread(cli, [*pol, "import", str(bad)]) == 1
            assert await ask(*c, b"WRITE /public/a") == b"OK WRITE /public/a"  # old policy kept
            assert await asyncio.to_thread(cli, [*pol, "get"]) == 0
            assert await asyncio.to_thread(cli, [*pol, "delete", "writers"]) == 0
            assert await ask(*c, b"WRITE /public/a") == b"ERROR"
            assert await asyncio.to_thread(cli, [*pol, "delete", "writers"]) == 1
            c[1].close()


async def test_per_listener_audit_mode(tmp_path: Path) -> None:
    async with tcp_server(r2d2_server) as up:
        text, files = setup(up)
        text = text.replace("l7proto: r2d2\n", "l7proto: r2d2\n    policy_mode: audit\n", 1)
        async with daemon(text, tmp_path, files=files) as d:
            reader = await client(addr(d, "r2d2"), "127.0.0.2")
            assert await ask(*reader, b"WRITE /x") == b"OK WRITE /x"  # audited, forwarded
            reader[1].close()
            await wait_for(lambda: not d.active_connections())
    (audit,) = [e for e in log_lines(tmp_path) if e.get("verdict") == "audit"]
    assert audit["fields"] == {"cmd": "WRITE", "file": "/x"}


def test_admin_refuses_non_loopback_unless_allowed(tmp_path: Path) -> None:
    from proxyd.config import parse_config
    from proxyd.errors import ConfigError
    from proxyd.registry import Registry

    base = 'listeners:\n  - name: a\n    address: "127.0.0.1:0"\n    upstream: "127.0.0.1:1"\n'
    cfg = tmp_path / "c.yaml"
    with pytest.raises(ConfigError) as err:
        parse_config(base + 'admin:\n  address: "0.0.0.0:9901"\n', cfg, Registry.load())
    assert err.value.problems == [
        f"{cfg}:6: admin.address: 0.0.0.0 is not a loopback address; "
        "set admin.allow_remote: true to expose the admin API"
    ]
    ok = parse_config(
        base + 'admin:\n  address: "0.0.0.0:9901"\n  allow_remote: true\n', cfg, Registry.load()
    )
    assert ok.admin is not None and ok.admin.allow_remote
