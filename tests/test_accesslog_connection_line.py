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


@pytest.mark.parametrize(
    "kv",
    [
        {"upstream": "127.0.0.1:11211", "duration_ms": 0.0, "bytes_in": 0, "bytes_out": 0,
         "verdict": "forwarded", "closed_by": "client"},
        {"upstream": None, "duration_ms": 12345.678, "bytes_in": 1 << 40, "bytes_out": 7, "verdict": "denied",
         "reason": "policy: denied by 'x' (file.yaml:3)"},
        {"upstream": "[::1]:80", "duration_ms": 1e-05, "bytes_in": 1, "bytes_out": 2, "verdict": "error",
         "reason": "client closed: [Errno 104]", "tls_sni": None, "flag": True},
    ],
)  # fmt: skip
def test_common_connection_lines_match_the_chain(tmp_path: Path, kv: dict[str, object]) -> None:
    """Common lines (ASCII strings, ints, floats, None, a bool), cached timestamp: the same bytes."""
    info = ConnInfo(123456, "web-1", "egress", Endpoint("10.0.0.1", 40000), Endpoint("fe80::1", 443), "http")
    log = AccessLog(str(tmp_path / "fast.log"), "denied", Metrics())
    log.connection(info, **kv)
    log.close()
    writer = LineWriter(str(tmp_path / "chain.log"))
    src, dst = str(info.src), str(info.dst)
    make_logger(writer).info("connection", conn_id=123456, listener="web-1", src=src, dst=dst, **kv)
    writer.close()
    fast = (tmp_path / "fast.log").read_bytes()
    chain = (tmp_path / "chain.log").read_bytes()
    stamp = re.compile(rb'"timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"')
    assert stamp.search(fast) and stamp.search(chain)
    assert stamp.sub(b"", fast) == stamp.sub(b"", chain)


def test_cached_timestamp_is_the_datetime_one() -> None:
    """The connection line's timestamp (date part formatted once a second) reads as datetime's."""
    import datetime

    from proxyd.accesslog import _utc_now, _utc_stamp

    for _ in range(200):
        fast, slow = _utc_stamp(), _utc_now()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", fast)
        delta = datetime.datetime.fromisoformat(slow) - datetime.datetime.fromisoformat(fast)
        assert datetime.timedelta(0) <= delta < datetime.timedelta(seconds=1)
