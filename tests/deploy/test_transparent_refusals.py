"""Transparent mode under real NAT (root; a namespace made by the test).

A redirected connection reaches its original destination through proxyd, whose own upstream
connection is excluded from the redirect by SO_MARK. Where NAT rules are loaded, SO_ORIGINAL_DST
of a connection that was NOT redirected answers the listener's own address; proxyd must refuse
it, and must refuse a redirected connection whose original destination is one of its own
listeners, and its own upstream connection when a rule without exclusion sends it back, or it
builds a loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from needs import need_root
from netns_support import netns, sh

CLIENT = textwrap.dedent(
    """
    import json, socket, sys, threading
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 7000)); srv.listen(8)
    def serve():
        while True:
            c, _ = srv.accept()
            data = c.recv(100)
            c.sendall(b"server got " + data)
            c.close()
    threading.Thread(target=serve, daemon=True).start()
    out = {}
    for name, port in (("redirected", 7000), ("direct", 15001), ("loop", 15002), ("selfloop", 7001)):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"READ /x\\r\\n")
        try:
            out[name] = s.recv(100).decode()
        except OSError as e:
            out[name] = "error: " + str(e)
        s.close()
    print(json.dumps(out))
    """
)


def test_not_redirected_and_loop_are_refused_under_nat(tmp_path: Path) -> None:
    need_root()
    with netns() as ns:
        cfg = tmp_path / "proxyd.yaml"
        cfg.write_text(
            textwrap.dedent("""
            listeners:
              - name: transparent
                address: "127.0.0.1:15001"
                l7proto: r2d2
              - name: other
                address: "127.0.0.1:15002"
                upstream: "127.0.0.1:7000"
            upstream_mark: 1
            access_log:
              path: access.log
            admin:
              address: "127.0.0.1:9901"
            """)
        )
        rules = "*nat\n"
        # Port 7001 is redirected even for proxyd's own marked upstream connections (no
        # exclusion): the daemon must recognise its own connection coming back and refuse it.
        rules += "-A OUTPUT -p tcp -d 127.0.0.1 --dport 7001 -j REDIRECT --to-ports 15001\n"
        rules += "-A OUTPUT -p tcp -m mark --mark 1 -j RETURN\n"
        rules += "-A OUTPUT -p tcp -d 127.0.0.1 --dport 7000 -j REDIRECT --to-ports 15001\n"
        rules += "-A OUTPUT -p tcp -d 127.0.0.1 --dport 15002 -j REDIRECT --to-ports 15001\n"
        rules += "COMMIT\n"
        sh("iptables-restore", "-w", "--noflush", ns=ns, stdin=rules)
        daemon = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "proxyd", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            for _ in range(200):
                ok = subprocess.run(
                    ["ip", "netns", "exec", ns, sys.executable, "-c",
                     "import urllib.request as u; u.urlopen('http://127.0.0.1:9901/readyz', timeout=1)"],
                    capture_output=True, check=False,
                )  # fmt: skip
                if ok.returncode == 0:
                    break
                assert daemon.poll() is None, daemon.stderr.read().decode() if daemon.stderr else ""
                time.sleep(0.05)
            out = json.loads(sh(sys.executable, "-c", CLIENT, ns=ns))
        finally:
            daemon.terminate()
            daemon.wait(10)
    assert out["redirected"] == "server got READ /x\r\n"
    assert out["direct"] in ("", "error: [Errno 104] Connection reset by peer")
    assert out["loop"] in ("", "error: [Errno 104] Connection reset by peer")
    assert out["selfloop"] in ("", "error: [Errno 104] Connection reset by peer")
    conns = [
        json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines() if '"connection"' in x
    ]
    reasons = sorted(c.get("reason", "") for c in conns if c["verdict"] == "denied")
    assert reasons == [
        "loop: original destination 127.0.0.1:15002 is a proxyd listener",
        "loop: this is proxyd's own upstream connection, redirected back to it",
        "not redirected: original destination is the listener itself",
    ], conns
