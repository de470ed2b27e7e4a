"""The native redis twin (``proxyd._native.Redis``) against the Python reference (``RedisParser``).

Same method as tests/test_native_equivalence.py (whose schedules and outcome this reuses):
hypothesis drives both with the same traffic, cut into the same chunks and interleaved the same
way, and compares every op, the bytes forwarded, dropped and injected, the two output streams,
log entries, the error, buffer use, the hold, and the parser's state afterwards (the pending
queue, db, transaction and reply-mode flags). Traffic: valid RESP2/RESP3 and inline requests
(simple commands the twin decides itself, and every kind it hands to the reference: MULTI/EXEC,
SELECT, CLIENT REPLY, HELLO, SUBSCRIBE, MONITOR, container commands, arguments past the
inspection budget), replies of every type, near-valid mutations, random bytes; random policies,
through the harness and through the daemon's live policy (reloaded mid-connection, audit mode)
and access log in every ``requests`` mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from live_connection import policy_doc, run_live
from test_native_equivalence import EXAMPLES, SETTINGS, Schedule, mutate, run, schedules

from proxyd.engine import native_module
from proxyd.parsers.redis import RedisFactory
from proxyd.testing import Harness

KEYS = [b"a:1", b"a:2", b"b:1", b"key:9", b"\xffx", b"a:" + b"k" * 300, "a:\u00e9".encode(), b"", b"a:", b"b"]


def bulk(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


REQUESTS: list[Any] = [
    ("get", "{k}"),
    ("GET", "{k}"),
    ("set", "{k}", "v"),
    ("SET", "{k}", "value", "EX", "10"),
    ("mget", "{k}", "{k}"),
    ("mset", "{k}", "1", "{k}", "2"),
    ("del", "{k}"),
    ("incr", "{k}"),
    ("ping",),
    ("PING", "hi"),
    ("echo", "x"),
    ("dbsize",),
    ("time",),
    ("get",),
    ("get", "{k}", "extra"),
    ("bogus", "{k}"),
    ("publish", "{k}", "m"),
    ("config", "get", "save"),
    ("client", "setname", "n"),
    ("client", "reply", "off"),
    ("client", "reply", "on"),
    ("client", "reply", "skip"),
    ("multi",),
    ("exec",),
    ("discard",),
    ("select", "3"),
    ("reset",),
    ("hello", "3"),
    ("hello", "2"),
    ("subscribe", "{k}"),
    ("unsubscribe",),
    ("psubscribe", "a*"),
    ("monitor",),
    ("auth", "pw"),
    ("eval", "return 1", "1", "{k}"),
    ("sort", "{k}", "get", "x"),
    ("get", "x" * 200),
    ("set", "{k}", "v" * 300),
    ("quit",),
    ("unwatch",),
]
RAW_REQUESTS = [
    b"PING\r\n",
    b"GET  a:1 \r\n",
    b"get\ta:1\n",
    b"mget a:1 a:2 b:1\r\n",
    b"  \r\n",
    b"get a:1\x00\r\n",
    b"set a:1 x\ry\r\n",
    b"multi\r\n",
    b"exec\r\n",
    b"get a:1\r\n",
    b"set \"a:1\" 'v'\r\n",
    b"\r\n",
    b"*0\r\n",
    b"*-1\r\n",
    b"*1\r\n$4\r\nPING\r\n",
    b"*2\r\n$03\r\nget\r\n$3\r\na:1\r\n",
    b"*2\r\n$3\r\nget\r\n$-1\r\n",
    b"*x\r\n",
    b"*2\r\n+3\r\nget\r\n",
    b"*2\r\n$3\r\nget\r\n$3\r\na:\x001\r\n",
    b"*1\r\n$4\r\nPI\x00G\r\n",
    b"*2\r\n$3\r\nget\r\n$999999999999\r\n",
]
REPLIES = [
    b"+OK\r\n",
    b"-ERR x\r\n",
    b"$1\r\nx\r\n",
    b"$-1\r\n",
    b"$0\r\n\r\n",
    b":1\r\n",
    b"*2\r\n$1\r\na\r\n:1\r\n",
    b"*-1\r\n",
    b"_\r\n",
    b"%1\r\n+a\r\n:1\r\n",
    b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
    b"*3\r\n$9\r\nsubscribe\r\n$3\r\na:1\r\n:1\r\n",
    b"+QUEUED\r\n",
    b"$300\r\n" + b"v" * 300 + b"\r\n",
    b"+" + b"l" * 100 + b"\r\n",
    b"$05\r\nabcde\r\n",
    b"$3\r\nab",
    b"+OK\n",
    b"?\r\n",
    b"\n",
    b"|1\r\n+k\r\n+v\r\n+OK\r\n",
    b"$?\r\n;2\r\nab\r\n;0\r\n",
    b"*3\r\n$3\r\nfoo\r\n$-1\r\n+x\r\n",
    b"*0\r\n",
    b"*1\r\n*1\r\n:1\r\n",
    b"*2\r\n:+5\r\n:-0\r\n",
    b"*2\r\n:5x\r\n-e\r\n",
    b"*01\r\n+a\r\n",
]
RULES: list[Mapping[str, str]] = [
    {"command": "get", "keyPrefix": "a:"},
    {"command": "set", "keyExact": "a:1"},
    {"command": "@read", "keyRegex": "^a:[0-9]$"},
    {"command": "@write", "keyPrefix": "b"},
    {"command": "@admin"},
    {"command": "config|get"},
    {"command": "@pubsub"},
    {"command": "@all", "keyPrefix": "key:"},
    {"command": "dbsize"},
    {},
]


def fill(parts: tuple[str, ...], draw: st.DrawFn) -> bytes:
    return bulk(*(draw(st.sampled_from(KEYS)) if p == "{k}" else p.encode() for p in parts))


@st.composite
def traffic(draw: st.DrawFn) -> tuple[bytes, bytes]:
    reqs = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 5)) == 0:
            reqs.append(draw(st.sampled_from(RAW_REQUESTS)))
        else:
            reqs.append(fill(draw(st.sampled_from(REQUESTS)), draw))
    reps = draw(st.lists(st.sampled_from(REPLIES), max_size=14))
    client, server = b"".join(reqs), b"".join(reps)
    kind = draw(st.integers(0, 6))
    if kind == 1:
        client = mutate(client, draw)
    elif kind == 2:
        server = mutate(server, draw)
    elif kind == 3:
        client = draw(st.binary(max_size=120))
        server = draw(st.binary(max_size=120))
    return client, server


def run_redis(
    impl: str,
    rules: list[Mapping[str, str]] | None,
    config: dict[str, int],
    sched: Schedule,
    eof: tuple[bool, bool],
) -> dict[str, Any]:
    h = Harness(RedisFactory(), rules=rules, parser_config=config, implementation=impl)
    res = run(h, sched, eof)
    p: Any = h.engine.parser
    res["state"] = (
        [list(e) for e in p.pending],
        p.db,
        p.in_multi,
        p.multi_dirty,
        p.reply_off,
        p.skip_next,
        p.raw,
        p.resp3,
        p.subs,
        p.dead,
    )
    return res


policies = st.one_of(st.none(), st.lists(st.sampled_from(RULES), max_size=4))
configs = st.sampled_from([{}, {"max_inspect_bytes": 1024, "max_pending_bytes": 1024}])


@SETTINGS
@given(
    traffic=traffic(),
    rules=policies,
    data=st.data(),
    config=configs,
    eof=st.tuples(st.booleans(), st.booleans()),
)
def test_redis_equivalent(
    traffic: tuple[bytes, bytes],
    rules: list[Mapping[str, str]] | None,
    data: st.DataObject,
    config: dict[str, int],
    eof: tuple[bool, bool],
) -> None:
    client, server = traffic
    sched = data.draw(schedules(client, server))
    assert run_redis("native", rules, config, sched, eof) == run_redis("python", rules, config, sched, eof)


@pytest.mark.parametrize(
    ("client", "server"),
    [
        # the hot case: pipelined GET/SET, one allowed, one denied in the middle
        (
            bulk(b"set", b"a:1", b"v") + bulk(b"get", b"a:1") + bulk(b"get", b"zz") + bulk(b"get", b"a:2"),
            b"+OK\r\n$1\r\nv\r\n$-1\r\n",
        ),
        # MULTI with a denial: EXEC swapped for DISCARD, then the common case again
        (
            bulk(b"multi") + bulk(b"get", b"zz") + bulk(b"exec") + bulk(b"get", b"a:1"),
            b"+OK\r\n+OK\r\n$1\r\nx\r\n",
        ),
        # a value past the budget, streamed, then more requests
        (
            bulk(b"set", b"a:1", b"v" * 3000) + bulk(b"get", b"a:1"),
            b"+OK\r\n$3000\r\n" + b"v" * 3000 + b"\r\n",
        ),
        # many ordinary replies owed: the hold with a small budget
        (bulk(b"get", b"zz") * 40 + bulk(b"get", b"a:1") * 40, b"$1\r\nx\r\n" * 40),
    ],
)
def test_redis_tables_equivalent(client: bytes, server: bytes) -> None:
    rules: list[Mapping[str, str]] = [
        {"command": "get", "keyPrefix": "a:"},
        {"command": "set", "keyPrefix": "a:"},
        {"command": "multi"},
    ]
    for split in (None, 1, 7):
        sched: Schedule = []
        for reply, stream in ((False, client), (True, server)):
            step = split or max(1, len(stream))
            sched += [(reply, stream[i : i + step]) for i in range(0, len(stream), step)]
        for config in ({}, {"max_inspect_bytes": 1024, "max_pending_bytes": 1024}):
            native = run_redis("native", rules, config, sched, (True, True))
            assert native == run_redis("python", rules, config, sched, (True, True))


def test_the_native_redis_parser_runs_on_the_native_engine() -> None:
    mod = native_module()
    h = Harness(RedisFactory(), implementation="native")
    assert type(h.engine.parser) is mod.Redis
    h.feed(bulk(b"get", b"a:1"))
    assert h.engine.parser.native_state == 1  # type: ignore[attr-defined]
    h.feed(bulk(b"multi"))
    assert h.engine.parser.native_state == 1  # type: ignore[attr-defined]
    assert h.engine.parser.in_multi  # type: ignore[attr-defined]
    h.feed(bulk(b"exec") + bulk(b"subscribe", b"c"))
    assert h.engine.parser.native_state == 0  # type: ignore[attr-defined]
    assert type(Harness(RedisFactory(), implementation="python").engine.parser).__name__ == "RedisParser"


# --- the daemon's live policy (flattened RedisRule evaluation), access log and counters --------

POLICY_RULES = [
    '{command: get, keyPrefix: "a:"}',
    '{command: "@read", keyRegex: "^a:[0-9]$"}',
    '{command: set, keyExact: "a:1"}',
    '{command: "@write", keyPrefix: "b"}',
    '{command: "@admin", keyPrefix: "admin:"}',
    '{command: "@all", keyPrefix: "key:"}',
    "{command: dbsize}",
    "{}",
]



def run_live_redis(impl: str, docs: list[str], audit: bool, mode: str, sched: Schedule, tmp: Any) -> Any:
    return run_live(RedisFactory(), "redis", "rd", 6379, impl, docs, audit, mode, sched, tmp)[0]


@settings(max_examples=max(20, EXAMPLES // 3), deadline=None)
@given(
    traffic=traffic(),
    data=st.data(),
    rules=st.lists(st.lists(st.sampled_from(POLICY_RULES), max_size=4), min_size=1, max_size=2),
    audit=st.booleans(),
    mode=st.sampled_from(["all", "denied", "none"]),
)
def test_redis_live_policy_and_log_equivalent(
    traffic: tuple[bytes, bytes],
    data: st.DataObject,
    rules: list[list[str]],
    audit: bool,
    mode: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    docs = [policy_doc("redis", "rd", 6379, r) for r in rules]
    client, server = traffic
    sched = data.draw(schedules(client, server))
    tmp = tmp_path_factory.mktemp("live")
    assert run_live_redis("native", docs, audit, mode, sched, tmp) == run_live_redis(
        "python", docs, audit, mode, sched, tmp
    )


# --- the flattened-policy interface, as the redis twin reads it --------------------------------


class FlatPolicyOf:
    """A policy with a flat form, as the daemon's LiveConnectionPolicy has, counting ``decide``
    (the twin must answer from the flat form, never asking it)."""

    def __init__(self, factory: Any, rules: list[dict[str, str]]) -> None:
        from proxyd.context import L7Decision
        from proxyd.policy.engine import ConnectionPolicy

        matchers = tuple((factory.compile_rule(r), L7Decision(True, "t")) for r in rules)
        self.cp = ConnectionPolicy(True, "", always=None, matchers=matchers, denied=L7Decision(False, "t"))
        self.cell: list[object] = [object()]
        self.decided = 0

    def decide(self, request: Any) -> Any:
        self.decided += 1
        return self.cp.decide(request)

    def flat(self) -> Any:
        from proxyd.policy import flat

        return flat.build(self.cp, self.cell[0], self.cell)


FLAT_RULES = [
    {"command": "get", "keyPrefix": "a"},
    {"command": "@read", "keyRegex": "^b[0-9]$"},
    {"command": "config|get"},
    {"command": "@all", "keyExact": "z"},
]
FLAT_REDIS = (
    b"GET a1\r\nGET b1\r\nGET c1\r\nSTRLEN b2\r\nSTRLEN bb\r\nMGET b1 b3\r\nMGET b1 c\r\nSET z 1\r\nDEL c\r\n"
)


def test_the_redis_twin_decides_through_the_flat_form() -> None:
    runs = {}
    for impl in ("native", "python"):
        policy = FlatPolicyOf(RedisFactory(), FLAT_RULES)
        h = Harness(RedisFactory(), policy=policy, implementation=impl)
        h.feed(FLAT_REDIS)
        runs[impl] = (h.out, h.log, policy.decided)
    assert runs["native"][:2] == runs["python"][:2]
    assert runs["native"][0][False] == b"GET a1\r\nGET b1\r\nSTRLEN b2\r\nMGET b1 b3\r\nSET z 1\r\n"
    assert runs["python"][2] > 0
    assert runs["native"][2] == 0  # every decision from the flat form (category, regex, prefix, exact)


# --- the twin's per-command memos (policy.c flat_decide) ---------------------------------------

# Twelve commands, more than the eight a connection remembers: the memos' slots are taken over
# while the connection runs, and a reload half way drops them all.
MEMO_COMMANDS = [
    b"GET {k}", b"SET {k} v", b"STRLEN {k}", b"APPEND {k} v", b"INCR {k}", b"DECR {k}",
    b"EXISTS {k}", b"TYPE {k}", b"TTL {k}", b"PTTL {k}", b"GETDEL {k}", b"INCRBY {k} 2",
]  # fmt: skip


def _memo_doc(prefix: str) -> str:
    names = ", ".join(c.split()[0].decode().lower() for c in MEMO_COMMANDS)
    rules = [f'{{command: "{n}", keyPrefix: "{prefix}"}}' for n in names.split(", ")]
    rules.append('{command: "@admin"}')  # evaluated for every command, never holding
    return policy_doc("redis", "rd", 6379, rules)


@pytest.mark.parametrize("audit", [False, True])
@pytest.mark.parametrize("mode", ["denied", "all"])
def test_memos_taken_over_and_dropped_decide_as_the_reference(mode: str, audit: bool, tmp_path: Any) -> None:
    """Each command asked twice per pass, with an allowed and a denied key; the second pass runs
    under the reloaded policy (the other prefix allowed), and the key sits raw in the read.
    Audit mode forwards what would be denied, logged with the key the memo left raw."""
    sched: Schedule = []
    for allowed in ("ok:", "no:"):
        for rep in range(2):
            for cmd in MEMO_COMMANDS:
                for prefix in ("ok:", "no:"):
                    key = f"{prefix}{rep}".encode()
                    sched.append((False, cmd.replace(b"{k}", key) + b"\r\n"))
                    sched.append((True, b":1\r\n" if prefix == allowed else b""))
    docs = [_memo_doc("ok:"), _memo_doc("no:")]
    native = run_live_redis("native", docs, audit, mode, sched, tmp_path)
    assert native == run_live_redis("python", docs, audit, mode, sched, tmp_path)
    counts, (to_client, to_server), lines, error = native
    if audit:
        assert error is None and b"-NOPERM" not in to_client
        assert to_server.count(b"ok:") == to_server.count(b"no:") == 4 * len(MEMO_COMMANDS)
        assert sum(1 for line in lines if line["verdict"] == "audit") == 4 * len(MEMO_COMMANDS)
        return
    n = 4 * len(MEMO_COMMANDS)  # denied, and forwarded: half of each pass
    assert error is None
    assert counts == {("redis", "forwarded"): n, ("redis", "denied"): n}
    assert to_client.count(b"-NOPERM") == n
    assert to_server.count(b"ok:") == to_server.count(b"no:") == n // 2
    denied = [line["fields"]["keys"][0][:3] for line in lines if line["verdict"] == "denied"]
    assert denied == (["no:"] * (n // 2) + ["ok:"] * (n // 2))
    assert len(lines) == (n if mode == "denied" else 2 * n)
