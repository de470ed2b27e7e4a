"""Path normalisation (issue 17 item 11): rules judge, and the server gets, the normalised path.

Tables through the harness at every segmentation, then hypothesis properties of
:func:`proxyd.parsers.http.normalize.normalize` and of the parser.
"""

from __future__ import annotations

from typing import Any

import pytest
from http_helpers import DENIED, run, splits
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import ParserConfigError
from proxyd.parsers.http import HttpFactory
from proxyd.parsers.http.normalize import (
    CONTINUE,
    ESCAPED_SLASHES_ACTIONS,
    REDIRECT,
    REJECT,
    SUSPECT,
    PathOptions,
    normalize,
)
from proxyd.parsers.http.parser import BAD_PATH, redirect_answer
from proxyd.testing import Harness

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


def get(target: str, extra: bytes = b"") -> bytes:
    return b"GET " + target.encode() + b" HTTP/1.1\r\nHost: a\r\nX-Keep: \xe9 1\r\n" + extra + b"\r\n"


# (name, target as sent, target the server gets) with the defaults (Cilium's).
NORMALISED = [
    ("already normal", "/a/b/c", "/a/b/c"),
    ("dot segment", "/api/./x", "/api/x"),
    ("dot-dot segment", "/api/../index.html", "/index.html"),
    ("dot-dot above the root stays at the root", "/../../a", "/a"),
    ("dot-dot alone", "/..", "/"),
    ("trailing dot-dot keeps the slash", "/a/b/..", "/a/"),
    ("trailing dot", "/a/.", "/a/"),
    ("three dots are a name", "/a/.../b", "/a/.../b"),
    ("dotted names are names", "/a/.b/..c/c..", "/a/.b/..c/c.."),
    ("double slash", "/api//x", "/api/x"),
    ("leading and trailing slashes", "//a///b//", "/a/b/"),
    ("dot-dot removes an empty segment first (Envoy's order)", "/a//../b", "/a/b"),
    ("%2e%2e is a dot-dot", "/api/%2e%2e/secret", "/secret"),
    ("%2E and mixed case", "/api/%2E%2e/secret", "/secret"),
    ("%2e. is a dot-dot", "/api/%2e./secret", "/secret"),
    ("unreserved escapes are decoded", "/%41%62%7e%7E%2d%5f%30", "/Ab~~-_0"),
    ("other escapes stay, hex upper-cased", "/a%20b%3f%c3%a9", "/a%20b%3F%C3%A9"),
    ("%25 stays, and what follows it is not decoded again", "/a%2541", "/a%2541"),
    ("backslash is a slash", "/a\\b", "/a/b"),
    ("backslash dot-dot", "/api/..\\secret", "/secret"),
    ("query untouched", "/a/../b?x=/../%2e%2e//&y=%41%zz", "/b?x=/../%2e%2e//&y=%41%zz"),
    ("query with dots kept, path normalised", "/a/./b?../c//d", "/a/b?../c//d"),
    ("empty query", "/a//b?", "/a/b?"),
    ("absolute-form path normalised", "http://a/x/../y?q=..", "http://a/y?q=.."),
    ("absolute-form without a path stays", "http://a", "http://a"),
    ("OPTIONS * untouched", "*", "*"),
]


@pytest.mark.parametrize(("name", "sent", "served"), NORMALISED, ids=[r[0] for r in NORMALISED])
def test_the_server_gets_the_normalised_path_and_the_rest_byte_exact(
    name: str, sent: str, served: str
) -> None:
    method = "OPTIONS" if sent == "*" else "GET"
    wire = get(sent).replace(b"GET", method.encode(), 1)
    want = get(served).replace(b"GET", method.encode(), 1)
    for split in splits(wire, every_cut=len(wire) < 90):
        out = run(wire, [OK], split=split)
        assert (out.to_server, out.to_client, out.closed) == (want, OK, False), (name, split)


def test_access_log_has_the_normalised_path_and_the_original_when_they_differ() -> None:
    h = Harness(HttpFactory(), rules=[{"path": "/api/.*"}])
    h.feed(get("/api//x") + get("/api/x") + get("/api/../secret"))
    h.feed(OK + OK, reply=True)
    assert [(e.entry_type, e.verdict, e.fields) for e in h.log] == [
        (
            "request",
            "forwarded",
            {
                "method": "GET",
                "path": "/api/x",
                "host": "a",
                "version": "HTTP/1.1",
                "original_path": "/api//x",
            },
        ),
        ("request", "forwarded", {"method": "GET", "path": "/api/x", "host": "a", "version": "HTTP/1.1"}),
        (
            "request",
            "denied",
            {
                "method": "GET",
                "path": "/secret",
                "host": "a",
                "version": "HTTP/1.1",
                "original_path": "/api/../secret",
                "reason": "policy",
            },
        ),
        ("response", "forwarded", {"method": "GET", "path": "/api/x", "host": "a", "status": 200}),
        ("response", "forwarded", {"method": "GET", "path": "/api/x", "host": "a", "status": 200}),
    ]


@pytest.mark.parametrize(
    "sent",
    ["/api/../secret", "/api/%2e%2e/secret", "/api/..\\secret", "/api/.%2E/secret", "/api/x/../../secret"],
)
def test_a_prefix_rule_cannot_be_climbed_out_of(sent: str) -> None:
    rules = [{"path": "/api/.*"}]
    wire = get(sent) + get("/api/x")
    for split in splits(wire, every_cut=False):
        out = run(wire, [OK], rules=rules, split=split)
        assert out.to_server == get("/api/x"), (sent, split)
        assert out.to_client == DENIED + OK, (sent, split)


def test_rules_see_the_normalised_path() -> None:
    # a rule written for the normal form allows every spelling of it
    rules = [{"path": "/api/x"}]
    for sent in ("/api/x", "/api//x", "/api/./x", "/api/y/../x", "/%61pi/x", "/api\\x"):
        out = run(get(sent), [OK], rules=rules)
        assert (out.to_server, out.to_client) == (get("/api/x"), OK), sent


# --- escaped slashes --------------------------------------------------------------------------

ESCAPED = ["/api/a%2Fb", "/api/a%2fb", "/api/a%5Cb", "/api/a%5cb"]


@pytest.mark.parametrize("sent", ESCAPED)
def test_escaped_slash_default_is_cilium_s_redirect(sent: str) -> None:
    wire = get(sent) + get("/api/a/b")
    for split in splits(wire, every_cut=False):
        out = run(wire, [OK], split=split)
        assert out.to_server == get("/api/a/b"), (sent, split)  # the redirect is not forwarded
        assert out.to_client == redirect_answer("/api/a/b", False) + OK, (sent, split)
        assert not out.closed
    assert redirect_answer("/api/a/b", False) == (
        b"HTTP/1.1 307 Temporary Redirect\r\nlocation: /api/a/b\r\ncontent-length: 0\r\n\r\n"
    )


def test_escaped_slash_redirect_comes_after_the_normalisation_and_keeps_the_query() -> None:
    out = run(get("/api/x%2F..%2F..%2Fsecret?q=%2F"))
    assert out.to_client == redirect_answer("/secret?q=%2F", False)
    assert out.to_server == b""


@pytest.mark.parametrize(
    ("action", "served", "answer"),
    [
        ("KEEP_UNCHANGED", "/api/a%2Fb%5C", None),
        ("UNESCAPE_AND_FORWARD", "/api/a/b/", None),
        ("REJECT_REQUEST", None, BAD_PATH),
        ("UNESCAPE_AND_REDIRECT", None, redirect_answer("/api/a/b/", False)),
    ],
)
def test_escaped_slash_actions(action: str, served: str | None, answer: bytes | None) -> None:
    wire = get("/api/a%2fb%5c")
    out = run(wire, [OK] if served else [], parser_config={"path_with_escaped_slashes_action": action})
    if served is not None:
        assert (out.to_server, out.to_client) == (get(served), OK)
    else:
        assert (out.to_server, out.to_client, out.closed) == (b"", answer, False)


def test_keep_unchanged_keeps_an_escaped_slash_inside_its_segment() -> None:
    # with KEEP_UNCHANGED, "..%2F" is a name, not a dot segment: it reaches the server as sent
    # (and a server that decodes %2F, as nginx does, resolves it: see docs/parsers/http.md)
    cfg = {"path_with_escaped_slashes_action": "KEEP_UNCHANGED"}
    out = run(get("/api/..%2fsecret"), [OK], rules=[{"path": "/api/.*"}], parser_config=cfg)
    assert out.to_server == get("/api/..%2Fsecret")


# --- refused paths ------------------------------------------------------------------------------

REFUSED = [
    ("fragment", "/a#b", "fragment (#) in the request target"),
    ("fragment in the query", "/a?b#c", "fragment (#) in the request target"),
    ("percent without hex", "/a%zzb", "malformed percent-encoding in the path"),
    ("percent at the end", "/a%", "malformed percent-encoding in the path"),
    ("nested percent", "/a%%30%30", "malformed percent-encoding in the path"),
    ("NUL escape", "/a%00b", "NUL (%00) in the path"),
]


@pytest.mark.parametrize(("name", "sent", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_path_that_cannot_be_normalised_is_answered_400_in_place(name: str, sent: str, reason: str) -> None:
    wire = get("/ok") + get(sent) + get("/ok")
    for split in splits(wire, every_cut=False):
        out = run(wire, [OK, OK], split=split)
        assert out.to_server == get("/ok") + get("/ok"), (name, split)
        assert out.to_client == OK + BAD_PATH + OK, (name, split)
        assert not out.closed and out.errors == (reason,), (name, split)


def test_a_refused_path_with_a_body_drops_the_body_and_closes_when_asked() -> None:
    post = b"POST /a%zz HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    out = run(post + get("/ok"), [OK])
    assert (out.to_server, out.to_client) == (get("/ok"), BAD_PATH + OK)
    out = run(b"GET /a%zz HTTP/1.0\r\n\r\n")
    assert out.to_client.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close" in out.to_client
    assert out.closed


def test_the_query_is_never_checked() -> None:
    wire = get("/a?%zz%00%2F")
    assert run(wire, [OK]).to_server == wire


# --- turning it off ---------------------------------------------------------------------------


def test_all_off_forwards_the_target_as_sent() -> None:
    cfg = {
        "normalize_path": False,
        "merge_slashes": False,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
    }
    for sent in ("/api/../x", "/a//b", "/a%2Fb", "/a%zz", "/a#b"):
        h = Harness(HttpFactory(), rules=[{"path": "/api/.*"}], parser_config=cfg)
        h.feed(get(sent))
        assert h.to_server == (get(sent) if sent.startswith("/api/") else b""), sent


def test_merge_slashes_alone_and_normalise_alone() -> None:
    out = run(get("/a//./b"), parser_config={"normalize_path": False})
    assert out.to_server == get("/a/./b")
    out = run(get("/a//./b"), parser_config={"merge_slashes": False})
    assert out.to_server == get("/a//b")


def test_config_is_validated() -> None:
    f = HttpFactory()
    assert f.validate_config({"path_with_escaped_slashes_action": "REJECT_REQUEST"}) is not None
    for key, value in (
        ("normalize_path", "yes"),
        ("merge_slashes", 1),
        ("path_with_escaped_slashes_action", "reject"),
    ):
        with pytest.raises(ParserConfigError) as err:
            f.validate_config({key: value})
        assert err.value.key == key


def test_path_rewrite_and_header_rewrite_together() -> None:
    rules = [{"path": "/h", "headerMatches": [{"name": "X-Audit", "value": "on", "mismatch": "ADD"}]}]
    out = run(get("//h"), [OK], rules=rules)
    assert out.to_server == get("/h", b"X-Audit: on\r\n")


def test_body_after_a_rewritten_request_line_passes() -> None:
    post = b"POST /a/../u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    chunked = b"POST //c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    for split in splits(post + chunked, every_cut=False):
        out = run(post + chunked, split=split)
        assert out.to_server == post.replace(b"/a/../u", b"/u") + chunked.replace(b"//c", b"/c"), split


# --- properties -----------------------------------------------------------------------------------

SEGMENT = st.sampled_from(
    ["a", "b", ".", "..", "", "%2e", "%2E.", "%2f", "%5C", "\\", "%41", "%7e", "%20", "%c3%A9", "x.y", "..."]
)
PATHS = st.lists(SEGMENT, max_size=8).map(lambda segs: "/" + "/".join(segs))
QUERIES = st.sampled_from(["", "?", "?a=/../b", "?x=%2F//"])
OPTIONS = st.builds(
    PathOptions,
    st.booleans(),
    st.booleans(),
    st.sampled_from(ESCAPED_SLASHES_ACTIONS),
)


def _segments(path: str) -> list[str]:
    return path.split("?", 1)[0].split("/")


@settings(max_examples=200, deadline=None)
@given(path=PATHS, query=QUERIES, opts=OPTIONS)
def test_normalisation_is_idempotent_and_leaves_no_dot_segment(
    path: str, query: str, opts: PathOptions
) -> None:
    first = normalize(path + query, opts)
    if first.action == REJECT:
        assert opts.escaped_slashes == "REJECT_REQUEST"
        return
    again = normalize(first.path, opts)
    assert again.path == first.path
    assert again.action == CONTINUE  # nothing left to redirect for
    assert first.path.endswith(query) if query else "?" not in first.path
    if opts.normalize_path:
        assert not {".", ".."} & set(_segments(first.path))
        assert "\\" not in first.path.split("?", 1)[0]
    if opts.merge_slashes:
        assert "//" not in first.path.split("?", 1)[0]
    if first.action == REDIRECT:
        assert opts.escaped_slashes == "UNESCAPE_AND_REDIRECT"


@settings(max_examples=60, deadline=None)
@given(
    paths=st.lists(st.tuples(PATHS, QUERIES).map("".join), min_size=1, max_size=3),
    cfg=st.fixed_dictionaries(
        {
            "normalize_path": st.booleans(),
            "merge_slashes": st.booleans(),
            "path_with_escaped_slashes_action": st.sampled_from(ESCAPED_SLASHES_ACTIONS),
        }
    ),
    cut=st.lists(st.integers(1, 30), max_size=20),
)
def test_any_segmentation_gives_the_same_normalised_stream(
    paths: list[str], cfg: dict[str, Any], cut: list[int]
) -> None:
    wire = b"".join(get(p) for p in paths)
    rules = [{"path": "/a/.*"}, {"path": "/"}]
    whole = run(wire, [OK] * len(paths), rules=rules, parser_config=cfg)
    for split in (cut, "bytes"):
        assert run(wire, [OK] * len(paths), rules=rules, parser_config=cfg, split=split) == whole
    # what reached the server is already normal: normalising it again changes nothing
    opts = PathOptions(cfg["normalize_path"], cfg["merge_slashes"], cfg["path_with_escaped_slashes_action"])
    for line in whole.to_server.split(b"\r\n"):
        if line.startswith(b"GET "):
            target = line.split(b" ")[1].decode()
            assert normalize(target, opts).path == target


@settings(max_examples=300, deadline=None)
@given(
    rest=st.text("".join(chr(c) for c in range(0x21, 0x7F)), max_size=30) | PATHS.map(lambda p: p[1:]),
    opts=OPTIONS,
)
def test_a_target_the_parser_skips_is_one_normalisation_leaves_alone(rest: str, opts: PathOptions) -> None:
    # the parser calls normalize only for targets SUSPECT finds: the others must be normal
    target = "/" + rest
    if SUSPECT.search(target) is None:
        assert normalize(target, opts) == normalize(target, opts).__class__(CONTINUE, target)
