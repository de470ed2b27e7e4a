"""The sans-IO ClientHello reader (proxyd.tls.clienthello): real hellos from Python's ssl
(OpenSSL), crafted ones for every refusal, and properties: any segmentation and any record
framing give the same outcome, every proper prefix asks for more, and no input raises."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tls_fixture import client_context, client_hello, reframe

from proxyd.tls.clienthello import (
    HELLO,
    MALFORMED,
    NEED_MORE,
    NOT_TLS,
    ClientHelloReader,
    Kind,
    Outcome,
    access_denied_alert,
    is_grease,
    version_name,
)

LIMIT = 1 << 20


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(etype: int, data: bytes) -> bytes:
    return u16(etype) + u16(len(data)) + data


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def alpn_ext(*protos: bytes) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protos)
    return ext(16, u16(len(entries)) + entries)


def versions_ext(*versions: int) -> bytes:
    body = b"".join(u16(v) for v in versions)
    return ext(43, bytes([len(body)]) + body)


def body(exts: bytes | None = b"", *, legacy: int = 0x0303, session: bytes = b"\x11" * 32) -> bytes:
    out = (
        u16(legacy)
        + b"\x42" * 32
        + bytes([len(session)])
        + session
        + u16(4)
        + b"\x13\x01\x00\x2f"
        + b"\x01\x00"
    )
    if exts is not None:
        out += u16(len(exts)) + exts
    return out


def handshake(hbody: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(hbody).to_bytes(3, "big") + hbody


def records(hs: bytes, *, version: int = 0x0301, size: int = 16384) -> bytes:
    return b"".join(bytes([22]) + u16(version) + u16(len(hs[i : i + size])) + hs[i : i + size]
                    for i in range(0, len(hs), size))  # fmt: skip


def crafted(exts: bytes | None = b"", **kw: int) -> bytes:
    return records(handshake(body(exts)), **kw)


def read(data: bytes, limit: int = LIMIT) -> Outcome:
    return ClientHelloReader(limit).feed(data)


def read_split(data: bytes, cuts: list[int], limit: int = LIMIT) -> Outcome:
    reader = ClientHelloReader(limit)
    reader.feed(b"")
    pos = 0
    for cut in sorted(set(cuts)):
        reader.feed(data[pos:cut])
        pos = cut
    return reader.feed(data[pos:])


def real(version: ssl.TLSVersion, sni: str | None, alpn: list[str] | None = None) -> bytes:
    return client_hello(client_context(version, alpn=alpn), sni)[3]


# --- real clients -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_real_openssl_hellos(version: ssl.TLSVersion) -> None:
    data = real(version, "Api.Example.com", ["h2", "http/1.1"])
    out = read(data)
    assert out.kind is HELLO and out.hello is not None
    assert out.hello.sni == b"Api.Example.com"
    assert out.hello.alpn == (b"h2", b"http/1.1")
    assert out.record_version == int.from_bytes(data[1:3], "big")
    assert out.hello.size == len(data) - 5
    if version is ssl.TLSVersion.TLSv1_3:
        assert out.hello.versions == (0x0304,)
    else:
        assert out.hello.versions == (0x0303,)
    # Byte by byte, and re-framed into one-byte records: the same hello.
    assert read_split(data, list(range(len(data)))) == out
    assert read(reframe(data, 1)).hello == out.hello


def test_no_sni() -> None:
    out = read(real(ssl.TLSVersion.TLSv1_3, None))
    assert out.kind is HELLO and out.hello is not None and out.hello.sni is None and out.hello.alpn == ()


def test_big_hello_across_two_records() -> None:
    protos = [f"p{i:04d}".encode() * 8 for i in range(400)]
    data = crafted(sni_ext(b"big.example.com") + alpn_ext(*protos) + ext(21, bytes(2000)))
    assert len(data) > 16384 + 5 and data[16384 + 5] == 22  # a second record
    out = read(data)
    assert out.kind is HELLO and out.hello is not None and out.hello.sni == b"big.example.com"
    assert len(out.hello.alpn) == 400
    # The bound is the limit: one byte less than the message and it is refused.
    size = out.hello.size
    assert read(data, limit=size).kind is HELLO
    small = read(data, limit=size - 1)
    assert small.kind is MALFORMED and "larger than the limit" in small.reason


# --- crafted hellos: what is accepted -----------------------------------------------------------


def test_grease_unknown_and_ech_extensions_are_skipped() -> None:
    exts = (
        ext(0x0A0A, b"")
        + versions_ext(0x3A3A, 0x0304, 0x0303)
        + ext(0xFE0D, bytes(range(200)))  # encrypted_client_hello: the outer SNI is what we see
        + ext(0x4A4A, b"\x00")
        + sni_ext(b"public.example.com")
        + ext(0xFFCE, b"zz")
    )
    out = read(crafted(exts))
    assert out.kind is HELLO and out.hello is not None
    assert out.hello.sni == b"public.example.com" and out.hello.versions == (0x0304, 0x0303)
    assert is_grease(0xDADA) and not is_grease(0x0A0B) and not is_grease(0x1A2A)


def test_tls10_hello_without_extensions() -> None:
    out = read(records(handshake(body(None, legacy=0x0301)), version=0x0301))
    assert out.kind is HELLO and out.hello is not None
    assert out.hello.sni is None and out.hello.versions == (0x0301,)


def test_other_name_types_are_skipped() -> None:
    entries = b"\x07" + u16(3) + b"abc" + b"\x00" + u16(5) + b"a.b.c"
    out = read(crafted(ext(0, u16(len(entries)) + entries)))
    assert out.kind is HELLO and out.hello is not None and out.hello.sni == b"a.b.c"


def test_bytes_after_the_hello_are_kept_but_not_read() -> None:
    data = crafted(sni_ext(b"x.example")) + b"\x17\x03\x03\x00\x05early"
    reader = ClientHelloReader(LIMIT)
    out = reader.feed(data)
    assert out.kind is HELLO and bytes(reader.data) == data
    assert reader.feed(b"more") == out  # final


# --- what is refused ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind", "why"),
    [
        (b"GET / HTTP/1.1\r\n", NOT_TLS, "does not start"),
        (bytes.fromhex("802e0103010015"), NOT_TLS, "does not start"),  # SSLv2-format hello
        (b"\x16\x02\x00", NOT_TLS, "record version"),
        (b"\x16\x03\x05", NOT_TLS, "record version"),
        (b"\x15\x03\x03\x00\x02\x02\x28", NOT_TLS, "does not start"),  # an alert first
        (b"\x16\x03\x01\x00\x00", MALFORMED, "empty handshake record"),
        (b"\x16\x03\x01\x40\x01", MALFORMED, "more than 2^14"),
        (records(handshake(body(), msg_type=2)), MALFORMED, "not a ClientHello"),
        (records(handshake(body())[:10]) + b"\x15\x03\x01\x00\x02\x02\x28", MALFORMED, "content type 21"),
        (records(handshake(body())[:10]) + b"\x16\x02\x01\x00\x01\x00", MALFORMED, "record version"),
        (crafted(sni_ext(b"a") + sni_ext(b"b")), MALFORMED, "given twice"),
        (crafted(sni_ext(b"a", b"b")), MALFORMED, "two host names"),
        (crafted(sni_ext(b"")), MALFORMED, "empty host name"),
        (crafted(ext(0, b"")), MALFORMED, "server_name"),
        (crafted(sni_ext(b"x", name_type=1)), MALFORMED, "without a host name"),
        (crafted(alpn_ext()), MALFORMED, "alpn list"),
        (crafted(alpn_ext(b"")), MALFORMED, "empty alpn"),
        (crafted(versions_ext()), MALFORMED, "supported_versions"),
        (crafted(ext(43, b"\x03\x03\x04\x03")), MALFORMED, "supported_versions"),
        (records(handshake(body() + b"\x00")), MALFORMED, "after the extensions"),
        (records(handshake(body(b"\x00\x00\x00\x09"))), MALFORMED, "runs past"),
        (records(handshake(body(session=b"\x01" * 33))), MALFORMED, "session_id"),
        (records(handshake(body()[:36] + b"\x00\x00" + body()[40:])), MALFORMED, "cipher_suites"),
    ],
)
def test_refusals(data: bytes, kind: Kind, why: str) -> None:
    out = read(data)
    assert out.kind is kind and why in out.reason, out
    assert read_split(data, list(range(len(data)))) == out
    if kind is NOT_TLS:
        assert out.record_version is None
    else:
        assert out.record_version == int.from_bytes(data[1:3], "big")


def test_growing_past_the_limit_without_a_length() -> None:
    reader = ClientHelloReader(64)
    head = handshake(body())[:4]
    out = reader.feed(b"\x16\x03\x01\x40\x00" + head)
    assert out.kind is MALFORMED and "limit" in out.reason  # the message's own length says so
    reader = ClientHelloReader(64)
    assert reader.feed(b"\x16\x03\x01\x40\x00").kind is NEED_MORE
    out = reader.feed(b"\x01\x00")
    assert out.kind is NEED_MORE
    assert reader.feed(bytes(100)).kind is MALFORMED


def test_alert_bytes_and_names() -> None:
    assert access_denied_alert(0x0301) == bytes.fromhex("15030100020231")
    assert access_denied_alert(0x0303) == bytes.fromhex("15030300020231")
    assert version_name(0x0304) == "TLSv1.3" and version_name(0x7F1C) == "0x7f1c"
    with pytest.raises(ValueError):
        ClientHelloReader(4)


# --- properties ---------------------------------------------------------------------------------

SAMPLES = [
    real(ssl.TLSVersion.TLSv1_3, "a.example.com", ["h2"]),
    real(ssl.TLSVersion.TLSv1_2, "b.example.org"),
    crafted(sni_ext(b"c.example.net") + ext(0x1A1A, b"") + alpn_ext(b"x")),
    crafted(sni_ext(b"d") + sni_ext(b"e")),  # malformed
    b"SSH-2.0-OpenSSH_9.2\r\n",
]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.integers(min_value=0, max_value=20000), max_size=12),
       st.integers(min_value=1, max_value=300))  # fmt: skip
def test_split_and_framing_invariance(data: bytes, cuts: list[int], record: int) -> None:
    whole = read(data)
    assert read_split(data, [c % (len(data) + 1) for c in cuts]) == whole
    if whole.kind is HELLO:
        framed = read(reframe(data, record))
        assert framed.kind is HELLO and framed.hello == whole.hello


@pytest.mark.parametrize("data", SAMPLES[:3])
def test_every_proper_prefix_asks_for_more(data: bytes) -> None:
    for n in range(len(data)):
        out = read(data[:n])
        assert out.kind is NEED_MORE and out.need > 0, n


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=9, max_value=700))
def test_any_bytes_give_an_outcome(data: bytes, limit: int) -> None:
    reader = ClientHelloReader(limit)
    out = reader.feed(data)
    assert out.kind in (NEED_MORE, HELLO, NOT_TLS, MALFORMED)
    if out.kind is NEED_MORE:
        assert len(reader.data) <= limit and out.need > 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES[:3]), st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)),
                                              min_size=1, max_size=6))  # fmt: skip
def test_mutated_hellos_never_raise(data: bytes, flips: list[tuple[int, int]]) -> None:
    buf = bytearray(data)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    out = read(bytes(buf))
    assert out.kind in (NEED_MORE, HELLO, NOT_TLS, MALFORMED)
    assert read_split(bytes(buf), [len(buf) // 3, len(buf) // 2]) == out


def test_the_reader_is_sans_io() -> None:
    """Importing the reader (and the SNI matcher) pulls in no event loop and no sockets."""
    import subprocess
    import sys

    code = (
        "import sys, proxyd.tls.clienthello, proxyd.policy.servernames; "
        "print(sorted(m for m in ('asyncio', 'socket', 'selectors', 'ssl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
