#!/usr/bin/env python3
# ruff: noqa: E402, I001  (sys.path is fixed before the imports)
"""Socket-free cost of the memcache+policy data path: CPU microseconds per get (with its
``VALUE ... END`` reply) and per set, native and Python paths side by side.

Drives the daemon's own pieces without sockets: a PolicyStore loaded with the benchmark's
CiliumNetworkPolicy, the connection's live policy view, Context, the AccessLog (``requests:
denied``, to /dev/null), the engine and the memcache parser::

    python bench/socketfree.py                  # both paths, 200000 ops each
    python bench/socketfree.py --profile native # cProfile of the native path (what is left in Python)

Instruction counts (repeatable on a loaded machine) come from running it under
``valgrind --tool=callgrind``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

# bench/ (this script's directory, first on sys.path) holds http.py, which would shadow the
# standard library's http package: take it off the front, keep it last (for memcache.py).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from proxyd.accesslog import AccessLog
from proxyd.context import ConnInfo, Context
from proxyd.metrics import Metrics
from proxyd.parser import Endpoint
from proxyd.policy.store import PolicyStore
from proxyd.registry import Registry
from proxyd.testing import engine_class

from memcache import KEY_REGEX, POLICY

LABELS = {"app": "memcached", "role": "bench-client"}


def setup(impl: str, tmp: Path):  # type: ignore[no-untyped-def]
    (tmp / "policy.yaml").write_text(POLICY.format(mc=11211, regex=KEY_REGEX))
    reg = Registry.load()
    store = PolicyStore(reg, [tmp / "policy.yaml"])
    store.reload_files()
    view = store.view("ingress", LABELS, "127.0.0.1", LABELS, 11211, "memcache", False)
    assert view.l4().l4_allowed
    metrics = Metrics()
    log = AccessLog("/dev/null", "denied", metrics)
    sink = []
    engine = engine_class(impl)(None, lambda reply, data: sink.append(len(data)))
    src, dst = Endpoint("127.0.0.1", 40000, LABELS), Endpoint("127.0.0.1", 11211, LABELS)
    info = ConnInfo(1, "mc", "ingress", src, dst, "memcache")
    ctx = Context(info, engine, view, log)
    factory = reg.get("memcache")
    engine.parser = factory.create(ctx, factory.validate_config({}))
    return engine, sink, metrics


def run(impl: str, n: int, tmp: Path) -> tuple[float, float]:
    engine, _sink, metrics = setup(impl, tmp)
    key = b"\x10\xb0\x10\x10\x10\x10\x10\x10abcdefgh" + b"x" * 16
    get = b"get " + key + b"\r\n"
    value_reply = b"VALUE " + key + b" 0 100\r\n" + b"v" * 100 + b"\r\nEND\r\n"
    setreq = b"set " + key + b" 0 0 100\r\n" + b"v" * 100 + b"\r\n"
    feed = engine.feed
    t0 = time.process_time()
    for _ in range(n):
        feed(False, get)
        feed(True, value_reply)
    t1 = time.process_time()
    for _ in range(n):
        feed(False, setreq)
        feed(True, b"STORED\r\n")
    t2 = time.process_time()
    assert engine.error is None, engine.error
    counted = sum(metrics.l7_counts.values())
    assert counted == 2 * n, (counted, metrics.l7_counts)
    return 1e6 * (t1 - t0) / n, 1e6 * (t2 - t1) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=200000)
    ap.add_argument("--profile", choices=["native", "python"])
    ap.add_argument("--impl", action="append", choices=["native", "python"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            run(args.profile, args.n, tmp)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            return 0
        print("| path | us per get + reply | us per set + reply |\n|---|---|---|")
        for impl in args.impl or ["python", "native"]:
            g, s = run(impl, args.n, tmp)
            print(f"| {impl} | {g:.2f} | {s:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
