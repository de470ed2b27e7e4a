"""Node-sized identities and policies, black-box against a `proxyd run` subprocess: a SIGHUP
with a large identities table does not stop traffic, a policy file caught half-written never
loads, 100,000 identities with three labels each load, and editing one document of many
compiles that one only. The speed figures are in bench/scale.py; nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from needs import free_port

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: NAME}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: backend}}]
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules: {l7proto: r2d2, l7: [{cmd: READ}]}
"""


ME = "  - cidr: 127.0.0.1/32\n    labels: {app: backend}\n"


def filler_identities(n: int, start: int = 0) -> str:
    """``n`` pod addresses in 10.0.0.0/8, three labels each (500 label sets between them)."""
    out = []
    for j in range(start, start + n):
        out.append(
            f"  - cidr: 10.{j >> 16 & 255}.{j >> 8 & 255}.{j & 255}/32\n"
            f"    labels: {{app: app{j % 500}, role: r{j % 50}, team: t{j % 7}}}\n"
        )
    return "".join(out)


class Upstream:
    """Answers each line with ``OK <line>`` (what the r2d2 parser forwards when allowed)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c: socket.socket) -> None:
        with c, c.makefile("rb") as f:
            for line in f:
                c.sendall(b"OK " + line)

    def close(self) -> None:
        self.sock.close()


class Proxyd:
    """`proxyd run` on ``config`` in ``tmp_path``, ready when its r2d2 listener answers."""

    def __init__(self, tmp_path: Path, config: str, port: int, ready_timeout: float = 60.0) -> None:
        self.dir = tmp_path
        self.cfg = tmp_path / "proxyd.yaml"
        self.cfg.write_text(config)
        self.port = port
        self.stderr_path = tmp_path / "stderr.log"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxyd", "run", "--config", str(self.cfg)],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        assert wait_until(lambda: self.proc.poll() is not None or self.ready(), ready_timeout), self.stderr()
        assert self.proc.poll() is None, self.stderr()

    def ready(self) -> bool:
        return any(e.get("event") == "listening" for e in self.events())

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def events(self) -> list[dict]:  # type: ignore[type-arg]
        out = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def ask(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(line + b"\r\n")
        got = b""
        while not got.endswith(b"\r\n"):
            data = c.recv(4096)
            if not data:
                break
            got += data
    return got.strip()


def config(port: int, upstream: int, identities: str, policy: str = "policy") -> str:
    return (
        f'listeners:\n  - name: r2d2\n    address: "127.0.0.1:{port}"\n'
        f'    upstream: "127.0.0.1:{upstream}"\n    l7proto: r2d2\n'
        f"policy:\n  paths: [{policy}]\nidentities:\n{identities}"
    )


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.close()


@pytest.fixture
def started() -> Iterator[list[Proxyd]]:
    made: list[Proxyd] = []
    yield made
    for d in made:
        d.stop()


class Client(threading.Thread):
    """One connection asking ``READ`` over and over; keeps the time of every answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.answers: list[tuple[float, bytes]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        f = self.sock.makefile("rb")
        while not self.stop.is_set() and len(self.answers) < 2_000_000:
            self.sock.sendall(b"READ k\r\n")
            line = f.readline()
            if not line:
                return
            self.answers.append((time.monotonic(), line.strip()))
            time.sleep(0.001)


def test_sighup_with_many_identities_keeps_answering_and_applies(
    tmp_path: Path, upstream: Upstream, started: list[Proxyd]
) -> None:
    """The config (20,000 identities) is read and compiled off the event loop: requests on an
    open connection keep being answered between the SIGHUP and the "config reloaded" line."""
    port = free_port()
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "p.yaml").write_text(
        POLICY.replace("NAME", "p").replace("PORT", str(upstream.port))
    )
    d = Proxyd(tmp_path, config(port, upstream.port, ME + filler_identities(20_000)), port)
    started.append(d)
    assert ask(port, b"HALT") == b"ERROR"  # the policy selects app=backend: READ only
    client = Client(port)
    client.start()
    assert wait_until(lambda: len(client.answers) > 20)
    # The new config gives 127.0.0.1 other labels (the policy stops selecting it) and 20,000
    # other identities.
    (tmp_path / "proxyd.yaml").write_text(
        config(
            port,
            upstream.port,
            "  - cidr: 127.0.0.1/32\n    labels: {app: other}\n" + filler_identities(20_000, 20_000),
        )
    )
    sent = time.monotonic()
    os.kill(d.proc.pid, signal.SIGHUP)
    assert wait_until(lambda: d.count("config reloaded") == 1, 120), d.stderr()
    seen = time.monotonic()
    client.stop.set()
    client.join(30)
    during = [a for t, a in client.answers if sent < t < seen]
    assert len(during) >= 10, (len(during), d.stderr())
    assert set(during) == {b"OK READ k"}
    assert ask(port, b"HALT") == b"OK HALT"  # the reload applied: no policy selects it now


def test_policy_file_written_in_two_halves_never_loads_the_half(
    tmp_path: Path, upstream: Upstream, started: list[Proxyd]
) -> None:
    """The first half of this file parses (``toPorts:`` cut off reads as null: any port, any
    request). It must never be in force: the file is read once its writer closes it."""
    port = free_port()
    pdir = tmp_path / "policy"
    pdir.mkdir()
    full = POLICY.replace("NAME", "p").replace("PORT", str(upstream.port))
    (pdir / "p.yaml").write_text(full)
    d = Proxyd(tmp_path, config(port, upstream.port, ME), port)
    started.append(d)
    assert ask(port, b"HALT") == b"ERROR"
    edited = full.replace("metadata: {name: p}", "metadata: {name: p, labels: {edited: 'yes'}}")
    half = edited[: edited.index("toPorts:") + len("toPorts:\n")]
    answers: list[bytes] = []
    with (pdir / "p.yaml").open("w") as f:
        f.write(half)
        f.flush()
        os.fsync(f.fileno())
        end = time.monotonic() + 2.5  # longer than the old poller's second
        while time.monotonic() < end:
            answers.append(ask(port, b"HALT"))
            time.sleep(0.05)
        f.write(edited[len(half) :])
    assert wait_until(lambda: d.count("policy reloaded") >= 1, 30), d.stderr()
    assert answers and set(answers) == {b"ERROR"}, answers
    assert d.count("policy reload rejected") == 0, d.stderr()
    assert ask(port, b"HALT") == b"ERROR"
    assert ask(port, b"READ x") == b"OK READ x"


def test_hundred_thousand_identities_with_three_labels_load(
    tmp_path: Path, upstream: Upstream, started: list[Proxyd]
) -> None:
    port = free_port()
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "p.yaml").write_text(
        POLICY.replace("NAME", "p").replace("PORT", str(upstream.port))
    )
    me = "  - cidr: 127.0.0.1/32\n    labels: {app: backend, role: db, team: core}\n"
    d = Proxyd(
        tmp_path, config(port, upstream.port, filler_identities(100_000) + me), port, ready_timeout=180
    )
    started.append(d)
    assert ask(port, b"READ x") == b"OK READ x"
    assert ask(port, b"HALT") == b"ERROR"  # the last of 100,001 entries labels 127.0.0.1


def test_editing_one_document_of_many_compiles_only_that_one(
    tmp_path: Path, upstream: Upstream, started: list[Proxyd]
) -> None:
    port = free_port()
    pdir = tmp_path / "policy"
    pdir.mkdir()
    for i in range(300):
        # Documents selecting other apps, and one (p150) selecting this endpoint.
        text = POLICY.replace("NAME", f"p{i}").replace("PORT", str(upstream.port))
        if i != 150:
            text = text.replace("{app: backend}}\n  ingress", f"{{app: app{i}}}}}\n  ingress")
        (pdir / f"p{i:03d}.yaml").write_text(text)
    d = Proxyd(tmp_path, config(port, upstream.port, ME), port)
    started.append(d)
    assert ask(port, b"HALT") == b"ERROR"
    # Written atomically, as docs/policy.md says: a temporary file renamed into place.
    edited = POLICY.replace("NAME", "p150").replace("PORT", str(upstream.port))
    edited = edited.replace("{cmd: READ}", "{cmd: HALT}")
    tmp = pdir / ".p150.yaml.tmp"
    tmp.write_text(edited)
    tmp.rename(pdir / "p150.yaml")
    assert wait_until(lambda: d.count("policy reloaded") == 1, 30), d.stderr()
    line = next(e for e in d.events() if e.get("event") == "policy reloaded")
    assert line["compiled"] == 1 and line["files"] == [str(pdir / "p150.yaml")], line
    assert ask(port, b"HALT") == b"OK HALT"
    assert ask(port, b"READ x") == b"ERROR"


def test_a_file_that_stops_giving_rules_is_warned_about_by_name(
    tmp_path: Path, upstream: Upstream, started: list[Proxyd]
) -> None:
    port = free_port()
    pdir = tmp_path / "policy"
    pdir.mkdir()
    (pdir / "p.yaml").write_text(POLICY.replace("NAME", "p").replace("PORT", str(upstream.port)))
    d = Proxyd(tmp_path, config(port, upstream.port, ME), port)
    started.append(d)
    tmp = pdir / ".p.tmp"
    tmp.write_text("# emptied\n")
    tmp.rename(pdir / "p.yaml")
    assert wait_until(lambda: d.count("policy change leaves endpoints without rules") == 1, 30), d.stderr()
    warning = next(e for e in d.events() if e.get("event") == "policy change leaves endpoints without rules")
    assert str(pdir / "p.yaml") in warning["problem"] and "app=backend" in warning["problem"], warning
    assert ask(port, b"HALT") == b"OK HALT"  # as the warning says: nothing selects it any more


def test_a_configmap_volume_update_is_picked_up(
    tmp_path: Path, upstream: Upstream, started: list[Proxyd]
) -> None:
    """kubelet updates a ConfigMap volume by renaming a new ``..data`` symlink into place; the
    policy files are symlinks through it, so no event names them."""
    port = free_port()
    pdir = tmp_path / "policy"
    (pdir / "..v1").mkdir(parents=True)
    (pdir / "..v1" / "p.yaml").write_text(POLICY.replace("NAME", "p").replace("PORT", str(upstream.port)))
    (pdir / "..data").symlink_to("..v1")
    (pdir / "p.yaml").symlink_to("..data/p.yaml")
    d = Proxyd(tmp_path, config(port, upstream.port, ME), port)
    started.append(d)
    assert ask(port, b"HALT") == b"ERROR"
    (pdir / "..v2").mkdir()
    edited = POLICY.replace("NAME", "p").replace("PORT", str(upstream.port))
    (pdir / "..v2" / "p.yaml").write_text(edited.replace("{cmd: READ}", "{cmd: HALT}"))
    (pdir / "..data_tmp").symlink_to("..v2")
    (pdir / "..data_tmp").rename(pdir / "..data")
    assert wait_until(lambda: d.count("policy reloaded") == 1, 30), d.stderr()
    assert ask(port, b"HALT") == b"OK HALT"
