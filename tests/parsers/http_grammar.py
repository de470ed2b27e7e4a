"""Hypothesis strategies for HTTP/1.x messages: valid, near-valid and hostile."""

from __future__ import annotations

from hypothesis import strategies as st

METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"PATCH", b"get", b"G(T", b""]
TARGETS = [b"/", b"/ok?x=1", b"/a/b", b"*", b"http://a/p", b"http://b/p", b"a:80", b"", b"/\x7f", b"/%20"]
VERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 2 + [b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.10", b""]
SP = [b" "] * 8 + [b"  ", b"\t"]
EOL = [b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n"]
CL_VALUES = [b"0", b"3", b"5", b"05", b"5, 5", b"-1", b"", b" 5", b"0x5", b"99999999999999999999", b"5 5"]
TE_VALUES = [b"chunked"] * 3 + [
    b"Chunked",
    b"gzip, chunked",
    b"chunked, gzip",
    b"identity",
    b" chunked",
    b"chunked\x0b",
    b"xchunked",
    b"chunked, chunked",
    b"",
    b"chunked,",
    b"chunked;a=b",
    b"\tchunked",
]
NAMES = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"X-A",
    b"Expect",
    b"Upgrade",
    b"Transfer-Encoding ",
    b"Content-Length\t",
    b" Host",
    b"X A",
    b"X\x00",
    b"",
    b"Transfer_Encoding",
]
VALUES = [
    b"a",
    b"1",
    b"keep-alive",
    b"close",
    b"upgrade",
    b"100-continue",
    b"x\x00y",
    b"a\rb",
    b"\xe9",
    b"a\tb",
]


@st.composite
def header(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES))
    key = name.strip().lower()
    if key == b"content-length":
        value = draw(st.sampled_from(CL_VALUES))
    elif key == b"transfer-encoding":
        value = draw(st.sampled_from(TE_VALUES))
    else:
        value = draw(st.sampled_from(VALUES))
    sep = draw(st.sampled_from([b": ", b":", b":  ", b" : "] if draw(st.integers(0, 9)) == 0 else [b": "]))
    line = name + sep + value + draw(st.sampled_from(EOL))
    if draw(st.integers(0, 19)) == 0:
        line += b" folded" + draw(st.sampled_from(EOL))  # obs-fold
    return line


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=12))
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x", b"%x ", b"%x;e=1", b'%x;e="q"', b"0x%x", b"%x\t"]))
        out += (
            size.replace(b"%x", b"%x" % len(data)).replace(b"%X", b"%X" % len(data))
            + draw(st.sampled_from(EOL))
            + data
            + draw(st.sampled_from(EOL))
        )
    out += b"0" + draw(st.sampled_from(EOL))
    if draw(st.booleans()):
        out += b"X-T: t" + draw(st.sampled_from(EOL))
    return out + draw(st.sampled_from(EOL))


@st.composite
def request(draw: st.DrawFn) -> bytes:
    line = (
        draw(st.sampled_from(METHODS))
        + draw(st.sampled_from(SP))
        + draw(st.sampled_from(TARGETS))
        + draw(st.sampled_from(SP))
        + draw(st.sampled_from(VERSIONS))
        + draw(st.sampled_from(EOL))
    )
    heads = draw(st.lists(header(), max_size=5))
    if draw(st.integers(0, 4)) > 0:
        heads.insert(draw(st.integers(0, len(heads))), b"Host: a\r\n")
    body_kind = draw(st.sampled_from(["none", "cl", "chunked"]))
    body = b""
    if body_kind == "cl":
        body = draw(st.binary(max_size=10))
        heads.append(b"Content-Length: %d\r\n" % len(body))
    elif body_kind == "chunked":
        heads.append(b"Transfer-Encoding: chunked\r\n")
        body = draw(chunked_body())
    return line + b"".join(heads) + draw(st.sampled_from(EOL)) + body


def requests() -> st.SearchStrategy[bytes]:
    return st.lists(request(), min_size=1, max_size=3).map(b"".join)


STATUS = [
    b"200 OK",
    b"204 No Content",
    b"304 Not Modified",
    b"100 Continue",
    b"404 Not Found",
    b"200",
    b"2000 X",
    b"101 Switching Protocols",
]


@st.composite
def response(draw: st.DrawFn) -> bytes:
    line = draw(st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 ", b"HTTP/2 ", b"http/1.1 "])) + draw(
        st.sampled_from(STATUS)
    )
    heads = draw(st.lists(header(), max_size=3))
    kind = draw(st.sampled_from(["cl", "chunked", "none"]))
    body = b""
    if kind == "cl":
        body = draw(st.binary(max_size=10))
        heads.append(b"Content-Length: %d\r\n" % len(body))
    elif kind == "chunked":
        heads.append(b"Transfer-Encoding: chunked\r\n")
        body = draw(chunked_body())
    return line + draw(st.sampled_from(EOL)) + b"".join(heads) + draw(st.sampled_from(EOL)) + body


def responses() -> st.SearchStrategy[bytes]:
    return st.lists(response(), min_size=1, max_size=3).map(b"".join)
