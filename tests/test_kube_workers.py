"""``workers: 2`` with a ``kubernetes`` section, end to end: a `proxyd run` subprocess (control
process and two workers) in front of a real memcached, reading pods and CiliumNetworkPolicy
objects from the stand-in API server (driven by the real lightkube client in the control
process). Clients connect from pod addresses on loopback (127.0.0.23...).

Which worker held an accepted connection is read from the kernel (``ss``, as in
test_workers.py); which worker refused one, from its own log line (workers log with their pid).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kube_apiserver import FakeApiServer, pod
from memcached_fixture import start_memcached
from needs import free_port
from test_harden import Proxyd
from test_workers import _answers, ask, held_by, holder, metric, wait_until, worker_pids

T = TypeVar("T")
CLIENT = "127.0.0.23"
OTHER = "127.0.0.24"


class ApiThread:
    """The stand-in API server on its own event loop in a thread: the test itself is blocking."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> FakeApiServer:
            api = FakeApiServer()
            await api.start()
            return api

        self.api = self.call(make())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def put(self, plural: str, obj: dict[str, Any]) -> None:
        self.call(self.api.put(plural, obj))

    def delete(self, plural: str, name: str, namespace: str = "") -> None:
        self.call(self.api.delete(plural, name, namespace))

    def close(self) -> None:
        self.call(self.api.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def api() -> Iterator[ApiThread]:
    a = ApiThread()
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def memcached() -> Iterator[int]:
    with start_memcached() as port:
        yield port


def cnp(port: int, prefix: str) -> dict[str, Any]:
    """Clients (app=client) may ``get`` keys under ``prefix`` from the cache pods."""
    rule = {"ports": [{"port": str(port), "protocol": "TCP"}],
            "rules": {"l7proto": "memcache", "l7": [{"command": "get", "keyPrefix": prefix}]}}  # fmt: skip
    return {
        "metadata": {"name": "cache", "namespace": "shop"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "memcached"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}], "toPorts": [rule]}],
        },
    }


def config(tmp_path: Path, api: ApiThread, listen: int, upstream: int, admin: int) -> str:
    kubeconfig = api.api.kubeconfig(tmp_path / "kubeconfig")
    return f"""\
listeners:
  - name: mc
    address: "127.0.0.1:{listen}"
    l7proto: memcache
    upstream: "127.0.0.1:{upstream}"
access_log:
  path: access.log
admin:
  address: "127.0.0.1:{admin}"
workers: 2
kubernetes:
  kubeconfig: {kubeconfig}
  cluster_name: east
  node_name: n1
"""


def seed(api: ApiThread, port: int) -> None:
    api.put("namespaces", {"metadata": {"name": "shop"}})
    api.put("pods", pod("cache-0", "127.0.0.1", ns="shop", labels={"app": "memcached"}))
    api.put("ciliumnetworkpolicies", cnp(port, "pub/"))


def connect(src: str, listen: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", listen), timeout=10, source_address=(src, 0))


def refused(c: socket.socket) -> bool:
    """The proxy closed the connection without answering (denied at L3/L4)."""
    try:
        return ask(c, b"get pub/x\r\n") == b""
    except ConnectionResetError:
        return True


def refused_by(d: Proxyd, c: socket.socket) -> int:
    """The pid of the worker that logged refusing ``c``."""
    src = "{}:{}".format(*c.getsockname()[:2])
    found: list[int] = []

    def logged() -> bool:
        for line in d.stderr().splitlines():
            if line.startswith("{") and '"connection refused"' in line:
                entry = json.loads(line)
                if entry.get("src") == src:
                    found.append(int(entry["pid"]))
                    return True
        return False

    wait_until(logged, f"no worker logged refusing {src}")
    return found[0]


def each_worker(pids: set[int], listen: int, src: str, check: Any) -> None:
    """Open connections from ``src`` until every worker in ``pids`` held (or refused) at least two,
    running ``check(connection)`` on each: it returns the pid that handled it."""
    seen: dict[int, int] = {}
    for _ in range(64):
        c = connect(src, listen)
        try:
            pid = check(c)
        finally:
            c.close()
        assert pid in pids, f"handled by {pid}, not a worker of {pids}"
        seen[pid] = seen.get(pid, 0) + 1
        if len(seen) == len(pids) and min(seen.values()) >= 2:
            return
    raise AssertionError(f"connections never reached every worker: {seen}")


def test_cluster_identities_and_policies_reach_every_worker(
    tmp_path: Path, api: ApiThread, memcached: int
) -> None:
    seed(api, memcached)
    listen, admin = free_port(), free_port()
    d = Proxyd(tmp_path, config(tmp_path, api, listen, memcached, admin), admin=admin)
    try:
        pids = worker_pids(d.proc.pid)
        assert len(pids) == 2
        assert metric(d, "proxyd_kubernetes_synced") == 1  # the control process's, not summed

        # No pod at the client's address yet: every worker refuses it at L3.
        each_worker(pids, listen, CLIENT, lambda c: refused(c) and refused_by(d, c))

        # A pod appears: both workers admit its address and enforce the API's policy on it.
        api.put("pods", pod("client-0", CLIENT, ns="shop", labels={"app": "client"}))
        wait_until(lambda: d.status("GET", f"/v1/identities?ip={CLIENT}")[1].get("origin")
                   == "pod shop/client-0", "pod not seen by the control process")  # fmt: skip

        def admitted(c: socket.socket) -> int:
            assert ask(c, b"get pub/x\r\n") == b"END\r\n"
            assert b"ERROR" in ask(c, b"get secret\r\n")
            return holder(c, listen, pids)

        wait_until(lambda: both_admit(listen, pids), "the pod's address never admitted by both workers")
        each_worker(pids, listen, CLIENT, admitted)

        # The policy object changes: every open connection's next request, on both workers,
        # is judged by the new revision.
        clients = [connect(CLIENT, listen) for _ in range(24)]
        for c in clients:
            assert ask(c, b"get pub/x\r\n") == b"END\r\n"
        assert held_by(clients, listen) == pids
        before = d.status("GET", "/v1/policy")[1]["revision"]
        api.put("ciliumnetworkpolicies", cnp(memcached, "priv/"))
        for c in clients:
            wait_until(lambda c=c: b"ERROR" in ask(c, b"get pub/x\r\n"), "policy change not seen")  # type: ignore[misc]
            assert ask(c, b"get priv/x\r\n") == b"END\r\n"
            c.close()
        policy = d.status("GET", "/v1/policy")[1]
        assert policy["revision"] > before
        (doc,) = [x for x in policy["documents"] if x["name"] == "shop/cache"]
        assert doc["origin"] == "kubernetes"
        assert doc["document"]["spec"]["ingress"][0]["toPorts"][0]["rules"]["l7"][0]["keyPrefix"] == "priv/"

        # The pod is deleted: its address loses access on both workers.
        api.delete("pods", "client-0", "shop")
        wait_until(lambda: d.status("GET", f"/v1/identities?ip={CLIENT}")[1].get("origin") == "",
                   "pod deletion not seen by the control process")  # fmt: skip
        wait_until(lambda: all_refused(listen), "the deleted pod's address still admitted")
        each_worker(pids, listen, CLIENT, lambda c: refused(c) and refused_by(d, c))
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        assert not worker_pids(d.proc.pid)
    finally:
        d.stop()


def both_admit(listen: int, pids: set[int]) -> bool:
    """Whether a few connections from the client, spread over the workers, are all admitted."""
    clients = [connect(CLIENT, listen) for _ in range(16)]
    try:
        ok = all(ask(c, b"get pub/x\r\n") == b"END\r\n" for c in clients)
        return ok and held_by(clients, listen) == pids
    except (ConnectionResetError, KeyError):
        return False
    finally:
        for c in clients:
            c.close()


def all_refused(listen: int) -> bool:
    clients = [connect(CLIENT, listen) for _ in range(16)]
    try:
        return all(refused(c) for c in clients)
    finally:
        for c in clients:
            c.close()


def test_a_restarted_worker_starts_with_the_current_cluster_state(
    tmp_path: Path, api: ApiThread, memcached: int
) -> None:
    seed(api, memcached)
    api.put("pods", pod("client-0", CLIENT, ns="shop", labels={"app": "client"}))
    listen, admin = free_port(), free_port()
    d = Proxyd(tmp_path, config(tmp_path, api, listen, memcached, admin), admin=admin)
    try:
        wait_until(lambda: len(worker_pids(d.proc.pid)) == 2, "two workers never ran")
        pids = worker_pids(d.proc.pid)
        victim = min(pids)
        # Changed after the workers started: the survivor learns them as changes, the
        # restarted worker from the whole state it is given before it binds.
        api.put("pods", pod("client-1", OTHER, ns="shop", labels={"app": "client"}))
        api.put("ciliumnetworkpolicies", cnp(memcached, "priv/"))
        wait_until(lambda: serves_current(listen, pids), "the changes never reached both workers")
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(worker_pids(d.proc.pid)) == 2 and victim not in worker_pids(d.proc.pid),
                   "worker not restarted")  # fmt: skip
        new = worker_pids(d.proc.pid)
        (restarted,) = new - pids
        wait_until(lambda: metric(d, "proxyd_worker_restarts_total") == 1, "restart not counted")

        def current(c: socket.socket) -> int:
            assert ask(c, b"get priv/x\r\n") == b"END\r\n"  # the object's current revision
            assert b"ERROR" in ask(c, b"get pub/x\r\n")
            return holder(c, listen, new)

        for src in (CLIENT, OTHER):
            wait_until(lambda src=src: holds_on(listen, src, restarted), "restarted worker not reached")  # type: ignore[misc]
            each_worker(new, listen, src, current)
        assert "worker exited, restarting it" in d.stderr()
        # A reload (SIGHUP) reaches every worker and keeps the cluster's identities and policy.
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: '"config reloaded"' in d.stderr(), "config not reloaded")
        for src in (CLIENT, OTHER):
            each_worker(new, listen, src, current)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


def holds_on(listen: int, src: str, pid: int) -> bool:
    """Whether one of a few connections from ``src`` lands on worker ``pid`` (it may not listen yet)."""
    clients = [connect(src, listen) for _ in range(16)]
    try:
        for c in clients:
            assert ask(c, b"get priv/x\r\n") == b"END\r\n"
        return pid in held_by(clients, listen)
    finally:
        for c in clients:
            c.close()


def serves_current(listen: int, pids: set[int]) -> bool:
    """Whether both clients' connections, spread over ``pids``, are judged by the current state."""
    for src in (CLIENT, OTHER):
        clients = [connect(src, listen) for _ in range(16)]
        try:
            if not all(ask(c, b"get priv/x\r\n") == b"END\r\n" for c in clients):
                return False
            if held_by(clients, listen) != pids:
                return False
        except (ConnectionResetError, KeyError):
            return False
        finally:
            for c in clients:
                c.close()
    return True


def test_ready_only_after_the_first_sync(tmp_path: Path, api: ApiThread, memcached: int) -> None:
    seed(api, memcached)
    api.api.down = True  # read on the API server's loop: a plain attribute, set before it is asked
    listen, admin = free_port(), free_port()
    cfg = tmp_path / "proxyd.yaml"
    cfg.write_text(config(tmp_path, api, listen, memcached, admin))
    proc = subprocess.Popen([sys.executable, "-m", "proxyd", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:

        def not_ready() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", admin), timeout=2) as s:
                    s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                    return s.recv(100).split(b" ")[1:2] == [b"503"]
            except OSError:
                return False

        wait_until(not_ready, "admin API not up (503) while the API server is down")
        assert not worker_pids(proc.pid)  # no worker started, nothing bound
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", listen), timeout=2).close()
        api.api.down = False
        wait_until(lambda: _answers(admin), "never ready after the API server came back")
        assert len(worker_pids(proc.pid)) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
