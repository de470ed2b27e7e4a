"""The c3po parser through proxyd.testing.Harness: tables at every split, config, rules, and a
hypothesis property that segmentation never changes the outcome."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxyd_c3po import MAX_LINE, C3poConfig, C3poFactory, C3poRequest

from proxyd.errors import ParserConfigError, RuleError
from proxyd.ops import DROP, MORE, PASS
from proxyd.testing import Harness

Rules = Sequence[Mapping[str, str]] | None


def harness(rules: Rules = None, **config: Any) -> Harness:
    return Harness(C3poFactory(), rules=rules, parser_config=config)


def splits(data: bytes) -> Iterator[object]:
    """Unsplit, byte by byte, at random, and cut in two at every byte."""
    yield None
    yield "bytes"
    yield "random"
    for i in range(1, len(data)):
        yield [i]


# (requests, rules, parser_config, what reaches the server, what the client gets back)
CASES: list[tuple[bytes, Rules, dict[str, Any], bytes, bytes]] = [
    (b"hello\r\n", None, {}, b"hello\r\n", b""),
    (b"hello C-3PO\r\n", None, {}, b"", b""),
    (b"C-3PO\r\nR2-D2\r\nc-3po\r\n", None, {}, b"R2-D2\r\nc-3po\r\n", b""),  # case matters
    (b"hi C-3PO\r\nhi\r\n", None, {"deny_reply": "ERROR no droids"}, b"hi\r\n", b"ERROR no droids\r\n"),
    (b"BB-8\r\nhi C-3PO\r\n", None, {"banned": "BB-8"}, b"hi C-3PO\r\n", b""),
    (b"hello\r\nbye\r\n", [{"line": "^hello"}], {}, b"hello\r\n", b""),
    (b"hello C-3PO\r\n", [{"line": "^hello"}], {}, b"", b""),  # banned beats allowed
    (b"hello\r\nbye\r\n", [{}], {}, b"hello\r\nbye\r\n", b""),
    (b"hello\r\nbye\r\n", [], {"deny_reply": ""}, b"", b"\r\n\r\n"),
]


@pytest.mark.parametrize(("requests", "rules", "config", "to_server", "to_client"), CASES)
def test_table_at_every_split(
    requests: bytes, rules: Rules, config: dict[str, Any], to_server: bytes, to_client: bytes
) -> None:
    for split in splits(requests):
        h = harness(rules, **config)
        h.feed(requests, split=split)  # type: ignore[arg-type]
        assert h.error is None, split
        assert h.to_server == to_server, split
        assert h.to_client == to_client, split


def test_ops_and_log() -> None:
    h = harness()
    assert h.feed(b"hello\r\nhello C-3PO\r\nhel") == [(PASS, 7), (DROP, 13), (MORE, 1)]
    assert [(e.verdict, e.fields) for e in h.log] == [
        ("forwarded", {"line": "hello"}),
        ("denied", {"line": "hello C-3PO", "reason": "banned"}),
    ]
    assert h.eof() == 3  # an unfinished line is not forwarded


def test_policy_denial_is_logged_with_its_reason_and_policy() -> None:
    h = harness([{"line": "^hello"}])
    h.feed(b"bye\r\n")
    assert [(e.verdict, e.fields["reason"], e.policy) for e in h.log] == [("denied", "policy", "test")]


def test_replies_pass_unparsed() -> None:
    replies = b"I am C-3PO, human-cyborg relations\r\nno line end"
    for split in splits(replies):
        h = harness([])  # deny every request: replies are not requests
        h.feed(replies, reply=True, split=split)  # type: ignore[arg-type]
        assert h.to_client == replies
        assert h.log == []


def test_over_long_line_is_an_error() -> None:
    wire = b"a" * (MAX_LINE - 1) + b"\r\n"
    for split in (None, "bytes"):
        h = harness()
        h.feed(wire, split=split)
        assert h.error is not None
        assert h.error.kind == "parser_error"
        assert h.to_server == b""
    h = harness()
    h.feed(b"a" * (MAX_LINE - 2) + b"\r\n")
    assert h.error is None


def test_config() -> None:
    f = C3poFactory()
    assert f.validate_config({}) == C3poConfig()
    assert f.validate_config({"banned": "BB-8", "deny_reply": "NO"}) == C3poConfig(b"BB-8", b"NO\r\n")
    assert f.validate_config({"deny_reply": None}) == C3poConfig()
    for bad in ({"banned": ""}, {"banned": 3}, {"banned": "a\nb"}, {"deny_reply": "x\r\n"}, {"mode": 1}):
        with pytest.raises(ParserConfigError) as info:
            f.validate_config(bad)
        assert info.value.key == next(iter(bad))


def test_rules() -> None:
    f = C3poFactory()
    assert f.compile_rule({}).matches(C3poRequest("anything"))
    assert f.compile_rule({"line": "R2"}).matches(C3poRequest("hi R2"))  # searched, not anchored
    assert not f.compile_rule({"line": "^R2"}).matches(C3poRequest("hi R2"))
    assert not f.compile_rule({}).matches("not a request")
    with pytest.raises(RuleError) as info:
        f.compile_rule({"line": "("})
    assert info.value.key == "line"
    with pytest.raises(RuleError) as info:
        f.compile_rule({"cmd": "READ"})
    assert info.value.key == "cmd"


lines = st.lists(
    st.one_of(
        st.sampled_from([b"hello", b"hello C-3PO", b"C-3P", b"O", b""]).map(lambda x: x + b"\r\n"),
        st.binary(max_size=6),
    ),
    max_size=10,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(
    data=lines, cut=st.lists(st.integers(1, 10), max_size=20), rules=st.sampled_from([None, [{"line": "^h"}]])
)
def test_any_segmentation_gives_the_same_result(data: bytes, cut: list[int], rules: Rules) -> None:
    def run(split: object) -> tuple[object, ...]:
        h = harness(rules, deny_reply="NO")
        h.feed(data, split=split)  # type: ignore[arg-type]
        kind = h.error.kind if h.error else None
        return h.to_server, h.to_client, h.dropped, kind, [(e.verdict, e.fields) for e in h.log]

    assert run(cut) == run(None) == run("bytes")
    # And nothing makes the parser raise out of the sandbox.
    assert run(None)[3] in (None, "parser_error")
