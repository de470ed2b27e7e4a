"""The policy through the parser harness: r2d2 requests allowed and denied, reloads mid-connection."""

from __future__ import annotations

import os
from pathlib import Path

from policy_helpers import REGISTRY

from proxyd.policy.store import PolicyStore
from proxyd.testing import Harness

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: r2d2-demo}}
spec:
  endpointSelector: {{matchLabels: {{app: r2d2-server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        l7proto: r2d2
        l7:
        - cmd: {cmd}
          file: "^/public/"
        - cmd: HALT
"""


def test_allowed_and_denied_requests_and_a_reload_between_them(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY.format(cmd="READ"))
    store = PolicyStore(REGISTRY, [f])
    view = store.view("ingress", {"app": "r2d2-server"}, "10.0.0.1", {"app": "client"}, 80, "r2d2")
    assert view.l4().l4_allowed
    h = Harness(REGISTRY.get("r2d2"), policy=view)
    h.feed(b"READ /public/a\r\nWRITE /public/a\r\nHALT\r\n")
    assert h.forwarded[False] == b"READ /public/a\r\nHALT\r\n"
    assert h.to_client == b""  # the ERROR waits for the reply to the READ before it
    h.feed(b"OK a\r\nOK halt\r\n", reply=True)
    assert h.to_client == b"OK a\r\nERROR\r\nOK halt\r\n"
    assert [(e.verdict, e.policy) for e in h.log] == [
        ("forwarded", "r2d2-demo"),
        ("denied", "r2d2-demo"),
        ("forwarded", "r2d2-demo"),
    ]
    f.write_text(POLICY.format(cmd="WRITE"))
    os.utime(f, ns=(f.stat().st_mtime_ns + 10**9,) * 2)
    assert store.watch_mtimes()
    store.reload_files()
    h.feed(b"READ /public/a\r\nWRITE /public/b\r\n")
    assert h.forwarded[False].endswith(b"HALT\r\nWRITE /public/b\r\n")
    assert h.to_client == b"OK a\r\nERROR\r\nOK halt\r\nERROR\r\n"  # nothing outstanding: at once
    assert not h.closed


def test_audit_mode_forwards_and_logs_audit(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY.format(cmd="READ"))
    store = PolicyStore(REGISTRY, [f])
    view = store.view(
        "ingress", {"app": "r2d2-server"}, "10.0.0.1", {"app": "client"}, 80, "r2d2", audit=True
    )
    h = Harness(REGISTRY.get("r2d2"), policy=view)
    h.feed(b"WRITE /x\r\n")
    assert h.forwarded[False] == b"WRITE /x\r\n"
    assert [(e.verdict, e.policy) for e in h.log] == [("audit", "r2d2-demo")]
