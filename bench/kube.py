#!/usr/bin/env python3
# ruff: noqa: E501  (report-building f-strings and table rows read better unwrapped)
"""Kubernetes source benchmark: a cluster of 10,000 pods in 500 namespaces and 1,000 policies.

The stand-in API server of the tests (tests/kube_apiserver.py) serves the cluster on loopback;
proxyd runs as a subprocess (``python -m proxyd run``) with a ``kubernetes`` section pointing
at it, so the numbers are the daemon's own::

    flock /tmp/proxyd-bench.lock .venv/bin/python bench/kube.py             # about a minute
    flock /tmp/proxyd-bench.lock .venv/bin/python bench/kube.py --pods 1000 --namespaces 50 --policies 100
    flock /tmp/proxyd-bench.lock .venv/bin/python bench/kube.py --workers 2   # control process + 2 workers

Measured:

- time to first sync: from the process start to ``/readyz`` 200 (listeners accept only after
  the first full list of identities and policies), and the same for a daemon without the
  ``kubernetes`` section (interpreter start and imports), so the difference is the sync;
- RSS of both daemons (``VmRSS`` from /proc) once ready; with ``--workers N``, of the control
  process and its workers together (each worker holds the whole identity table);
- one policy object event: until ``GET /v1/policy`` shows a new revision (the object is
  validated alone, the set compiled again), median and max over 10;
- one pod event: the sans-IO apply (``ClusterState.apply_pod`` on a 10,000-pod state, median and
  p99 over 2,000 relabels), and end to end through the daemon (the object changed in the
  stand-in until ``GET /v1/identities?ip=`` shows the new labels; median and p99 over 50);
- accept-time identity lookup: the daemon's layered lookup (cluster dict, then static
  prefixes) for a pod address, against today's static ``IdentityMap`` with the same 10,000
  addresses as /32 entries, nanoseconds per lookup (uncached).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

# bench/ (this script's directory) holds http.py, which would shadow the standard library's
# http package that aiohttp imports: take it off the path first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import aiohttp  # noqa: E402

ROOT = _HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from kube_apiserver import FakeApiServer, pod  # noqa: E402

from proxyd.kube.cluster import LayeredIdentities  # noqa: E402
from proxyd.kube.state import ClusterState, Pod  # noqa: E402
from proxyd.policy.identity import IdentityMap  # noqa: E402


def pod_ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def rss_kib(pid: int) -> int:
    """The process's RSS plus its children's (the workers of ``workers: N``)."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in (pid, *map(int, children)):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


async def fill(api: FakeApiServer, pods: int, namespaces: int, policies: int) -> None:
    for n in range(namespaces):
        await api.put("namespaces", {"metadata": {"name": f"ns{n}", "labels": {"team": f"t{n % 7}"}}})
    for i in range(pods):
        ns = f"ns{i % namespaces}"
        await api.put("pods", pod(f"p{i}", pod_ip(i), ns=ns, labels={"app": f"a{i % 50}", "tier": "web"}))
    for k in range(policies):
        ns = f"ns{k % namespaces}"
        await api.put("ciliumnetworkpolicies", {
            "metadata": {"name": f"pol{k}", "namespace": ns},
            "spec": {"endpointSelector": {"matchLabels": {"app": f"a{k % 50}"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"tier": "web"}}],
                                  "toPorts": [{"ports": [{"port": str(1000 + k % 100), "protocol": "TCP"}]}]}]},
        })  # fmt: skip
    api.history = {k: [] for k in api.history}  # the daemon lists; nothing to replay


async def start_daemon(cfg: Path, admin_port: int) -> tuple[subprocess.Popen[bytes], float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "proxyd", "run", "--config", str(cfg)],  # noqa: ASYNC220
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    async with aiohttp.ClientSession() as s:
        for _ in range(6000):
            try:
                async with s.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                    if r.status == 200:
                        return proc, time.perf_counter() - t0
            except aiohttp.ClientError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("proxyd exited")
            await asyncio.sleep(0.01)
    raise RuntimeError("proxyd never became ready")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--namespaces", type=int, default=500)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1, help="workers: N for both daemons")
    args = ap.parse_args()
    workers = f"workers: {args.workers}\n" if args.workers > 1 else ""

    api = FakeApiServer()
    await api.start()
    await fill(api, args.pods, args.namespaces, args.policies)
    tmp = Path(tempfile.mkdtemp(prefix="proxyd-kube-bench."))
    kc = api.kubeconfig(tmp / "kubeconfig")
    rows: list[tuple[str, str]] = []
    procs = []
    try:
        results = {}
        for name, extra in (("static", ""), ("kubernetes", f"kubernetes:\n  kubeconfig: {kc}\n  node_name: n1\n")):
            port = free_port()
            cfg = tmp / f"{name}.yaml"
            listen = free_port() if args.workers > 1 else 0  # workers need a fixed port
            cfg.write_text(f'listeners:\n  - name: l\n    address: "127.0.0.1:{listen}"\nadmin:\n  address: "127.0.0.1:{port}"\n{workers}{extra}')
            proc, ready = await start_daemon(cfg, port)
            procs.append(proc)
            results[name] = (proc, ready, port)
        k_proc, k_ready, k_port = results["kubernetes"]
        s_proc, s_ready, _ = results["static"]
        if args.workers > 1:
            rows.append(("workers (control process + N; RSS is all of them)", str(args.workers)))
        rows.append(("time to ready, no kubernetes section (interpreter, imports)", f"{s_ready:.2f} s"))
        rows.append((f"time to ready after the first full sync ({args.pods} pods, {args.namespaces} namespaces, {args.policies} policies)", f"{k_ready:.2f} s"))
        rows.append(("RSS once ready, no kubernetes section", f"{rss_kib(s_proc.pid) / 1024:.1f} MiB"))
        rows.append(("RSS once ready, with the cluster", f"{rss_kib(k_proc.pid) / 1024:.1f} MiB"))

        # one pod event, end to end through the daemon
        lat = []
        async with aiohttp.ClientSession() as s:
            for j in range(50):
                want = f"r{j}"
                t0 = time.perf_counter()
                await api.put("pods", pod("p7", pod_ip(7), ns=f"ns{7 % args.namespaces}", labels={"app": want, "tier": "web"}))
                for _ in range(5000):
                    async with s.get(f"http://127.0.0.1:{k_port}/v1/identities?ip={pod_ip(7)}") as r:
                        if (await r.json())["labels"].get("k8s:app") == want:
                            break
                lat.append(time.perf_counter() - t0)
        rows.append(("pod event, end to end (API change until /v1/identities shows it), median / p99",
                     f"{statistics.median(lat) * 1e3:.2f} / {pct(lat, 0.99) * 1e3:.2f} ms"))

        # one policy object event (validated alone, the set compiled again), end to end
        plat = []
        async with aiohttp.ClientSession() as s:
            for j in range(10):
                async with s.get(f"http://127.0.0.1:{k_port}/v1/policy") as r:
                    before = (await r.json())["revision"]
                t0 = time.perf_counter()
                await api.put("ciliumnetworkpolicies", {
                    "metadata": {"name": "pol0", "namespace": "ns0"},
                    "spec": {"endpointSelector": {"matchLabels": {"app": f"e{j}"}}, "ingress": [{}]},
                })  # fmt: skip
                for _ in range(20000):
                    async with s.get(f"http://127.0.0.1:{k_port}/v1/policy") as r:
                        if (await r.json())["revision"] != before:
                            break
                plat.append(time.perf_counter() - t0)
        rows.append((f"policy object event, end to end (until the revision moves; {args.policies} policies), median / max",
                     f"{statistics.median(plat) * 1e3:.0f} / {max(plat) * 1e3:.0f} ms"))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        await api.stop()

    # sans-IO apply on a full state
    state = ClusterState()
    state.replace_namespaces({f"ns{n}": {"team": f"t{n % 7}"} for n in range(args.namespaces)})
    state.replace_pods(Pod(f"u{i}", f"ns{i % args.namespaces}", f"p{i}", {"app": f"a{i % 50}", "tier": "web"}, ips=(pod_ip(i),))
                       for i in range(args.pods))  # fmt: skip
    times = []
    for j in range(2000):
        i = j % args.pods
        rec = Pod(f"u{i}", f"ns{i % args.namespaces}", f"p{i}", {"app": f"x{j % 3}", "tier": "web"}, ips=(pod_ip(i),))
        t0 = time.perf_counter()
        state.apply_pod("MODIFIED", rec)
        times.append(time.perf_counter() - t0)
    rows.append(("pod event, sans-IO apply (ClusterState.apply_pod), median / p99",
                 f"{statistics.median(times) * 1e6:.1f} / {pct(times, 0.99) * 1e6:.1f} us"))

    # accept-time lookup (uncached): layered (cluster dict, then static) vs static /32 entries
    from proxyd.config import KubernetesConfig
    from proxyd.kube.cluster import KubeSource

    src = KubeSource(KubernetesConfig(node_name="n1", identities=False, policies=False), on_change=lambda ips: None,
                     on_state=lambda up, t: None, log_warning=lambda *a, **k: None, client=object())  # fmt: skip
    src.state = state
    static = IdentityMap.from_entries([(f"{pod_ip(i)}/32", {"app": f"a{i % 50}"}) for i in range(args.pods)])
    layered = LayeredIdentities(src, IdentityMap.from_entries([("10.0.0.0/8", {"static": "x"})]))
    ips = [pod_ip(i) for i in range(0, args.pods, 7)]
    n = 20

    def run(f):  # type: ignore[no-untyped-def]
        return min(timeit.repeat(lambda: [f(ip) for ip in ips], number=n, repeat=3)) / (n * len(ips)) * 1e9

    rows.append(("accept-time lookup, layered cluster + static (uncached)", f"{run(layered.labels_for):.0f} ns"))
    rows.append((f"accept-time lookup, static IdentityMap with {args.pods} /32 entries (uncached)", f"{run(static.labels_for):.0f} ns"))

    out = ["| measure | value |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]]
    text = "\n".join(out)
    print(text)
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"kube-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(
        f"`python bench/kube.py --pods {args.pods} --namespaces {args.namespaces} --policies {args.policies} --workers {args.workers}`\n\n{text}\n"
    )


if __name__ == "__main__":
    asyncio.run(main())
