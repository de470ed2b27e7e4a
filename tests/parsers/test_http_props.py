"""Hypothesis properties of the http parser: segmentation never matters; no input raises or
makes it hold more than its bounds."""

from __future__ import annotations

from http_grammar import requests, responses
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.parsers.http import HttpFactory
from proxyd.parsers.http.parser import ENTRY_COST, PENDING_BUDGET
from proxyd.testing import Harness

RULES = [
    {"method": "GET|HEAD"},
    {"path": "/ok.*", "headerMatches": [{"name": "X-A", "value": "1", "mismatch": "REPLACE"}]},
]


def _run(reqs: bytes, resps: bytes, split: object, limit: int = 1 << 20) -> tuple[object, ...]:
    h = Harness(HttpFactory(), rules=RULES, buffer_limit=limit, parser_config={"max_header_bytes": 512})
    h.feed(reqs, split=split)  # type: ignore[arg-type]
    h.feed(resps, reply=True, split=split)  # type: ignore[arg-type]
    return (h.to_server, h.to_client, h.error and h.error.kind, [(e.verdict, e.fields) for e in h.log])


@settings(max_examples=60, deadline=None)
@given(reqs=requests(), resps=responses(), cut=st.lists(st.integers(1, 40), max_size=30))
def test_any_segmentation_gives_the_same_result(reqs: bytes, resps: bytes, cut: list[int]) -> None:
    whole = _run(reqs, resps, None)
    assert _run(reqs, resps, cut) == whole
    assert _run(reqs, resps, "bytes") == whole


@settings(max_examples=100, deadline=None)
@given(
    data=st.one_of(
        requests(), st.binary(max_size=600), st.tuples(requests(), st.binary(max_size=80)).map(b"".join)
    ),
    resps=st.one_of(responses(), st.binary(max_size=300)),
)
def test_verdicts_or_error_never_an_exception_never_unbounded(data: bytes, resps: bytes) -> None:
    limit = 2048
    h = Harness(HttpFactory(), rules=RULES, buffer_limit=limit, parser_config={"max_header_bytes": 512})
    for i in range(0, len(data), 7):
        h.feed(data[i : i + 7])
        assert h.engine.buffered(False) <= 512 + 7
    for i in range(0, len(resps), 5):
        h.feed(resps[i : i + 5], reply=True)
        assert h.engine.buffered(True) <= 512 + 5
    h.eof(False)
    h.eof(True)
    assert h.error is None or h.error.kind == "parser_error", h.error
    parser = h.engine.parser
    assert parser.pending_bytes <= PENDING_BUDGET + 512 + ENTRY_COST  # type: ignore[attr-defined]


LINES = st.sampled_from(
    [b"X-A: " + b"a" * 90 + b"\r\n", b"Set-Cookie: " + b"c" * 200 + b"\r\n", b"Content-Length: 1\r\n",
     b"X-B: b\r\n", b"Bad Line\r\n", b"X-L: " + b"l" * 300 + b"\r\n", b"X-C: c\n"]
)  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(lines=st.lists(LINES, max_size=12), cut=st.lists(st.integers(1, 60), max_size=40))
def test_a_streamed_response_head_gives_the_same_result_however_cut(
    lines: list[bytes], cut: list[int]
) -> None:
    resp = b"HTTP/1.1 200 OK\r\n" + b"".join(lines) + b"\r\nx" + b"HTTP/1.1 204 No Content\r\n\r\n"

    def go(split: object) -> tuple[object, ...]:
        h = Harness(HttpFactory(), parser_config={"max_header_bytes": 256})
        h.feed(GET2)
        h.feed(resp, reply=True, split=split)  # type: ignore[arg-type]
        return (h.to_client, h.closed, [(e.verdict, e.fields) for e in h.log])

    whole = go(None)
    assert go(cut) == whole
    assert go("bytes") == whole


GET2 = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
