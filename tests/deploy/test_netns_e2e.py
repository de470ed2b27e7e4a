"""End to end through the real daemon in network namespaces (root): a client namespace and a server
namespace joined by a veth pair, an r2d2 server, and ``python -m proxyd run`` with the rules from
:func:`proxyd.iptables.apply`.

- node daemon, inbound: traffic to the server's real address and port (IPv4 and IPv6) is proxied
  and policy-checked, other ports are untouched;
- client-side daemon, outbound: the client's connections are proxied, and proxyd's own upstream
  connections (SO_MARK ``upstream_mark``) are not redirected back into it;
- ``remove`` restores the saved nat tables exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import need_root
from netns_support import Pair, saved_rules, sh, veth_pair

from proxyd.iptables import apply, redirects_from_listeners, remove

pytestmark = pytest.mark.root

PROXIED, DIRECT, LISTEN, ADMIN = 4000, 4001, 15001, 9901
REPO = Path(__file__).resolve().parents[2]

# Replies "OK <file> from <peer address>" so a test sees whether proxyd or the client connected.
SERVER = textwrap.dedent("""
    import socket, socketserver, sys
    class H(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                parts = line.decode().split()
                arg = parts[1] if len(parts) > 1 else ""
                peer = self.client_address[0].removeprefix("::ffff:")
                self.wfile.write(f"OK {arg} from {peer}\\r\\n".encode())
    class S(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6
        allow_reuse_address = True
        daemon_threads = True
        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()
    import threading
    servers = [S(("::", int(p)), H) for p in sys.argv[1:]]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()
""")

# argv: host port line...; prints the reply line of each request as a JSON list.
CLIENT = textwrap.dedent("""
    import json, socket, sys
    host, port, lines = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    out = []
    with socket.create_connection((host, port), timeout=5) as s:
        f = s.makefile("rb")
        for ln in lines:
            s.sendall(ln.encode() + b"\\r\\n")
            out.append(f.readline().decode().rstrip("\\r\\n"))
    print(json.dumps(out))
""")

WAIT_READY = textwrap.dedent("""
    import sys, time, urllib.request
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200:
                sys.exit(0)
        except OSError:
            time.sleep(0.05)
    sys.exit(1)
""")


def policy(direction: str, local: str, remote: str) -> str:
    peers = "fromEndpoints" if direction == "ingress" else "toEndpoints"
    return textwrap.dedent(f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: r2d2-{direction}
        spec:
          endpointSelector:
            matchLabels: {{app: {local}}}
          {direction}:
            - {peers}:
                - matchLabels: {{app: {remote}}}
              toPorts:
                - ports: [{{port: "{PROXIED}", protocol: TCP}}]
                  rules:
                    l7proto: r2d2
                    l7:
                      - cmd: READ
                        file: "^/public/"
    """)


def config(p: Pair, *, direction: str, redirect: str, mark: int | None) -> str:
    return textwrap.dedent(f"""
        {f"upstream_mark: {mark}" if mark else ""}
        listeners:
          - name: r2
            address: "[::]:{LISTEN}"
            l7proto: r2d2
            upstream: original-destination
            direction: {direction}
            redirect:
              ports: [{PROXIED}]
              direction: {redirect}
        identities:
          - {{cidr: {p.srv4}/32, labels: {{app: server}}}}
          - {{cidr: {p.srv6}/128, labels: {{app: server}}}}
          - {{cidr: {p.cli4}/32, labels: {{app: client}}}}
          - {{cidr: {p.cli6}/128, labels: {{app: client}}}}
        policy:
          paths: [policy.yaml]
        admin:
          address: "127.0.0.1:{ADMIN}"
    """)


class Daemon:
    def __init__(self, ns: str, workdir: Path, cfg: str, pol: str) -> None:
        (workdir / "proxyd.yaml").write_text(cfg)
        (workdir / "policy.yaml").write_text(pol)
        self.log = workdir / "proxyd.out"
        self.cfg_path = workdir / "proxyd.yaml"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with self.log.open("wb") as out:
            cmd = [sys.executable, "-m", "proxyd", "run", "--config", str(self.cfg_path)]
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir
            )
        url = f"http://127.0.0.1:{ADMIN}/readyz"
        ready = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", WAIT_READY, url, "15"], check=False
        )
        if ready.returncode != 0:
            self.stop()
            raise AssertionError(f"proxyd never became ready:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.output().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[tuple[Pair, Path]]:
    need_root()
    with veth_pair() as p:
        (tmp_path / "server.py").write_text(SERVER)
        (tmp_path / "client.py").write_text(CLIENT)
        cmd = [sys.executable, str(tmp_path / "server.py"), str(PROXIED), str(DIRECT)]
        server = subprocess.Popen(["ip", "netns", "exec", p.srv, *cmd], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
            yield p, tmp_path
        finally:
            server.kill()
            server.wait()
            if server.stdout:
                server.stdout.close()


def request(p: Pair, tmp: Path, host: str, port: int, *lines: str) -> list[str]:
    out = sh(sys.executable, str(tmp / "client.py"), host, str(port), *lines, ns=p.cli)
    result: list[str] = json.loads(out)
    return result


def test_node_daemon_inbound_v4_v6(topo: tuple[Pair, Path]) -> None:
    p, tmp = topo
    before = {fam: saved_rules(p.srv, fam) for fam in (4, 6)}
    d = Daemon(p.srv, tmp, config(p, direction="ingress", redirect="inbound", mark=None),
               policy("ingress", "server", "client"))  # fmt: skip
    try:
        from proxyd.config import load_config

        redirects = redirects_from_listeners(load_config(d.cfg_path).listeners)
        apply(redirects, None, None, ipv6=True, netns=p.srv)
        for host in (p.srv4, p.srv6):
            # proxied: the server sees proxyd (a local address) as its peer; denied requests
            # get r2d2's ERROR from proxyd and the connection stays usable
            assert request(p, tmp, host, PROXIED, "READ /public/a", "READ /secret", "READ /public/b") == [
                f"OK /public/a from {host}", "ERROR", f"OK /public/b from {host}",
            ]  # fmt: skip
            # another port is untouched: the client talks to the server directly
            cli = p.cli4 if host == p.srv4 else p.cli6
            assert request(p, tmp, host, DIRECT, "READ /secret") == [f"OK /secret from {cli}"]
        remove(netns=p.srv)
        assert {fam: saved_rules(p.srv, fam) for fam in (4, 6)} == before
        # without the rules the proxied port is reached directly again
        assert request(p, tmp, p.srv4, PROXIED, "READ /secret") == [f"OK /secret from {p.cli4}"]
    finally:
        remove(netns=p.srv)
        code = d.stop()
    denied = [e for e in d.events() if e.get("event") == "l7" and e.get("verdict") == "denied"]
    assert len(denied) == 2, d.output()
    assert code == 0, d.output()


def test_client_daemon_outbound_with_mark_does_not_loop(topo: tuple[Pair, Path]) -> None:
    p, tmp = topo
    before = {fam: saved_rules(p.cli, fam) for fam in (4, 6)}
    d = Daemon(p.cli, tmp, config(p, direction="egress", redirect="outbound", mark=0x10),
               policy("egress", "client", "server"))  # fmt: skip
    try:
        from proxyd.config import load_config

        cfg = load_config(d.cfg_path)
        apply(redirects_from_listeners(cfg.listeners), None, cfg.upstream_mark, ipv6=True, netns=p.cli)
        for host, cli in ((p.srv4, p.cli4), (p.srv6, p.cli6)):
            assert request(p, tmp, host, PROXIED, "READ /public/a", "READ /secret") == [
                f"OK /public/a from {cli}", "ERROR",
            ]  # fmt: skip
            assert request(p, tmp, host, DIRECT, "READ /secret") == [f"OK /secret from {cli}"]
        time.sleep(0.2)
        conns = [e for e in d.events() if e.get("event") == "connection"]
        # two proxied client connections; a loop would show hundreds
        assert len(conns) <= 2, d.output()
        remove(netns=p.cli)
        assert {fam: saved_rules(p.cli, fam) for fam in (4, 6)} == before
    finally:
        remove(netns=p.cli)
        code = d.stop()
    assert code == 0, d.output()
