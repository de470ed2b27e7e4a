"""One connection driven through the daemon's own policy store, context and access log, no socket.

The native-equivalence tests of every twin (memcache, redis, http) run the same traffic through
both implementations this way, with a policy reload half way, and compare what each left behind:
the L7 counters, both byte streams, the access-log lines and the engine's error. Written once so
the three compare exactly the same things.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proxyd.accesslog import AccessLog
from proxyd.context import ConnInfo, Context
from proxyd.metrics import Metrics
from proxyd.parser import Endpoint
from proxyd.policy.store import PolicyStore
from proxyd.registry import Registry
from proxyd.testing import engine_class

Schedule = list[tuple[bool, bytes]]

_DOC = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: equiv}}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  ingress:
    - fromEndpoints: [{{matchLabels: {{role: client}}}}]
      toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules:
{rules}
"""


def policy_doc(protocol: str, app: str, port: int, rules: list[str]) -> str:
    """The policy :func:`run_live` is given: ``rules`` on ``app``'s port, for role=client.

    http rules sit under ``rules.http`` as Cilium writes them; other protocols under the
    generic ``l7proto``/``l7`` pair.
    """
    joined = ", ".join(rules)
    if protocol == "http":
        block = f"            http: [{joined}]"
    else:
        block = f"            l7proto: {protocol}\n            l7: [{joined}]"
    return _DOC.format(app=app, port=port, rules=block)


def run_live(
    factory: Any, protocol: str, app: str, port: int,
    impl: str, docs: list[str], audit: bool, mode: str, sched: Schedule, tmp: Path,
) -> tuple[tuple[Any, ...], Any]:  # fmt: skip
    """Feed ``sched`` to a ``protocol`` connection on ``impl`` under ``docs[0]``, then ``docs[1]``.

    Returns ``((l7 counts, (to server, to client), log lines, error), parser)``; the policy file
    is rewritten and reloaded when half the schedule has been fed (a reload mid-connection
    applies from the next request).
    """
    labels = {"app": app, "role": "client"}
    pfile = tmp / f"{impl}-policy.yaml"
    pfile.write_text(docs[0])
    store = PolicyStore(Registry.load(), [pfile])
    store.reload_files()
    view = store.view("ingress", labels, "10.0.0.1", labels, port, protocol, audit)
    path = tmp / f"{impl}-live.log"
    metrics = Metrics()
    log = AccessLog(str(path), mode, metrics)
    out: list[tuple[bool, bytes]] = []
    eng = engine_class(impl)(None, lambda reply, data: out.append((reply, bytes(data))))
    info = ConnInfo(7, app, "ingress", Endpoint("10.0.0.1", 1, labels), Endpoint("10.0.0.2", port, labels),
                    protocol)  # fmt: skip
    ctx = Context(info, eng, view, log)
    eng.parser = factory.create(ctx, factory.validate_config({}))
    half = len(sched) // 2
    for i, (reply, chunk) in enumerate(sched):
        if i == half and len(docs) > 1:
            pfile.write_text(docs[1])
            store.reload_files()
        eng.feed(reply, chunk)
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line.pop("timestamp")
    err = eng.error
    streams = (b"".join(d for r, d in out if r), b"".join(d for r, d in out if not r))
    result = (dict(metrics.l7_counts), streams, lines, None if err is None else (err.kind, str(err)))
    return result, eng.parser
