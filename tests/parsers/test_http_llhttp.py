"""Differential test: proxyd's request and response framing against llhttp (through httptools).

llhttp runs in its default strict mode (no lenient flags). httptools reports no byte offsets, so
it is fed one byte at a time: ``on_message_complete`` then fires on the message's last byte. For
every generated input both must agree on where each message ends, or both must reject it. Where
they disagree, the RFC decides, and the case is named below with the section that says so;
any disagreement not named here fails the test.

Both http paths run it: on the native one (``impl="native"``) the compiled twin
(``proxyd._native.Http``) is fed the same bytes in lockstep with the reference, and after every
byte what each has done (ops, bytes out, log entries, the close) must be the same, so the ends
read off the reference's state are the twin's too; the whole input fed at once must also give the
same outcome (a whole head is the twin's own path, a byte at a time mostly the reference's).
"""

from __future__ import annotations

from typing import Any

import pytest
from http_grammar import requests, response
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxyd.native import native_module
from proxyd.parsers.http import HttpFactory
from proxyd.parsers.http.parser import PS_UNTIL_CLOSE, RS_DRAIN, RS_HEAD, RS_WAIT
from proxyd.testing import Harness

httptools = pytest.importorskip("httptools")

#: proxyd rejects, llhttp accepts: proxyd's reason -> why (the RFC's word).
STRICTER = {
    "HTTP/1.1 request without Host": "RFC 9112 3.2: a server MUST respond 400 to an HTTP/1.1 request "
    "without Host",
    "more than one Host": "RFC 9112 3.2: MUST respond 400 to a request with more than one Host field line",
    "invalid Host": "RFC 9112 3.2: MUST respond 400 to a Host field with an invalid value",
    "Transfer-Encoding in an HTTP/1.0 request": "RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding "
    "MUST be treated as having faulty framing",
    "invalid request line": "RFC 9112 3: one SP between the three elements, a token method, a target of "
    "visible ASCII; a recipient MUST NOT autocorrect an invalid line (llhttp takes several spaces)",
    "asterisk-form target outside OPTIONS": "RFC 9112 3.2.4: the asterisk-form is only used for OPTIONS",
    "invalid request target": "RFC 9112 3.2: a target in none of the four forms (authority-form only "
    "for CONNECT)",
    "unsupported HTTP version 2.0": "RFC 9112 2.3: HTTP/2 does not use this syntax; only 1.0 and 1.1 "
    "are framed",
    "Host differs from the absolute-form target's authority": "RFC 9112 3.2: the Host value MUST be "
    "identical to the target's authority (else policy on Host would not be what the server routes on)",
    "userinfo in an absolute-form target": "RFC 9110 4.2.4: userinfo in an http(s) URI is to be treated "
    "as an error",
    "a body on CONNECT": "RFC 9110 9.3.6: a CONNECT request has no content",
}

#: llhttp rejects, proxyd accepts: llhttp's message -> why proxyd accepts (the RFC's word).
LENIENT = {
    "Invalid method encountered": "RFC 9110 9.1: a method is any token (extension methods are allowed); "
    "llhttp knows a fixed list. proxyd forwards any token and leaves methods to the policy",
}


def test_the_oracle_runs_strict() -> None:
    """httptools exposes llhttp's lenient flags (set_dangerous_leniencies); all are off here."""
    bare_lf = b"GET / HTTP/1.1\r\nHost: a\n\r\n"
    assert llhttp_ends(bare_lf)[1] is not None  # strict: refused
    done: list[int] = []

    class Proto:
        def on_message_complete(self) -> None:
            done.append(1)

    lenient = httptools.HttpRequestParser(Proto())
    lenient.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    lenient.feed_data(bare_lf)
    assert done == [1]  # what a lenient llhttp would have let through


def llhttp_ends(data: bytes, resp_to: int = 0) -> tuple[list[int], str | None]:
    """Message ends per llhttp (requests, or responses when ``resp_to``), and its error, if any."""
    done: list[int] = []
    keep: list[bool] = []

    class Proto:
        def on_message_complete(self) -> None:
            done.append(0)
            keep.append(bool(parser.should_keep_alive()))

    parser = (httptools.HttpResponseParser if resp_to else httptools.HttpRequestParser)(Proto())
    ends: list[int] = []
    for i in range(len(data)):
        try:
            parser.feed_data(data[i : i + 1])
        except httptools.HttpParserUpgrade:
            return [*ends, i + 1], "upgrade"
        except httptools.HttpParserError as exc:
            return ends, str(exc)
        while len(ends) < len(done):
            ends.append(i + 1)
            if not keep[len(ends) - 1]:
                return ends, "close"
    return ends, None


IMPLS = ["python", "native"] if native_module() is not None else ["python"]


def seen(h: Harness) -> Any:
    """What a connection has done so far, as the two paths must agree on it."""
    return h.ops, h.out, [(e.entry_type, e.verdict, e.fields) for e in h.log], h.closed


class Lockstep:
    """The native twin fed in step with the reference (impl "native"), compared after every feed."""

    def __init__(self, impl: str, prefix: bytes = b"") -> None:
        self.twin = Harness(HttpFactory(), implementation="native") if impl == "native" else None
        if self.twin is not None and prefix:
            self.twin.feed(prefix)

    def feed(self, ref: Harness, data: bytes, reply: bool = False) -> None:
        if self.twin is not None:
            self.twin.feed(data, reply=reply)
            assert seen(self.twin) == seen(ref)


def whole_agrees(impl: str, data: bytes, prefix: bytes = b"", reply: bool = False) -> None:
    """The whole input at once: the twin's outcome is the reference's."""
    if impl != "native":
        return
    hs = [Harness(HttpFactory(), implementation=i) for i in ("python", "native")]
    for h in hs:
        if prefix:
            h.feed(prefix)
        h.feed(data, reply=reply)
    assert seen(hs[1]) == seen(hs[0])


def proxyd_request_ends(data: bytes, impl: str = "python") -> tuple[list[int], str | None]:
    h = Harness(HttpFactory(), implementation="python")  # the Python engine shows its skip count
    twin = Lockstep(impl)
    p: Any = h.engine.parser
    ends: list[int] = []
    for i in range(len(data)):
        h.feed(data[i : i + 1])
        twin.feed(h, data[i : i + 1])
        errors = [e.fields["error"] for e in h.log if "error" in e.fields]
        if errors or h.closed:
            return ends, str(errors[0]) if errors else "closed"
        logged = sum(1 for e in h.log if e.entry_type == "request")
        if (
            logged > len(ends)
            and h.engine._sides[0].skip == 0
            and h.engine.buffered(False) == 0
            and not p.rq
            and p.rs in (RS_HEAD, RS_DRAIN, RS_WAIT)
            and p.rhr.pos == 0
        ):
            ends.append(i + 1)
            if p.rs == RS_DRAIN:
                return ends, "close"
            if p.rs == RS_WAIT:
                return ends, "upgrade"
    return ends, None


def compare(ours: tuple[list[int], str | None], theirs: tuple[list[int], str | None]) -> str | None:
    """None when the two agree; else the name of the disagreement (or raise if unnamed)."""
    (oe, oerr), (te, terr) = ours, theirs
    ok_end = {None, "close", "upgrade"}
    if oe == te and ((oerr in ok_end) == (terr in ok_end)):
        return None
    if oe == te and (oerr is None or terr is None):
        return None  # one rejects where the other is still waiting for bytes: no message ended
    if oerr not in ok_end and te[: len(oe)] == oe and (terr in ok_end or len(te) > len(oe)):
        assert oerr in STRICTER, f"proxyd rejects, llhttp accepts, unnamed: {oerr!r} (ends {oe} vs {te})"
        return oerr
    if terr not in ok_end and oe[: len(te)] == te and (oerr in ok_end or len(oe) > len(te)):
        name = next((k for k in LENIENT if terr.startswith(k)), None)
        assert name is not None, f"llhttp rejects, proxyd accepts, unnamed: {terr!r} (ends {oe} vs {te})"
        return name
    raise AssertionError(f"framing disagrees: proxyd {ours} llhttp {theirs}")


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=150, deadline=None)
@given(data=requests())
@example(data=b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
@example(
    data=b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\n"
)
@example(data=b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
def test_request_framing_agrees_with_llhttp(data: bytes, impl: str) -> None:
    compare(proxyd_request_ends(data, impl), llhttp_ends(data))
    whole_agrees(impl, data)


def proxyd_response_ends(data: bytes, n: int, impl: str = "python") -> tuple[list[int], str | None]:
    h = Harness(HttpFactory(), implementation="python")
    asked = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * n
    h.feed(asked)
    twin = Lockstep(impl, asked)
    p: Any = h.engine.parser
    ends: list[int] = []
    for i in range(len(data)):
        before = len(p.pending)
        h.feed(data[i : i + 1], reply=True)
        twin.feed(h, data[i : i + 1], reply=True)
        if p.ps == PS_UNTIL_CLOSE:
            return ends, None  # a body that ends at close: no end to compare
        if h.closed:
            errors = [e.fields["error"] for e in h.log if "error" in e.fields]
            return ends, str(errors[0]) if errors else "closed"
        # a message ends when its entry is popped, or an interim response's head is through
        interim_done = (
            p.ps == 0 and p.phr.pos == 0 and h.engine.buffered(True) == 0 and len(p.pending) == before
        )
        if len(p.pending) < before or (
            interim_done and sum(1 for e in h.log if e.entry_type == "response") > len(ends)
        ):
            ends.append(i + 1)
    return ends, None


#: Response cases: proxyd closes, llhttp accepts.
STRICTER_RESPONSES = {
    "101 Switching Protocols to a request that asked no upgrade": "RFC 9110 15.2.2: 101 answers a "
    "request's Upgrade",
    "chunked applied more than once": "RFC 9112 6.1: a sender MUST NOT apply chunked more than once",
}


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=120, deadline=None)
@given(data=st.lists(response(), min_size=1, max_size=3).map(b"".join))
def test_response_framing_agrees_with_llhttp(data: bytes, impl: str) -> None:
    n = data.count(b"HTTP/") + 1
    whole_agrees(impl, data, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * n, reply=True)
    ours = proxyd_response_ends(data, n, impl)
    theirs = llhttp_ends(data, resp_to=n)
    oe, oerr = ours
    te, terr = theirs
    if terr == "close" and oe[: len(te)] == te:
        return  # llhttp stops after a response that closes the connection; proxyd reads on
    if oe == te and (oerr is None or terr is None or (oerr is None) == (terr is None)):
        return  # the same ends; one side may reject where the other still waits for bytes
    if oerr is not None and te[: len(oe)] == oe:
        assert oerr in STRICTER_RESPONSES, f"unnamed: proxyd {ours} llhttp {theirs}"
        return
    raise AssertionError(f"response framing disagrees: proxyd {ours} llhttp {theirs}")
