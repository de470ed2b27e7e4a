"""The redis parser through the harness: framing tables, denials in reply order, transactions,
subscribe mode, RESP3 pushes, protocol errors, and the split/fuzz properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_redis_resp import REPLIES

from proxyd.ops import DROP, ERROR, INJECT, MORE, PASS
from proxyd.parsers.redis.parser import EXECABORT, NOPERM
from proxyd.testing import Harness

RULES = [
    {"command": "get", "keyPrefix": "a:"},
    {"command": "set", "keyPrefix": "a:"},
    {"command": "mset", "keyPrefix": "a:"},
    {"command": "@pubsub", "keyPrefix": "ch."},
    {"command": "unsubscribe"},
    {"command": "client|tracking"},
    {"command": "client|reply"},
]


def cmd(*args: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def harness(rules: list[dict[str, str]] | None = None, **kw: object) -> Harness:
    return Harness("redis", rules=RULES if rules is None else rules, **kw)  # type: ignore[arg-type]


GET_A = cmd("GET", "a:1")
GET_B = cmd("GET", "b:1")


@pytest.mark.parametrize(
    ("request_bytes", "ops"),
    [
        (GET_A, [(PASS, len(GET_A))]),
        (GET_B, [(DROP, len(GET_B))]),
        (GET_A + GET_A, [(PASS, 2 * len(GET_A))]),  # whole allowed requests go out in one PASS
        (GET_A + GET_B + GET_A, [(PASS, len(GET_A)), (DROP, len(GET_B)), (PASS, len(GET_A))]),
        (b"get a:1\r\n", [(PASS, 9)]),
        (b"get b:1\n", [(DROP, 8)]),
        (b'GET "a:\\x31"\r\n', [(PASS, 14)]),
        (b"PING\r\nping\r\n", [(PASS, 12)]),  # always allowed
        (b"\r\n*0\r\n*-1\r\n", [(PASS, 11)]),  # empty requests redis-server ignores
        (cmd("FOO", "a:1"), [(DROP, 22)]),  # unknown command: only a rule allowing all commands
        (cmd("DBSIZE"), [(DROP, len(cmd("DBSIZE")))]),  # keyless: needs a rule without key conditions
        (cmd("MSET", "a:1", "x", "a:2", "y"), [(PASS, 46)]),
        (cmd("MSET", "a:1", "x", "b:2", "y"), [(DROP, 46)]),  # one key outside: all denied
        (cmd("SUBSCRIBE", "ch.1", "ch.2"), [(PASS, 39)]),
        (cmd("SUBSCRIBE", "ch.1", "x.2"), [(DROP, 38)]),
        (cmd("PUBLISH", "x.1", "m"), [(DROP, 33)]),
    ],
)
def test_request_verdicts(request_bytes: bytes, ops: list[tuple[object, int]]) -> None:
    h = harness()
    assert h.feed(request_bytes) == ops
    h2 = harness()
    h2.feed(request_bytes, split="bytes")
    assert h2.to_server == h.to_server and h2.to_client == h.to_client


def test_denial_in_reply_order() -> None:
    h = harness()
    h.feed(GET_A + GET_B + GET_A + GET_B)
    assert h.to_client == b""  # the first reply is not there yet: the denial waits behind it
    h.feed(b"$1\r\nx\r\n", reply=True)
    assert h.to_client == b"$1\r\nx\r\n" + NOPERM
    h.feed(b"$-1\r\n", reply=True)
    assert h.to_client == b"$1\r\nx\r\n" + NOPERM + b"$-1\r\n" + NOPERM
    h.feed(GET_B)
    assert h.to_client.endswith(NOPERM + NOPERM)  # nothing pending: at once
    assert not h.closed


def test_denial_behind_a_blocked_command() -> None:
    h = harness([{"command": "blpop"}, {"command": "get", "keyPrefix": "a:"}])
    h.feed(cmd("BLPOP", "q", "0") + GET_B)
    assert h.to_client == b""
    h.feed(b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n", reply=True)
    assert h.to_client == b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n" + NOPERM


def test_multi_exec_with_a_denial_becomes_discard() -> None:
    h = harness()
    tx = cmd("MULTI") + cmd("SET", "a:1", "x") + cmd("SET", "b:1", "y") + cmd("SET", "a:2", "z") + cmd("EXEC")
    h.feed(tx + cmd("PING"))
    discard = b"*1\r\n$7\r\nDISCARD\r\n"
    assert h.to_server == cmd("MULTI") + cmd("SET", "a:1", "x") + cmd("SET", "a:2", "z") + discard + cmd(
        "PING"
    )
    assert (False, DROP, len(cmd("EXEC"))) in h.ops and (False, INJECT, len(discard)) in h.ops
    h.feed(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+OK\r\n+PONG\r\n", reply=True)
    assert h.to_client == b"+OK\r\n+QUEUED\r\n" + NOPERM + b"+QUEUED\r\n" + EXECABORT + b"+PONG\r\n"
    assert (True, DROP, 5) in h.ops and (True, INJECT, len(EXECABORT)) in h.ops
    # the next transaction is judged afresh
    h.feed(cmd("MULTI") + cmd("SET", "a:1", "x") + cmd("EXEC"))
    assert h.to_server.endswith(cmd("EXEC"))
    entries = [e for e in h.log if e.fields.get("command") == "exec"]
    assert entries[0].verdict == "denied" and entries[1].verdict == "forwarded"


def test_subscribe_mode_resp2() -> None:
    h = harness()
    h.feed(cmd("SUBSCRIBE", "ch.1", "ch.2") + GET_B)
    conf1 = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nch.1\r\n:1\r\n"
    conf2 = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nch.2\r\n:2\r\n"
    msg = b"*3\r\n$7\r\nmessage\r\n$4\r\nch.1\r\n$2\r\nhi\r\n"
    h.feed(conf1 + msg, reply=True)
    assert h.to_client == conf1 + msg  # the denial waits for the second confirmation
    h.feed(conf2 + msg, reply=True)
    assert h.to_client == conf1 + msg + conf2 + NOPERM + msg
    # a bare UNSUBSCRIBE: one confirmation per channel held
    h.feed(cmd("UNSUBSCRIBE") + cmd("PING"))
    u1 = b"*3\r\n$11\r\nunsubscribe\r\n$4\r\nch.1\r\n:1\r\n"
    u2 = b"*3\r\n$11\r\nunsubscribe\r\n$4\r\nch.2\r\n:0\r\n"
    h.feed(u1 + msg + u2 + b"+PONG\r\n", reply=True)
    assert h.to_client.endswith(u1 + msg + u2 + b"+PONG\r\n")
    h.feed(GET_B)
    assert h.to_client.endswith(b"+PONG\r\n" + NOPERM)
    assert not h.closed


def test_resp3_pushes_and_tracking() -> None:
    h = harness()
    h.feed(cmd("HELLO", "3"))
    h.feed(b"%1\r\n+proto\r\n:3\r\n", reply=True)
    h.feed(cmd("CLIENT", "TRACKING", "ON") + GET_A + GET_B + GET_A)
    inv = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\na:1\r\n"
    h.feed(b"+OK\r\n" + inv + b"$1\r\nx\r\n" + inv, reply=True)
    assert h.to_client.endswith(b"+OK\r\n" + inv + b"$1\r\nx\r\n" + NOPERM + inv)
    # a push split across reads, with nothing pending: a denial waits until the push ends
    h.feed(b"_\r\n", reply=True)
    h.feed(inv[:9], reply=True)
    h.feed(GET_B)
    assert not h.to_client.endswith(NOPERM)
    h.feed(inv[9:], reply=True)
    assert h.to_client.endswith(inv + NOPERM)
    # RESP3 subscribe confirmations are pushes too
    h.feed(cmd("SUBSCRIBE", "ch.1") + GET_B)
    c1 = b">3\r\n$9\r\nsubscribe\r\n$4\r\nch.1\r\n:1\r\n"
    h.feed(c1, reply=True)
    assert h.to_client.endswith(c1 + NOPERM)
    assert not h.closed


def test_client_reply_off_and_skip_silence_replies_and_denials() -> None:
    h = harness()
    h.feed(cmd("CLIENT", "REPLY", "OFF") + GET_B + GET_A + cmd("CLIENT", "REPLY", "ON") + GET_B)
    assert h.to_client == b""
    h.feed(b"+OK\r\n", reply=True)
    assert h.to_client == b"+OK\r\n" + NOPERM
    h.feed(cmd("CLIENT", "REPLY", "SKIP") + GET_A + GET_A)
    h.feed(b"$-1\r\n", reply=True)
    assert h.to_client.endswith(NOPERM + b"$-1\r\n")
    assert not h.closed


def test_select_db_and_secret_arguments_in_the_log() -> None:
    h = harness()
    h.feed(
        cmd("AUTH", "user", "s3cret") + cmd("HELLO", "3", "AUTH", "u", "s3cret") + cmd("SELECT", "4") + GET_A
    )
    h.feed(cmd("RESET") + GET_A)
    fields = [e.fields for e in h.log]
    assert fields[0] == {"command": "auth", "db": 0}
    assert fields[1] == {"command": "hello", "db": 0}
    assert fields[3] == {"command": "get", "db": 4, "keys": ["a:1"]}
    assert fields[5] == {"command": "get", "db": 0, "keys": ["a:1"]}
    assert "s3cret" not in repr(h.log)


def test_keys_are_escaped_and_capped_in_the_log() -> None:
    h = harness([{}])
    keys = [b"k\n\x00\xff%d" % i for i in range(10)]
    h.feed(cmd("DEL", *keys))
    f = h.log[0].fields
    assert f["keys"][0] == "k\\x0a\\x00\\xff0" and len(f["keys"]) == 8 and f["keys_total"] == 10


def test_big_values_pass_without_buffering() -> None:
    h = harness()
    value = b"v" * (16 << 20)
    req = cmd("SET", "a:big", value)
    verdicts = h.feed(req, split=[40] + [1 << 16] * ((len(req) - 40) // (1 << 16) + 1))
    assert verdicts[0] == (PASS, len(req))
    assert h.to_server == req and h.engine.buffered(False) == 0
    h.feed(cmd("SET", "b:big", value) + cmd("GET", "a:big"), split=[40, len(req)])
    assert h.to_server == req + cmd("GET", "a:big") and h.to_client == b""
    reply = b"$%d\r\n%s\r\n" % (len(value), value)
    h.feed(b"+OK\r\n" + reply[:100], reply=True)
    assert h.to_client == b"+OK\r\n" + NOPERM + reply[:100]
    h.feed(reply[100:], reply=True)
    assert h.to_client == b"+OK\r\n" + NOPERM + reply


def test_keys_past_the_inspection_budget() -> None:
    big = b"x" * 100_000
    keyed = harness()
    keyed.feed(cmd("MSET", "a:1", big, "a:2", "y"))
    assert keyed.to_server == b"" and keyed.dropped[False] != b""  # keys unknown: fail closed
    free = harness([{"command": "mset"}])
    req = cmd("MSET", "a:1", big, "a:2", "y")
    free.feed(req, split=[30, 1000, len(req)])
    assert free.to_server == req and free.engine.buffered(False) == 0


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (b"*1\r\n$-5\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*abc\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
        (b'SET "a\r\n', b"-ERR Protocol error: unbalanced quotes in request\r\n"),
        (b"*1\r\n$600000000\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    ],
)
def test_protocol_errors_answered_then_closed(req: bytes, message: bytes) -> None:
    h = harness([{}])
    h.feed(GET_A + req + GET_A)
    assert h.to_server == GET_A and not h.closed
    h.feed(b"$-1\r\n", reply=True)
    assert h.to_client == b"$-1\r\n" + message
    assert h.closed and h.error is not None and h.error.kind == "parser_error"
    assert any("Protocol error" in str(e.fields.get("error")) for e in h.log)
    h2 = harness([{}])
    h2.feed(req)
    assert h2.to_client == message and h2.closed


def test_non_resp_reply_closes() -> None:
    h = harness([{}])
    h.feed(GET_A)
    h.feed(b"HTTP/1.1 200 OK\r\n", reply=True)
    assert h.closed and h.to_client == b""


def test_reply_with_nothing_pending_closes_but_a_server_error_first_passes() -> None:
    h = harness([{}])
    h.feed(b"-ERR max number of clients reached\r\n", reply=True)
    assert h.to_client == b"-ERR max number of clients reached\r\n" and not h.closed
    h.feed(b"+OK\r\n", reply=True)
    assert h.closed


def test_monitor_makes_the_reply_stream_unframed() -> None:
    h = harness([{"command": "monitor"}, {"command": "get", "keyPrefix": "a:"}])
    h.feed(cmd("MONITOR"))
    h.feed(b'+OK\r\n+1.2 [0 127.0.0.1:1] "get"', reply=True)
    h.feed(b' "x"\r\n', reply=True)
    assert h.to_client == b'+OK\r\n+1.2 [0 127.0.0.1:1] "get" "x"\r\n'
    h.feed(GET_B)
    assert h.closed


def test_sort_by_pattern_needs_access_to_every_key() -> None:
    h = harness([{"command": "sort", "keyPrefix": "a:"}])
    assert h.feed(cmd("SORT", "a:l", "STORE", "a:d")) == [(PASS, 43)]
    assert h.feed(cmd("SORT", "a:l", "STORE", "b:d"))[0][0] == DROP
    assert h.feed(cmd("SORT", "a:l", "BY", "w_*"))[0][0] == DROP
    assert h.feed(cmd("SORT", "a:l", "BY", "nosort"))[0][0] == PASS
    assert h.feed(cmd("SORT", "a:l", "GET", "#"))[0][0] == DROP


def test_keyword_and_numkeys_specs() -> None:
    h = harness([{"command": "xread", "keyPrefix": "s:"}, {"command": "eval", "keyPrefix": "a:"},
                 {"command": "zunionstore", "keyPrefix": "z:"}])  # fmt: skip
    assert h.feed(cmd("XREAD", "COUNT", "2", "STREAMS", "s:1", "s:2", "0", "0"))[0][0] == PASS
    assert h.feed(cmd("XREAD", "COUNT", "2", "STREAMS", "s:1", "t:2", "0", "0"))[0][0] == DROP
    assert h.feed(cmd("EVAL", "return 1", "2", "a:1", "a:2", "anything"))[0][0] == PASS
    assert h.feed(cmd("EVAL", "return 1", "2", "a:1", "b:2"))[0][0] == DROP
    assert h.feed(cmd("EVAL", "return 1", "0", "b:anything"))[0][0] == DROP  # keyless, rule is keyed
    assert h.feed(cmd("ZUNIONSTORE", "z:d", "2", "z:1", "z:2", "WEIGHTS", "1", "2"))[0][0] == PASS
    assert h.feed(cmd("ZUNIONSTORE", "y:d", "2", "z:1", "z:2"))[0][0] == DROP
    assert h.feed(cmd("ZUNIONSTORE", "z:d", "9", "z:1"))[0][0] == DROP  # numkeys past argc: unknown


def test_categories_and_subcommands() -> None:
    h = harness([{"command": "@read"}, {"command": "config|get"}])
    assert h.feed(cmd("LRANGE", "l", "0", "-1"))[0][0] == PASS
    assert h.feed(cmd("CONFIG", "GET", "maxmemory"))[0][0] == PASS
    assert h.feed(cmd("CONFIG", "SET", "maxmemory", "1"))[0][0] == DROP
    assert h.feed(cmd("SET", "k", "v"))[0][0] == DROP
    h = harness([{"command": "config"}])
    assert h.feed(cmd("config", "set", "x", "1"))[0][0] == PASS


# --- properties ---------------------------------------------------------------------------

# (request, reply when forwarded): replies fit the requests one by one.
PAIRS = [
    (GET_A, b"$1\r\nx\r\n"),
    (GET_B, b"$-1\r\n"),
    (cmd("SET", "a:1", "v" * 300), b"+OK\r\n"),
    (cmd("SET", "b:1", "v"), b"+OK\r\n"),
    (b"get a:2\r\n", b"_\r\n"),
    (cmd("MSET", "a:1", "x", "b:2", "y"), b"+OK\r\n"),
    (cmd("MULTI"), b"+OK\r\n"),
    (cmd("EXEC"), b"*-1\r\n"),
    (cmd("PING"), b"+PONG\r\n"),
    (cmd("ECHO", "x"), b"|1\r\n+a\r\n:1\r\n$1\r\nx\r\n"),
    (cmd("GET", "a:3"), b"$?\r\n;2\r\nab\r\n;0\r\n"),
    (cmd("GET", "a:4"), b"*?\r\n:1\r\n%1\r\n+k\r\n~1\r\n#t\r\n.\r\n"),
]
PUSH = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\na:1\r\n"

streams = st.lists(st.tuples(st.integers(0, len(PAIRS) - 1), st.booleans()), min_size=1, max_size=10)
cuts = st.lists(st.integers(1, 60), max_size=40)


def run(choices: list[tuple[int, bool]], req_cuts: list[int] | None, rep_cuts: list[int] | None) -> Harness:
    h = harness()
    reqs = b"".join(PAIRS[i][0] for i, _ in choices)
    h.feed(reqs, split=req_cuts)
    # the server's answers to what it received, with a push now and then
    probe = harness()
    replies = []
    for i, push in choices:
        probe_before = len(probe.to_server)
        probe.feed(PAIRS[i][0])
        if push:
            replies.append(PUSH)
        if len(probe.to_server) > probe_before:
            replies.append(PAIRS[i][1])
    h.feed(b"".join(replies), reply=True, split=rep_cuts)
    return h


@settings(max_examples=150, deadline=None)
@given(streams, cuts, cuts)
def test_split_invariance(choices: list[tuple[int, bool]], req_cuts: list[int], rep_cuts: list[int]) -> None:
    whole = run(choices, None, None)
    split = run(choices, req_cuts, rep_cuts)
    assert split.to_server == whole.to_server
    assert split.to_client == whole.to_client
    assert [(e.verdict, e.fields) for e in split.log] == [(e.verdict, e.fields) for e in whole.log]
    assert split.closed == whole.closed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300), cuts)
def test_fuzz_verdicts_or_error_never_an_exception(req: bytes, rep: bytes, c: list[int]) -> None:
    h = harness(buffer_limit=1 << 17)
    for chunk in (b"*", b"$", b"\r\n"):
        h.feed(chunk + req, split=c)
        h.feed(rep, reply=True, split=c)
    assert h.error is None or h.error.kind in ("parser_error", "buffer_limit")
    assert h.engine.buffered(False) <= 1 << 17 and h.engine.buffered(True) <= 1 << 17
    for _, op, n in h.ops:
        assert op in (PASS, DROP, INJECT, MORE, ERROR) or n == 0


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1 << 40), st.integers(0, 1 << 31))
def test_claimed_lengths_do_not_grow_buffers(bulk: int, count: int) -> None:
    h = harness([{}])
    h.feed(b"*%d\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\nabc" % (count + 3, bulk))
    assert h.engine.buffered(False) <= 64 * 1024
    h.feed(cmd("GET", "k"))
    h.feed(b"*%d\r\n$%d\r\nab" % (count, bulk), reply=True)
    assert h.engine.buffered(True) <= 64 * 1024


@pytest.mark.parametrize("reply", [r for r in REPLIES if not r.startswith(b">")])
def test_every_reply_type_keeps_denials_in_place(reply: bytes) -> None:
    """Each RESP2/RESP3 reply type, whole and byte by byte: the denial lands right after it."""
    for split in (None, "bytes"):
        h = harness()
        h.feed(GET_A + GET_B + GET_A)
        h.feed(reply + reply, reply=True, split=split)
        assert h.to_client == reply + NOPERM + reply and not h.closed


# --- issue 17: transparency to what redis-server 7 does ------------------------------------------


def test_ordinary_replies_in_a_row_share_one_pending_entry() -> None:
    h = harness([{}])
    h.feed(GET_A * 200_000)
    parser = h.engine.parser
    assert len(parser.pending) == 1 and parser.pending[0][2] == 200_000  # type: ignore[union-attr]
    h.feed(b"$-1\r\n" * 200_000, reply=True, split=[5 * 1000] * 200)
    assert not parser.pending and not h.closed  # type: ignore[union-attr]


def test_a_full_reply_queue_holds_the_client_instead_of_closing() -> None:
    h = harness([{}], parser_config={"max_pending_bytes": 1024}, buffer_limit=4096)  # 8 entries
    hello = cmd("HELLO", "2")  # its reply is read for state: never shares an entry
    h.feed(hello * 20 + GET_A * 200)
    assert h.held(False) and not h.closed
    assert h.to_server == hello * 8  # the ninth waits for a reply
    reply = b"*0\r\n"
    h.feed(reply * 3, reply=True)
    assert h.to_server == hello * 11 and h.held(False)
    for _ in range(10):  # each reply lets one more request through
        h.feed(reply, reply=True)
    assert h.to_server == hello * 20 + GET_A * 200 and not h.held(False)
    h.feed(reply * 7 + b"$-1\r\n" * 200, reply=True)
    assert h.holds == [(False, True), (False, False)]
    assert h.to_client == reply * 20 + b"$-1\r\n" * 200 and not h.closed


def test_client_reply_off_and_skip_still_expect_subscribe_confirmations() -> None:
    h = harness([{}])
    conf = b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
    unconf = b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n"
    h.feed(cmd("CLIENT", "REPLY", "OFF") + cmd("SUBSCRIBE", "a") + cmd("UNSUBSCRIBE") + cmd("SUBSCRIBE"))
    h.feed(conf + unconf, reply=True)  # pushes: sent; SUBSCRIBE alone: an arity error, silenced
    h.feed(cmd("CLIENT", "REPLY", "ON") + b"PING\r\n")
    h.feed(b"+OK\r\n+PONG\r\n", reply=True)
    h.feed(cmd("CLIENT", "REPLY", "SKIP") + cmd("SUBSCRIBE", "a") + cmd("CLIENT", "REPLY", "SKIP"))
    h.feed(b"*0\r\n" + b"PING\r\n")  # an empty request ends a SKIP, as resetClient does
    h.feed(conf + b"+PONG\r\n", reply=True)
    assert h.to_client == conf + unconf + b"+OK\r\n+PONG\r\n" + conf + b"+PONG\r\n"
    assert not h.closed


def test_reset_clears_reply_off_but_a_skip_still_silences_it() -> None:
    h = harness([{}])
    h.feed(cmd("CLIENT", "REPLY", "OFF") + cmd("RESET") + cmd("CLIENT", "REPLY", "SKIP") + cmd("RESET"))
    h.feed(b"PING\r\n")
    h.feed(b"+RESET\r\n+PONG\r\n", reply=True)
    assert h.to_client == b"+RESET\r\n+PONG\r\n" and not h.closed
    assert not h.engine.parser.pending  # type: ignore[union-attr]


def test_a_denial_under_skip_sends_a_ping_to_use_up_the_servers_skip() -> None:
    h = harness()
    h.feed(cmd("CLIENT", "REPLY", "SKIP") + GET_B + GET_A)
    ping = b"*1\r\n$4\r\nPING\r\n"
    assert h.to_server == cmd("CLIENT", "REPLY", "SKIP") + ping + GET_A
    h.feed(b"$1\r\nx\r\n", reply=True)
    assert h.to_client == b"$1\r\nx\r\n" and not h.closed


@pytest.mark.parametrize("split", [None, "bytes"])
def test_sync_keepalives_then_the_replication_stream_pass_through(split: str | None) -> None:
    h = harness([{}])
    h.feed(cmd("REPLCONF", "capa", "eof") + cmd("PSYNC", "?", "-1"))
    stream = b"+OK\r\n\n\n+FULLRESYNC 8de1 0\r\n\n$5\r\nREDIS" + b"*1\r\n$4\r\nPING\r\n" + b"\n"
    h.feed(stream, reply=True, split=split)
    h.feed(cmd("REPLCONF", "ACK", "0"))
    assert h.to_client == stream and not h.closed
    h2 = harness([{}])
    h2.feed(b"SYNC\r\n")
    h2.feed(b"\n\n-NOMASTERLINK Can't SYNC while not connected with my master\r\n", reply=True)
    h2.feed(b"PING\r\n")
    h2.feed(b"+PONG\r\n", reply=True)  # refused: replies are framed again
    assert not h2.closed and h2.to_client.endswith(b"master\r\n+PONG\r\n")


def test_a_long_error_reply_streams_past_the_buffer_limit() -> None:
    h = harness([{}], buffer_limit=1024)
    h.feed(GET_A + GET_A)
    long_err = b"-ERR " + b"x" * 100_000 + b"\r\n"
    h.feed(long_err + b"+OK\r\n", reply=True, split="random")
    assert h.to_client == long_err + b"+OK\r\n" and not h.closed


def test_replies_owed_go_out_before_a_close_on_a_bad_reply() -> None:
    h = harness([{}])
    h.feed(GET_A + GET_A + GET_A)
    h.feed(b"+OK\r\n$1\r\nx\r\n?garbage\r\n", reply=True)
    assert h.to_client == b"+OK\r\n$1\r\nx\r\n" and h.closed
    h = harness([{}])
    h.feed(GET_A)
    h.feed(b"+OK\r\n+surplus\r\n", reply=True)
    assert h.to_client == b"+OK\r\n" and h.closed


def test_a_protocol_error_under_reply_off_closes_without_an_answer() -> None:
    h = harness([{}])
    h.feed(GET_A + cmd("CLIENT", "REPLY", "OFF") + b"*1\r\n$-7\r\n")
    h.feed(b"+OK\r\n", reply=True)
    assert h.to_client == b"+OK\r\n" and h.closed


def test_nothing_is_queued_once_the_reply_stream_is_unframed() -> None:
    h = harness([{}])
    h.feed(cmd("PSYNC", "?", "-1"))
    h.feed(b"+FULLRESYNC x 0\r\n", reply=True)
    h.feed((cmd("SUBSCRIBE", "a") + cmd("PSYNC", "?", "-1") + cmd("REPLCONF", "ACK", "1")) * 100)
    assert not h.engine.parser.pending and not h.held(False)  # type: ignore[union-attr]


def test_commands_refused_in_resp2_subscribe_mode_change_nothing() -> None:
    h = harness([{}])
    h.feed(cmd("SUBSCRIBE", "a") + cmd("CLIENT", "REPLY", "OFF") + cmd("MULTI") + cmd("SELECT", "2"))
    parser = h.engine.parser
    assert not parser.reply_off and not parser.in_multi and parser.db == 0  # type: ignore[union-attr]
    h.feed(cmd("UNSUBSCRIBE", "a") + cmd("CLIENT", "REPLY", "OFF"))  # no subscription left: runs
    assert parser.reply_off  # type: ignore[union-attr]
    h2 = harness([{}])
    h2.feed(cmd("HELLO", "3") + cmd("SUBSCRIBE", "a") + cmd("MULTI"))  # RESP3: no such mode
    assert h2.engine.parser.in_multi  # type: ignore[union-attr]


def test_subscriptions_past_the_memory_bound_fall_back_to_the_replies_counts() -> None:
    h = harness([{}], parser_config={"max_pending_bytes": 1024})
    h.feed(cmd("SUBSCRIBE", *[f"channel-{i}" for i in range(40)]))
    parser = h.engine.parser
    assert parser.req_subs is None  # type: ignore[union-attr]
    h.feed(b"".join(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\nchannel-%d\r\n:%d\r\n" % (len(str(i)) + 8, i, i + 1)
                    for i in range(40)), reply=True)  # fmt: skip
    h.feed(cmd("SELECT", "3"))
    assert parser.db == 0 and not h.closed  # type: ignore[union-attr]
