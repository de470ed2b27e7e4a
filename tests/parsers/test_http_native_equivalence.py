"""The native http twin against the Python reference: same inputs, same segmentation, same outcome.

As tests/test_native_equivalence.py does for the engine and memcache: hypothesis drives
``Harness(implementation="python" | "native")`` with the same HTTP traffic, cut into the same
chunks and interleaved the same way, and compares every op, the bytes forwarded, dropped and
injected per direction, log entries, the error, bytes still buffered, bytes left at end of
stream and the requests awaiting responses. Traffic: the hot case (keep-alive requests with
Content-Length bodies and their responses), paths normalisation changes or refuses, smuggling
attempts (Content-Length with Transfer-Encoding, two Content-Lengths, obs-fold, bare LF, bad chunk
sizes), the llhttp grammar's near-valid messages (tests/parsers/http_grammar.py), mutations and
random bytes. Policies: allow-all and harness rules (the twin asks ``ctx.matches``), and the
daemon's live policy, which the twin flattens and evaluates in C (proxyd/_native_src/http_rules.c),
in audit mode too, with the daemon's access log and counters in every ``access_log.requests`` mode.

Also run by CI's sanitizer job (.ci/sanitize).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from http_grammar import request as grammar_request
from http_grammar import response as grammar_response
from hypothesis import given
from hypothesis import strategies as st
from live_connection import policy_doc, run_live
from test_native_equivalence import EXAMPLES, SETTINGS, Schedule, mutate, run, schedules

from proxyd.parsers.http import HttpFactory
from proxyd.testing import Harness

METHODS = [b"GET"] * 4 + [b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]
PATHS = [b"/public/a.txt"] * 4 + [
    b"/api/v1/x?q=1", b"/a/b", b"/", b"/a/../b", b"//x", b"/%2Fx", b"/%41b", b"/a#f", b"/a/./b",
    b"/\\x", b"/%zz", b"/%00", b"/\xc3\xa9", b"/a?x=/../y", b"*", b"http://a/p",
]  # fmt: skip
HOSTS: list[bytes | None] = [b"a"] * 3 + [b"a:80", b"b", b"[::1]:80", b"x y", b"", None, b"\xe9", b" a\t"]
EXTRA = [
    b"X-Team: blue", b"X-Team: red", b"Authorization: t", b"X-Audit: on", b"x-team:blue",
    b"Connection: close", b"Connection: keep-alive", b"Connection: Keep-Alive, foo",
    b"Expect: 100-continue", b"Upgrade: websocket\r\nConnection: upgrade",
    b"Content-Length: 3", b"Content-Length: 0", b"Transfer-Encoding: chunked", b"Content-Length: 5, 5",
    b"Content-Length: 3\r\nContent-Length: 3", b"Content-Length: 3\r\nTransfer-Encoding: chunked",
    b"Host: dup", b" folded", b"Bad Name: x", b"X:\x00", b"X-Long: " + b"v" * 300, b"content-LENGTH: 3",
]  # fmt: skip
BODIES = [
    b"abc",
    b"3\r\nabc\r\n0\r\n\r\n",
    b"3 ;x\r\nabc\r\n0\r\n\r\n",
    b"zz\r\n",
    b"3\r\nabc\r\n0\r\nT: 1\r\n\r\n",
]
CHUNKED = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nabcd\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b"b" * 40,
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nno",
    b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 503 Busy\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx",
    b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
]


CLEAN_PATHS = [
    b"/public/a.txt", b"/api/v1/x?q=1", b"/a/b", b"/", b"/x/public/", b"/\xc3\xa9", b"/public/q?a=%2F..//x",
    b"/public/?./a", b"/public/a?#", b"/public/a%3F?x", b"/p/.?x", b"/p/?",
]  # fmt: skip
CLEAN_EXTRA = [b"X-Team: blue", b"X-Team: red", b"Authorization: t", b"X-Audit: on", b"User-Agent: wrk",
               b"Connection: keep-alive", b"Accept: */*"]  # fmt: skip


@st.composite
def clean_request(draw: st.DrawFn) -> bytes:
    """The hot case: an origin-form request with no body or a Content-Length one."""
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"PUT", b"DELETE"]))
    lines = [method + b" " + draw(st.sampled_from(CLEAN_PATHS)) + b" HTTP/1.1"]
    lines.append(b"Host: " + draw(st.sampled_from([b"a", b"a:80", b"b"])))
    lines += draw(st.lists(st.sampled_from(CLEAN_EXTRA), max_size=3))
    body = draw(st.sampled_from([b"", b"", b"abc", b"x" * 70, b"chunked"]))
    if body == b"chunked":
        lines.append(draw(st.sampled_from([b"Transfer-Encoding: chunked", b"transfer-encoding: Chunked "])))
        body = draw(st.sampled_from([b"3\r\nabc\r\n0\r\n\r\n", b"1a\r\n" + b"y" * 26 + b"\r\n0\r\n\r\n",
                                     b"2;e=1\r\nab\r\n0\r\nT: x\r\n\r\n", b"0\r\n\r\n"]))  # fmt: skip
    elif body:
        lines.append(b"Content-Length: %d" % len(body))
    if draw(st.integers(0, 7)) == 0:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@st.composite
def hot_request(draw: st.DrawFn) -> bytes:
    """A request built from parts: mostly the hot case, often one near-valid or hostile part."""
    if draw(st.integers(0, 2)) > 0:
        return draw(clean_request())
    method, path = draw(st.sampled_from(METHODS)), draw(st.sampled_from(PATHS))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0", b"HTTP/1.2"]))
    eol = draw(st.sampled_from([b"\r\n"] * 12 + [b"\n"]))
    lines = [method + b" " + path + b" " + version]
    host = draw(st.sampled_from(HOSTS))
    if host is not None:
        lines.append(b"Host: " + host)
    lines += draw(st.lists(st.sampled_from(EXTRA), max_size=3))
    head = eol.join(lines) + eol + eol
    if draw(st.booleans()):
        return b"\r\n" + head if draw(st.integers(0, 9)) == 0 else head
    return head + draw(st.sampled_from(BODIES))


@st.composite
def http_traffic(draw: st.DrawFn) -> tuple[bytes, bytes]:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200)), draw(st.binary(max_size=200))
    reqs = draw(st.lists(st.one_of(hot_request(), grammar_request()) if kind == 1 else hot_request(),
                         min_size=1, max_size=6))  # fmt: skip
    reps = draw(st.lists(st.one_of(st.sampled_from(RESPONSES), grammar_response()) if kind == 2
                         else st.sampled_from(RESPONSES[:5] + CHUNKED), max_size=8))  # fmt: skip
    client, server = b"".join(reqs), b"".join(reps)
    if draw(st.integers(0, 4)) == 0:
        client = mutate(client, draw)
    if draw(st.integers(0, 4)) == 0:
        server = mutate(server, draw)
    return client, server


@st.composite
def http_schedules(draw: st.DrawFn, client: bytes, server: bytes) -> Schedule:
    """schedules(), or chunks up to a few hundred bytes, or whole streams: whole heads are the
    twin's own path, cut heads the reference's (and the hand-over between them)."""
    most = draw(st.sampled_from([0, 1, 2]))
    if most == 0:
        return draw(schedules(client, server))

    def cut(data: bytes) -> list[bytes]:
        if most == 2:
            return [data] if data else []
        out, pos = [], 0
        while pos < len(data):
            k = draw(st.integers(1, 400))
            out.append(data[pos : pos + k])
            pos += k
        return out

    a, b = cut(client), cut(server)
    order = draw(st.lists(st.booleans(), min_size=len(a) + len(b), max_size=len(a) + len(b)))
    sched: Schedule = []
    for reply in order:
        src = b if reply else a
        if not src:
            src, reply = (a, False) if reply else (b, True)
        sched.append((reply, src.pop(0)))
    return sched


RULE_CHOICES: list[Mapping[str, Any]] = [
    {"method": "GET", "path": "/public/.*"},
    {"method": "POST|PUT", "path": "/api/v1/.*"},
    {"host": "a(:80)?"},
    {"headers": ["X-Team: blue"]},
    {"headers": ["Authorization"]},
    {"method": "GET", "headerMatches": [{"name": "X-Audit", "value": "on", "mismatch": "ADD"}]},
    {"path": "/a/.*", "headerMatches": [{"name": "X-Team", "value": "blue"}]},
    {"path": "/\u00e9.*"},
    {"method": "HEAD|OPTIONS"},
    {},
]

CONFIGS: list[Mapping[str, Any]] = [
    {},
    {"normalize_path": False, "merge_slashes": False, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"},
    {"max_header_bytes": 256, "log_responses": False},
    {"path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"},
]


def run_http(impl: str, rules: Sequence[Mapping[str, Any]] | None, config: Mapping[str, Any],
             sched: Schedule, eof: tuple[bool, bool]) -> dict[str, Any]:  # fmt: skip
    h = Harness(HttpFactory(), rules=rules, parser_config=config, implementation=impl)
    res = run(h, sched, eof)
    res["pending"] = h.engine.parser.pending_requests()  # type: ignore[attr-defined]
    return res


@SETTINGS
@given(
    traffic=http_traffic(),
    rules=st.one_of(st.none(), st.lists(st.sampled_from(RULE_CHOICES), max_size=4)),
    config=st.sampled_from(CONFIGS),
    data=st.data(),
    eof=st.tuples(st.booleans(), st.booleans()),
)
def test_http_equivalent(
    traffic: tuple[bytes, bytes], rules: list[Mapping[str, Any]] | None, config: Mapping[str, Any],
    data: st.DataObject, eof: tuple[bool, bool],
) -> None:  # fmt: skip
    client, server = traffic
    sched = data.draw(http_schedules(client, server))
    assert run_http("native", rules, config, sched, eof) == run_http("python", rules, config, sched, eof)


@pytest.mark.parametrize(
    ("client", "server"),
    [
        (
            b"GET /public/a.txt HTTP/1.1\r\nHost: a\r\n\r\n" * 3,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" * 3,
        ),
        (
            b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b"b" * 40,
        ),
        # smuggling: CL+TE, two CLs, obs-fold, bare LF, a bad chunk size, after an allowed request
        (
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b""),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", b""),
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", b""),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", b""),
        (
            b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\nGET /public/a HTTP/1.1\r\nHost: a\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            b"GET /public/../secret HTTP/1.1\r\nHost: a\r\n\r\nGET /public/%2F HTTP/1.1\r\nHost: a\r\n\r\n",
            b"",
        ),
        (
            b"GET /public/a HTTP/1.0\r\n\r\nGET /public/b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nx",
        ),
    ],
)
@pytest.mark.parametrize("whole", [True, False])
def test_http_tables_equivalent(client: bytes, server: bytes, whole: bool) -> None:
    rules = [{"method": "GET|POST", "path": "/.*"}]
    if whole:
        sched: Schedule = [(False, client), (True, server)] if server else [(False, client)]
    else:
        sched = [(False, client[i : i + 7]) for i in range(0, len(client), 7)]
        sched += [(True, server[i : i + 5]) for i in range(0, len(server), 5)]
    assert run_http("native", rules, {}, sched, (True, True)) == run_http(
        "python", rules, {}, sched, (True, True)
    )


def test_the_twin_answers_keep_alive_gets_itself() -> None:
    """The hot case (wrk's keep-alive GETs and their responses) never reaches the reference."""
    h = Harness(HttpFactory(), rules=[{"method": "GET", "path": "/public/.*"}], implementation="native")
    for _ in range(5):
        h.feed(b"GET /public/a.txt HTTP/1.1\r\nHost: a\r\n\r\n")
        h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", reply=True)
    p: Any = h.engine.parser
    assert type(p).__name__ == "Http"
    assert p.counts() == (10, 0)
    assert h.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" * 5
    # a denial is the reference's (it places the 403); the twin takes the connection back after
    h.feed(b"DELETE /public/a.txt HTTP/1.1\r\nHost: a\r\n\r\nGET /public/b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert p.counts() == (11, 1) and not p.delegated
    assert h.to_client.endswith(b"Access denied\r\n")


def test_the_python_path_is_the_reference_parser() -> None:
    h = Harness(HttpFactory(), implementation="python")
    assert type(h.engine.parser).__name__ == "HttpParser"


# --- the daemon's live policy (flattened in C) and access log ---------------------------------

POLICY_RULES = [
    '{method: GET, path: "/public/.*"}',
    '{method: "POST|PUT", path: "/api/v1/.*"}',
    '{host: "a(:80)?"}',
    '{headers: ["X-Team: blue"]}',
    '{headers: ["Authorization"]}',
    '{method: GET, headerMatches: [{name: X-Audit, value: "on", mismatch: ADD}]}',
    '{path: "/\\u00e9.*"}',
    '{method: "HEAD|OPTIONS"}',
    "{}",
]



def run_live_policy(impl: str, docs: list[str], audit: bool, mode: str, sched: Schedule, tmp: Any) -> Any:
    return run_live(HttpFactory(), "http", "web", 80, impl, docs, audit, mode, sched, tmp)


@SETTINGS.__class__(parent=SETTINGS, max_examples=max(20, EXAMPLES // 2))
@given(
    traffic=http_traffic(),
    data=st.data(),
    rules=st.lists(st.lists(st.sampled_from(POLICY_RULES), max_size=4), min_size=1, max_size=2),
    audit=st.booleans(),
    mode=st.sampled_from(["all", "denied", "none"]),
)
def test_http_live_policy_equivalent(
    traffic: tuple[bytes, bytes], data: st.DataObject, rules: list[list[str]], audit: bool, mode: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    docs = [policy_doc("http", "web", 80, r) for r in rules]
    client, server = traffic
    sched = data.draw(http_schedules(client, server))
    tmp = tmp_path_factory.mktemp("live")
    native = run_live_policy("native", docs, audit, mode, sched, tmp)[0]
    assert native == run_live_policy("python", docs, audit, mode, sched, tmp)[0]


def test_the_live_policy_is_evaluated_in_c(tmp_path: Any) -> None:
    """Allowed keep-alive GETs under the daemon's policy: no call reaches the reference."""
    rules = ['{method: POST, path: "/x"}', '{method: GET, path: "/public/.*"}']
    docs = [policy_doc("http", "web", 80, rules)]
    req = b"GET /public/a.txt HTTP/1.1\r\nHost: a\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    sched: Schedule = [(False, req), (True, resp)] * 4
    (counts, streams, lines, err), parser = run_live_policy("native", docs, False, "denied", sched, tmp_path)
    assert streams == (resp * 4, req * 4) and lines == [] and err is None
    assert parser.counts() == (8, 0)
    assert counts == run_live_policy("python", docs, False, "denied", sched, tmp_path)[0][0]


def test_a_query_normalisation_leaves_alone_stays_in_the_twin() -> None:
    """normalize.py only ever changes the path: a '%' or '//' in the query alone is the twin's."""
    cases = ((b"/public/s?q=a%20b//c/..", True), (b"/public/a/../b", False), (b"/p/s?q#f", False))
    for target, native in cases:
        h = Harness(HttpFactory(), rules=[{"path": "/public/.*"}], implementation="native")
        h.feed(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (h.engine.parser.counts()[1] == 0) == native, target  # type: ignore[attr-defined]


def test_chunked_responses_stay_in_the_twin() -> None:
    """Chunk lines without extensions, chunk data and an empty trailer section are the twin's."""
    resp = CHUNKED[0]
    for split in (None, 3):
        h = Harness(HttpFactory(), implementation="native")
        h.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 2)
        for i in range(0, 2 * len(resp), split or 2 * len(resp)):
            h.feed((resp * 2)[i : i + (split or 2 * len(resp))], reply=True)
        assert h.to_client == resp * 2 and h.engine.parser.counts()[1] == 0  # type: ignore[attr-defined]


def test_chunked_requests_stay_in_the_twin() -> None:
    body = b"3\r\nabc\r\n1a\r\n" + b"y" * 26 + b"\r\n0\r\n\r\n"
    req = b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    for split in (None, "bytes"):
        h = Harness(HttpFactory(), implementation="native")
        h.feed(req * 2, split=split)
        assert h.to_server == req * 2 and h.engine.parser.counts()[1] == 0  # type: ignore[attr-defined]


# --- the flattened-policy interface, as the http twin reads it ---------------------------------


class FlatPolicyOf:
    """A policy with a flat form, as the daemon's LiveConnectionPolicy has, counting ``decide``
    (the twin asks it only for a rule the flat form defers: ``headerMatches``)."""

    def __init__(self, rules: list[dict[str, Any]]) -> None:
        from proxyd.context import L7Decision
        from proxyd.policy.engine import ConnectionPolicy

        matchers = tuple((HttpFactory().compile_rule(r), L7Decision(True, "t")) for r in rules)
        self.cp = ConnectionPolicy(True, "", always=None, matchers=matchers, denied=L7Decision(False, "t"))
        self.cell: list[object] = [object()]
        self.decided = 0

    def decide(self, request: Any) -> Any:
        self.decided += 1
        return self.cp.decide(request)

    def flat(self) -> Any:
        from proxyd.policy import flat

        return flat.build(self.cp, self.cell[0], self.cell)


FLAT_RULES: list[dict[str, Any]] = [
    {"method": "GET", "path": "/a/.*"},
    {"method": "PUT", "headers": ["X-Team: blue"]},
    {"path": "/h/.*", "headerMatches": [{"name": "X-Audit", "value": "on", "mismatch": "ADD"}]},
]
FLAT_HTTP = [  # (request, allowed), fed one by one and each answered: every call starts in the twin
    (b"GET /a/1 HTTP/1.1\r\nHost: h\r\n\r\n", True),
    (b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n", False),
    (b"PUT /b HTTP/1.1\r\nHost: h\r\nX-Team: blue\r\nContent-Length: 0\r\n\r\n", True),
    (b"PUT /c HTTP/1.1\r\nHost: h\r\nX-Team: red\r\nContent-Length: 0\r\n\r\n", False),
    (b"GET /h/1 HTTP/1.1\r\nHost: h\r\n\r\n", True),
]


def test_the_http_twin_decides_through_the_flat_form() -> None:
    runs = {}
    for impl in ("native", "python"):
        policy = FlatPolicyOf(FLAT_RULES)
        h = Harness(HttpFactory(), policy=policy, implementation=impl)
        for request, allowed in FLAT_HTTP:
            h.feed(request)
            if allowed:  # else proxyd answers it
                h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", reply=True)
        runs[impl] = (h.out, h.log, policy.decided)
    (n_out, n_log, n_decided), (p_out, p_log, p_decided) = runs["native"], runs["python"]
    assert (n_out, n_log) == (p_out, p_log)
    assert [e.verdict for e in n_log if e.entry_type == "request"] == [
        "forwarded" if allowed else "denied" for _, allowed in FLAT_HTTP
    ]
    assert n_out[True].count(b"200 OK") == 3 and n_out[True].count(b"403") == 2
    assert p_decided == 5
    # the twin decided two from the flat form, the headers rule included (a call), and asked
    # ctx.matches for the three that reached the headerMatches rule, which the form defers
    assert n_decided == 3
    assert b"X-Audit: on" in n_out[False]
