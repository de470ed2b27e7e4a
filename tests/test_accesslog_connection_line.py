"""The connection line, rendered without structlog's per-call chain, is byte for byte what the
structlog chain (TimeStamper iso utc + JSONRenderer with proxyd's serializer) writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from proxyd.accesslog import AccessLog, LineWriter, make_logger
from proxyd.context import ConnInfo
from proxyd.metrics import Metrics
from proxyd.parser import Endpoint


@pytest.mark.parametrize("reason", ["closed: \u2028\xff\x00", "lone surrogate \ud800 (the JSON fallback)"])
def test_connection_line_matches_the_structlog_chain(tmp_path: Path, reason: str) -> None:
    src, dst = Endpoint("::1", 40000, {"a": "b"}), Endpoint("127.0.0.1", 11211)
    info = ConnInfo(9, "mc", "ingress", src, dst, "memcache")
    kv = {
        "upstream": "127.0.0.1:11211", "duration_ms": 1.5, "bytes_in": 3, "bytes_out": 4, "verdict": "error",
        "reason": "closed: \u2028\xff\x00", "unforwarded_bytes": {"client": 1, "server": 0},
    }  # fmt: skip
    kv["reason"] = reason
    log = AccessLog(str(tmp_path / "fast.log"), "denied", Metrics())
    log.connection(info, **kv)
    log.close()
    writer = LineWriter(str(tmp_path / "chain.log"))
    make_logger(writer).info("connection", conn_id=9, listener="mc", src=str(src), dst=str(dst), **kv)
    writer.close()
    fast = (tmp_path / "fast.log").read_text()
    chain = (tmp_path / "chain.log").read_text()
    stamp = re.compile(r'"timestamp": ?"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"')
    assert stamp.search(fast) and stamp.search(chain)
    assert stamp.sub("", fast) == stamp.sub("", chain)
    assert json.loads(fast)["event"] == "connection"
