"""``workers: N`` end to end: a `proxyd run` subprocess with two worker processes in front of a
real memcached. Which worker holds a connection is read from the kernel (/proc/net/tcp gives the
accepted socket's inode, /proc/PID/fd says which process holds it), not from proxyd.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from memcached_fixture import start_memcached
from needs import free_port, need_binary
from test_harden import Proxyd

from proxyd.config import load_config
from proxyd.errors import ConfigError

TOKEN = "workers-test-token"
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: only-pub}
spec:
  endpointSelector: {matchLabels: {app: memcached}}
  ingress:
    - toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            l7proto: memcache
            l7: [{command: get, keyPrefix: "pub/"}]
"""


def _config(listen: int, upstream: int, admin: int, workers: str = "2") -> str:
    return f"""\
listeners:
  - name: mc
    address: "127.0.0.1:{listen}"
    l7proto: memcache
    upstream: "127.0.0.1:{upstream}"
identities:
  - cidr: 127.0.0.0/8
    labels: {{app: memcached}}
access_log:
  path: access.log
admin:
  address: "127.0.0.1:{admin}"
  token_file: admin.token
limits:
  max_connections: 1000
workers: {workers}
"""


@pytest.fixture
def memcached() -> Iterator[int]:
    with start_memcached() as port:
        yield port


def make(tmp_path: Path, memcached: int, workers: str = "2") -> tuple[Proxyd, int]:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    (tmp_path / "admin.token").chmod(0o600)
    listen, admin = free_port(), free_port()
    return Proxyd(tmp_path, _config(listen, memcached, admin, workers), admin=admin), listen


def worker_pids(control: int) -> set[int]:
    """The live worker processes of ``control``: its children running ``proxyd.workers``, not
    yet-unreaped ones (zombies) or any other child it may have for a moment."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == control and state != "Z" and b"proxyd.workers" in cmdline:
                out.add(int(entry))
    return out


def holders(listen: int) -> dict[int, int]:
    """Client port -> pid of the process holding the accepted end, for every established
    connection to ``listen`` (``ss`` filters in the kernel: /proc/net/tcp lists every socket of
    the machine, tens of thousands on a busy test host)."""
    need_binary("ss")
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{listen} )"],
                         capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
    found = {}
    for line in out.splitlines():
        m = re.search(r""":(\d+)\s+users:\(\("[^"]*",pid=(\d+),""", line)
        if m:
            found[int(m.group(1))] = int(m.group(2))
    return found


def holder(client: socket.socket, listen: int, pids: set[int]) -> int:
    """The pid among ``pids`` holding the accepted end of ``client``'s connection."""
    pid = holders(listen).get(client.getsockname()[1])
    assert pid in pids, f"connection from port {client.getsockname()[1]} held by {pid}, not by {pids}"
    return pid


def held_by(clients: list[socket.socket], listen: int) -> set[int]:
    found = holders(listen)
    return {found[c.getsockname()[1]] for c in clients}


def connect(listen: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", listen), timeout=10)
    return s


def ask(s: socket.socket, request: bytes) -> bytes:
    s.sendall(request)
    data = b""
    while not data.endswith((b"END\r\n", b"STORED\r\n")) and not (b"ERROR" in data and data.endswith(b"\n")):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def accepted(s: socket.socket) -> None:
    """Wait until the proxy accepted ``s`` (one round trip through it)."""
    assert ask(s, b"get pub/x\r\n") == b"END\r\n"


def metric(d: Proxyd, name: str) -> float:
    total = 0.0
    for line in d.metrics().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(cond: object, what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_workers_key_is_validated(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    base = 'listeners:\n  - name: a\n    address: "127.0.0.1:1"\n    upstream: "127.0.0.1:2"\n'
    for bad, why in (("0", "between 1 and"), ("two", "number of worker processes or auto"), ("true", "auto")):
        cfg.write_text(base + f"workers: {bad}\n")
        with pytest.raises(ConfigError) as exc:
            load_config(cfg)
        assert exc.value.problems[0].startswith(f"{cfg}:5: workers: "), exc.value.problems
        assert why in exc.value.problems[0]
    cfg.write_text(base.replace(":1", ":0") + "workers: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert exc.value.problems == [
        f"{cfg}:5: workers: listeners a have port 0; more than one worker needs fixed ports"
    ]
    cfg.write_text(base + "workers: auto\n")
    assert load_config(cfg).workers == len(os.sched_getaffinity(0))
    cfg.write_text(base)
    assert load_config(cfg).workers == 1


def test_two_workers_share_connections_policy_metrics_and_log(tmp_path: Path, memcached: int) -> None:
    d, listen = make(tmp_path, memcached)
    try:
        pids = worker_pids(d.proc.pid)
        assert len(pids) == 2
        assert metric(d, "proxyd_workers") == 2
        clients = [connect(listen) for _ in range(40)]
        for c in clients:
            accepted(c)
        by_worker = held_by(clients, listen)
        assert by_worker == pids  # SO_REUSEPORT spread them over both
        assert metric(d, "proxyd_connections_active") == 40
        (row,) = d.status("GET", "/v1/listeners")[1]["listeners"]
        assert (row["name"], row["active_connections"], row["workers"]) == ("mc", 40, 2)
        assert row["bound"] == row["address"] == f"127.0.0.1:{listen}"
        for c in clients:
            c.close()

        # A policy change through the admin API: 200 once both workers apply it.
        body = POLICY.replace("PORT", str(memcached)).encode()
        hdrs = {"Content-Type": "application/yaml", "Authorization": f"Bearer {TOKEN}"}
        status, answer = d.status("POST", "/v1/policy", body, hdrs)
        assert status == 200, answer
        assert d.status("GET", "/v1/policy")[1]["revision"] == answer["revision"]
        clients = [connect(listen) for _ in range(40)]
        for c in clients:
            accepted(c)  # pub/ is still allowed
        assert held_by(clients, listen) == pids
        for c in clients:
            assert b"ERROR" in ask(c, b"get secret\r\n")  # every worker's next request is denied
            c.close()

        assert metric(d, "proxyd_connections_total") == 80
        need_binary("promtool")
        res = subprocess.run(["promtool", "check", "metrics"], input=d.metrics(), capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (
            res.stdout + res.stderr
        )
        assert metric(d, 'proxyd_l7_requests_total{l7proto="memcache",verdict="denied"}') == 40
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        assert not worker_pids(d.proc.pid)
        raw = (tmp_path / "access.log").read_bytes()
        assert raw.endswith(b"\n")
        lines = [json.loads(x) for x in raw.split(b"\n") if x]  # every line whole
        assert sum(1 for x in lines if x["event"] == "connection") == 80
        assert len({x["conn_id"] for x in lines if x["event"] == "connection"}) == 80  # unique daemon-wide
        denied = [x for x in lines if x["event"] == "l7" and x["verdict"] == "denied"]
        assert len(denied) == 40
    finally:
        d.stop()


def test_killed_worker_is_restarted_and_others_undisturbed(tmp_path: Path, memcached: int) -> None:
    d, listen = make(tmp_path, memcached)
    try:
        pids = worker_pids(d.proc.pid)
        clients: dict[int, list[socket.socket]] = {p: [] for p in pids}
        for _ in range(64):
            c = connect(listen)
            accepted(c)
            clients[holder(c, listen, pids)].append(c)
            if all(clients.values()):
                break
        victim, survivor = sorted(pids)
        body = POLICY.replace("PORT", str(memcached)).encode()
        hdrs = {"Content-Type": "application/yaml", "Authorization": f"Bearer {TOKEN}"}
        assert d.status("POST", "/v1/policy", body, hdrs)[0] == 200
        # Load on a connection the survivor holds while the victim dies: every request answered.
        loaded = clients[survivor][0]
        stop, answers = threading.Event(), []

        def load() -> None:
            for i in range(20000):  # bounded; stopped once the restart is seen
                if stop.is_set():
                    return
                answers.append(ask(loaded, b"get pub/l%d\r\n" % i))

        loader = threading.Thread(target=load)
        loader.start()
        wait_until(lambda: len(answers) > 50, "no load")
        made = metric(d, "proxyd_connections_total")  # a scrape: every worker reports now
        assert made == sum(len(v) for v in clients.values())
        os.kill(victim, signal.SIGKILL)
        for c in clients[victim]:
            c.settimeout(10)
            assert c.recv(100) == b""  # its own connections are gone
        wait_until(lambda: len(worker_pids(d.proc.pid)) == 2, "worker not restarted")
        stop.set()
        loader.join(60)
        assert answers and set(answers) == {b"END\r\n"}
        for c in clients[survivor]:
            assert ask(c, b"get pub/k\r\n") == b"END\r\n"
            assert b"ERROR" in ask(c, b"get secret\r\n")
        wait_until(lambda: len(worker_pids(d.proc.pid)) == 2 and metric(d, "proxyd_workers") == 2,
                   "worker not restarted")  # fmt: skip
        assert metric(d, "proxyd_worker_restarts_total") == 1
        assert metric(d, "proxyd_connections_total") == made  # the dead worker's counts stay
        new = worker_pids(d.proc.pid)
        assert survivor in new and victim not in new
        assert '"worker exited, restarting it"' in d.stderr()
        for c in clients[survivor]:
            accepted(c)
            c.close()
        # The restarted worker has the policy imported before it started.
        (restarted,) = new - {survivor}
        on_new = 0
        for _ in range(64):
            c = connect(listen)
            accepted(c)
            assert b"ERROR" in ask(c, b"get secret\r\n")
            on_new += holder(c, listen, new) == restarted
            c.close()
            if on_new >= 3:
                break
        assert on_new >= 3
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


def test_a_worker_that_cannot_bind_fails_the_start(tmp_path: Path, memcached: int) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cfg = tmp_path / "p.yaml"
    cfg.write_text(_config(port, memcached, free_port()).replace("  token_file: admin.token\n", ""))
    try:
        res = subprocess.run([sys.executable, "-m", "proxyd", "run", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        taken.close()
    assert res.returncode == 1
    assert re.search(rf"proxyd: cannot start: worker \d: listener 'mc': cannot bind 127.0.0.1:{port}: "
                     "Address already in use", res.stderr), res.stderr  # fmt: skip


def test_sigusr1_reopens_the_log_in_every_worker(tmp_path: Path, memcached: int) -> None:
    d, listen = make(tmp_path, memcached)
    try:
        pids = worker_pids(d.proc.pid)
        log = tmp_path / "access.log"
        (tmp_path / "rotated.log").unlink(missing_ok=True)
        log.rename(tmp_path / "rotated.log")
        d.proc.send_signal(signal.SIGUSR1)
        wait_until(log.exists, "access log not reopened")
        port_of: dict[int, int] = {}  # client port -> worker pid
        end = time.monotonic() + 30
        while True:  # until a connection line of each worker is in the new file
            c = connect(listen)
            accepted(c)
            port_of[c.getsockname()[1]] = holder(c, listen, pids)
            c.close()
            time.sleep(0.3)  # a flush interval
            ports = {int(x["src"].rsplit(":", 1)[1]) for x in d.log() if x["event"] == "connection"}
            if {port_of[p] for p in ports if p in port_of} == pids:
                break
            assert time.monotonic() < end, "a worker never wrote to the reopened file"
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        assert all(json.loads(x) for x in (tmp_path / "rotated.log").read_bytes().split(b"\n") if x)
    finally:
        d.stop()


def test_stdout_log_lines_stay_whole_with_concurrent_workers(tmp_path: Path, memcached: int) -> None:
    listen, admin = free_port(), free_port()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(_config(listen, memcached, admin).replace("path: access.log", 'path: "-"')
                   .replace("  token_file: admin.token\n", ""))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "proxyd", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: _answers(admin), "daemon not ready")
        key = b"pub/" + b"k" * 240

        def client() -> None:
            for _ in range(50):
                c = connect(listen)
                for _ in range(10):
                    assert ask(c, b"get " + key + b"\r\n") == b"END\r\n"
                c.close()

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    reader.join(10)
    proc.stdout.close()  # type: ignore[union-attr]
    lines = [json.loads(x) for x in out[0].split(b"\n") if x]  # every line whole
    assert sum(1 for x in lines if x["event"] == "connection") == 200
    assert sum(1 for x in lines if x["event"] == "l7") == 200 * 10 * 2


def _answers(admin: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", admin), timeout=2) as s:
            s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            return s.recv(100).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


def test_sighup_reaches_every_worker(tmp_path: Path, memcached: int) -> None:
    d, _ = make(tmp_path, memcached)
    try:
        pids = worker_pids(d.proc.pid)
        second = free_port()
        text = d.cfg.read_text()
        added = (f'  - name: mc2\n    address: "127.0.0.1:{second}"\n    l7proto: memcache\n'
                 f'    upstream: "127.0.0.1:{memcached}"\n')  # fmt: skip
        (tmp_path / "pol.yaml").write_text(POLICY.replace("PORT", str(memcached)))
        text = text.replace("identities:", added + "identities:", 1)
        d.cfg.write_text(text.replace("access_log:", "policy:\n  paths: [pol.yaml]\naccess_log:", 1))
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: '"config reloaded"' in d.stderr(), "config not reloaded")
        clients = [connect(second) for _ in range(40)]
        for c in clients:
            accepted(c)
        assert held_by(clients, second) == pids  # both workers bound mc2
        for c in clients:  # and both have the policy the reload added
            assert b"ERROR" in ask(c, b"get secret\r\n")
            c.close()
        assert worker_pids(d.proc.pid) == pids
        assert metric(d, 'proxyd_connections_total{listener="mc2"}') == 40
    finally:
        d.stop()


def test_workers_die_with_the_control_process(tmp_path: Path, memcached: int) -> None:
    d, listen = make(tmp_path, memcached)
    try:
        pids = worker_pids(d.proc.pid)
        assert len(pids) == 2
        d.proc.kill()  # SIGKILL: no chance to stop them
        d.proc.wait(10)

        def gone(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        wait_until(lambda: all(gone(p) for p in pids), "workers outlived the control process")

        def refused() -> bool:
            try:
                connect(listen).close()
            except OSError:
                return True
            return False

        # Nothing is left listening: connections are refused (once the kernel has torn the
        # last worker's listening socket down, which can trail its exit by a moment).
        wait_until(refused, "something still accepts on the listener after the workers died", timeout=10)
    finally:
        d.stop()


def test_workers_1_is_the_single_process_daemon(tmp_path: Path, memcached: int) -> None:
    d, listen = make(tmp_path, memcached, workers="1")
    try:
        assert not worker_pids(d.proc.pid)  # no children: the process itself listens
        c = connect(listen)
        accepted(c)
        assert holder(c, listen, {d.proc.pid}) == d.proc.pid
        c.close()
        assert metric(d, "proxyd_workers") == 1
        assert metric(d, "proxyd_worker_restarts_total") == 0
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


def test_max_connections_holds_for_the_whole_daemon(tmp_path: Path, memcached: int) -> None:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    listen, admin = free_port(), free_port()
    config = _config(listen, memcached, admin).replace("max_connections: 1000", "max_connections: 6")
    d = Proxyd(tmp_path, config, admin=admin)
    try:
        pids = worker_pids(d.proc.pid)

        def refused(c: socket.socket) -> bool:
            try:
                return ask(c, b"get pub/x\r\n") == b""
            except ConnectionResetError:
                return True

        held = []
        for _ in range(6):  # whichever worker the kernel picks, six are admitted
            c = connect(listen)
            accepted(c)
            held.append(c)
        for _ in range(6):
            c = connect(listen)
            assert refused(c)
            c.close()
        for c in held[:2]:
            c.close()
        wait_until(lambda: metric(d, "proxyd_connections_active") == 4, "closes not seen")
        more = []
        for _ in range(2):
            c = connect(listen)
            accepted(c)
            more.append(c)
        assert refused(connect(listen))
        everyone = [*held[2:], *more]
        assert held_by(everyone, listen) <= pids

        def refusals() -> int:
            return sum(1 for x in d.log() if "max_connections (6) reached" in str(x.get("reason")))

        wait_until(lambda: refusals() >= 7, "refusals not logged")
        assert refusals() == 7
        for c in everyone:
            c.close()
    finally:
        d.stop()
