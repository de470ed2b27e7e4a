#!/usr/bin/env python3
# ruff: noqa: E402  (sys.path is fixed before the imports)
"""Socket-free cost of the redis+policy data path: CPU nanoseconds per pipelined command (with
its reply), native and Python paths side by side.

The shape of ``bench/redis.py -P 16``: batches of 16 ``SET key:<12 digits> <100 bytes>`` and of
16 ``GET``, each fed as one read, then its 16 replies as one read, under bench/redis.py's
CiliumNetworkPolicy (a rule the load never matches first, then ``get``/``set`` on ``key:``),
through the daemon's own PolicyStore, live policy view, Context, AccessLog (``requests:
denied``, to /dev/null), engine and redis parser::

    python bench/redis_socketfree.py                 # both paths
    python bench/redis_socketfree.py --impl native -n 20000

Instruction counts, which do not depend on what else the machine runs, come from two runs
under ``valgrind --tool=callgrind`` with different ``-n``: the difference in instructions over
the difference in commands (bench/README.md, "Fifth round").
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

# bench/ (this script's directory, first on sys.path) holds http.py, which would shadow the
# standard library's http package: take it off the front.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from proxyd.accesslog import AccessLog
from proxyd.context import ConnInfo, Context
from proxyd.metrics import Metrics
from proxyd.parser import Endpoint
from proxyd.policy.store import PolicyStore
from proxyd.registry import Registry
from proxyd.testing import engine_class

LABELS = {"app": "redis", "role": "bench-client"}
PORT = 6379
BATCH = 16


def _bench_policy() -> str:
    """bench/redis.py's policy text (loaded by path: ``import redis`` is redis-py)."""
    spec = importlib.util.spec_from_file_location("bench_redis", _HERE / "redis.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.POLICY).format(redis=PORT)


def run(impl: str, n: int, tmp: Path) -> float:
    """Nanoseconds of CPU per command (request and reply) over ``n`` batches."""
    (tmp / "policy.yaml").write_text(_bench_policy())
    reg = Registry.load()
    store = PolicyStore(reg, [tmp / "policy.yaml"])
    store.reload_files()
    view = store.view("ingress", LABELS, "127.0.0.1", LABELS, PORT, "redis", False)
    assert view.l4().l4_allowed
    metrics = Metrics()
    log = AccessLog("/dev/null", "denied", metrics)
    engine = engine_class(impl)(None, lambda reply, data: None)
    src, dst = Endpoint("127.0.0.1", 40000, LABELS), Endpoint("127.0.0.1", PORT, LABELS)
    ctx = Context(ConnInfo(1, "rd", "ingress", src, dst, "redis"), engine, view, log)
    factory = reg.get("redis")
    engine.parser = factory.create(ctx, factory.validate_config({}))
    value = b"x" * 100
    keys = [b"key:%012d" % (i * 7919 % 100000) for i in range(BATCH)]
    sets = b"".join(b"*3\r\n$3\r\nSET\r\n$16\r\n%s\r\n$100\r\n%s\r\n" % (k, value) for k in keys)
    gets = b"".join(b"*2\r\n$3\r\nGET\r\n$16\r\n%s\r\n" % k for k in keys)
    set_replies = b"+OK\r\n" * BATCH
    get_replies = (b"$100\r\n" + value + b"\r\n") * BATCH
    feed = engine.feed
    t0 = time.process_time()
    for i in range(n):
        if i & 1:
            feed(False, gets)
            feed(True, get_replies)
        else:
            feed(False, sets)
            feed(True, set_replies)
    spent = time.process_time() - t0
    assert engine.error is None, engine.error
    counted = sum(metrics.l7_counts.values())
    assert counted == n * BATCH, (counted, metrics.l7_counts)
    return 1e9 * spent / max(1, n * BATCH)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=50000, help="batches of 16 commands")
    ap.add_argument("--impl", action="append", choices=["native", "python"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print("| path | ns per command + reply |\n|---|---|")
        for impl in args.impl or ["python", "native"]:
            n = args.n if impl == "native" else max(1, args.n // 20)
            print(f"| {impl} | {run(impl, n, Path(d)):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
