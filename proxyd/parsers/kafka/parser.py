"""The ``kafka`` parser: Cilium's ``rules.kafka`` on the protocol of today's Kafka clients.

Theory of operation
-------------------

Spec: https://kafka.apache.org/protocol and the JSON message definitions in apache/kafka
(``clients/src/main/resources/common/message/``), from which :mod:`.apis` is generated.

Requests. Every request is framed by its ``int32`` length; its header (v0-v2) gives the API key,
version, correlation id and client id (:func:`.requests.read_head`), and its body is read with
the layout of that key and version (:mod:`.schema`): flexible versions with compact lengths and
tagged fields included. The topics it names, wherever that version carries them (and topic ids,
resolved through :mod:`.topicids`), are judged: each must be allowed by some rule. A request is
judged as soon as no topic name can follow (a produce, right after its last topic name), within
its first ``max_inspect_bytes`` (1 MiB by default), and an allowed one is PASSed unchanged
reaching past the buffer, so record batches stream. A denied one is read whole when it fits in
``max_inspect_bytes`` (its answer lists every partition it named) and dropped.

Always allowed: ApiVersions, SaslHandshake, SaslAuthenticate (their payloads are never read or
logged). Metadata is always forwarded; its response is rewritten instead (below).

Incremental fetch sessions (KIP-227): a Fetch with a session epoch above 0 fetches the session's
partitions too, named only when they were added. The parser keeps the partitions of each
session opened on the connection and judges such a fetch by all of them; a fetch in a session
it has not seen opened is answered ``FETCH_SESSION_ID_NOT_FOUND`` (70), on which clients open a
new, full session (which is then judged).

Responses. Kafka answers the requests of a connection in order, one response each (none for a
produce with ``acks=0``). The parser keeps a queue of pending entries, one per request that
gets an answer, and reads each response's length and correlation id, which must be the head
entry's; the response is then PASSed, reaching past the buffer, so record batches are never
held. A denied request's entry holds its answer, which is injected in the request's place:
at once when nothing is pending, otherwise right after the response before it.

ApiVersions responses are read too: a version past the table, for an API key the policy would
refuse unread (a rule names topics), is offered as the table's last version instead, so the
client sends what the parser can judge; otherwise the answer passes unchanged.

Metadata responses are read whole, the topic ids in them learnt, and each topic judged (as a
request of API key Metadata naming that topic): a topic the policy does not allow gets
``TOPIC_AUTHORIZATION_FAILED`` and no partitions, or, when the client asked for all topics, is
left out (as Kafka's authorizer answers). The response is re-encoded only if something changed.

Denials are answered per :mod:`.denials`; a denied ``acks=0`` produce gets nothing. A request
the parser cannot answer (an API key or version missing from the table) is forwarded when
allowed and closes the connection when denied, logged: no answer would leave the client
waiting. A malformed request or response closes the connection with the reason logged, after
every answer already owed.

Access log: ``api_key`` (the name rules use), ``api_version``, ``correlation_id``,
``client_id``, ``topics`` (at most 8, escaped), and ``reason`` for a denial that is not a plain
policy refusal.
"""

from __future__ import annotations

import struct
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from proxyd.ops import DROP, ERROR, ERROR_PROTOCOL, INJECT, MORE, NOP_VERDICT, PASS, Verdict
from proxyd.parser import ConnectionContext, Data, EntryType, Parser, wire_text

from .apis import APIS
from .denials import (
    TOPIC_AUTHORIZATION_FAILED,
    code_for,
    denial,
    response_frame,
)
from .requests import Body, Head, analyse, read_head
from .rules import (
    API_NAMES,
    API_VERSIONS,
    FETCH,
    INIT_PRODUCER_ID,
    METADATA,
    PRODUCE,
    SASL_AUTHENTICATE,
    SASL_HANDSHAKE,
    KafkaRequest,
)
from .schema import Malformed, Reader, Short, encode, layout, response_header_version
from .topicids import TOPIC_IDS, TopicIds

ALWAYS_ALLOWED = frozenset({API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE})
FETCH_SESSION_ID_NOT_FOUND = 70
MAX_LOGGED_TOPICS = 8
MAX_PENDING = 10_000
MAX_SESSIONS = 64
MAX_SESSION_PARTITIONS = 100_000
DEFAULT_INSPECT = 1 << 20
_I32 = struct.Struct(">i")
_NO_OPS = -2147483648

# pending entry kinds
E_PASS = 0  # the server's response passes as is
E_DENY = 1  # no server response: inject ``payload`` in its place
E_META = 2  # a Metadata response: read whole, learn topic ids, filter topics
E_SESSION = 3  # a Fetch opening a session: read the session id from the response
E_VERSIONS = 4  # an ApiVersions response: cap versions past the table that policy needs parsed

TopicKey = str | bytes  # a name, or a 16-byte id


class Entry:
    """One answer owed to the client."""

    __slots__ = ("api_key", "client_id", "corr", "extra", "kind", "payload", "version")

    def __init__(self, kind: int, head: Head, payload: bytes = b"", extra: Any = None) -> None:
        self.kind = kind
        self.corr = head.corr
        self.api_key = head.api_key
        self.version = head.version
        self.client_id = head.client_id
        self.payload = payload
        self.extra = extra


def _text(s: str) -> str:
    return wire_text(s.encode("utf-8", "surrogateescape"))


def _key_text(k: TopicKey) -> str:
    return _text(k) if isinstance(k, str) else f"id:{uuid.UUID(bytes=bytes(k))}"


class KafkaParser(Parser):
    """Per-connection parser; see the module docstring."""

    __slots__ = ("budget", "close_next", "ctx", "dead", "ids", "meta_seen", "pending", "rep_owed", "sasl_raw",
                 "sessions", "upstream")  # fmt: skip

    def __init__(
        self, ctx: ConnectionContext, budget: int = DEFAULT_INSPECT, ids: TopicIds = TOPIC_IDS
    ) -> None:
        self.ctx = ctx
        self.budget = budget
        self.ids = ids
        self.upstream = str(ctx.dst)
        self.pending: deque[Entry] = deque()
        self.rep_owed = 0
        self.dead = False  # a fatal request error: close once the answers owed are out
        self.close_next = False
        self.sasl_raw = False  # SaslHandshake v0: unframed SASL tokens follow
        self.sessions: dict[int, set[tuple[TopicKey, int]]] = {}
        self.meta_seen: dict[tuple[int, bytes], list[tuple[str, bytes | None]]] = {}

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        if reply:
            return self._on_reply(data)
        return self._on_request(data)

    # --- requests -------------------------------------------------------------------------

    def _on_request(self, data: Data) -> Verdict:
        n = len(data)
        if not n:
            return NOP_VERDICT
        if self.dead:
            return (DROP, n)
        if self.sasl_raw:
            return self._fatal("unframed SASL tokens (SaslHandshake v0) are not supported")
        try:
            head = read_head(data, 0, n)
        except Malformed as exc:
            return self._fatal(f"malformed request: {exc}")
        if head is None:
            return (MORE, 1)
        frame = 4 + head.size
        if not head.known:
            return self._unknown(head, frame)
        body: Body | None = None
        try:
            if frame <= n:
                body = analyse(head, data, 0, n)
            else:
                # Not all here: decide as soon as no topic name can follow (a produce request,
                # right after its last topic name), so allowed record batches stream. Reading
                # is bounded by max_inspect_bytes, the same however the bytes arrive.
                end = min(n, self.budget)
                try:
                    body = analyse(head, data, 0, end)
                except Short:
                    if end < self.budget:
                        return (MORE, min(self.budget, max(2 * end, 4096), frame) - n)
                if frame <= self.budget and not self._judge(head, body)[0]:
                    # A denial lists every partition of the request: read it all (it is
                    # dropped, never forwarded), as when it arrived in one piece.
                    return (MORE, frame - n)
        except Malformed as exc:
            return self._fatal(f"malformed {API_NAMES.get(head.api_key)} v{head.version} request: {exc}")
        return self._decide(head, body, frame)

    def _unknown(self, head: Head, frame: int) -> Verdict:
        """A key or version the table lacks: judged without topics; a denial closes."""
        key = head.api_key
        allowed = key in ALWAYS_ALLOWED or self.ctx.matches(
            KafkaRequest(key, head.version, head.client_id, None, True)
        )
        if allowed:
            self.ctx.log(
                EntryType.REQUEST, lambda: self._fields(head, [], "API key or version not in the table")
            )
            if not self._push(Entry(E_PASS, head)):
                return self._fatal("too many pending responses")
            return (PASS, frame)
        self.ctx.log(
            EntryType.DENIED, self._fields(head, [], "API key or version not in the table: no answer")
        )
        return self._fatal("denied a request proxyd cannot answer (API key or version not in its table)")

    def _decide(self, head: Head, body: Body | None, frame: int) -> Verdict:
        allowed, keys, reason, code, commit, kind, extra = self._judge(head, body)
        if not allowed:
            return self._deny(head, body if code is None else None, keys, reason, code)
        if head.api_key == SASL_HANDSHAKE and head.version == 0:
            self.sasl_raw = True
        if commit is not None:
            commit()
        self.ctx.log(EntryType.REQUEST, lambda: self._fields(head, keys, None))
        acks0 = head.api_key == PRODUCE and body is not None and body.tree.get("Acks") == 0
        if not acks0 and not self._push(Entry(kind, head, b"", extra)):
            return self._fatal("too many pending responses")
        return (PASS, frame)

    def _judge(
        self, head: Head, body: Body | None
    ) -> tuple[bool, list[TopicKey], str | None, int | None, Callable[[], None] | None, int, Any]:
        """Decide a request without acting on it: (allowed, topics for the log, reason, error
        code when not the usual one, what to remember if allowed, pending kind, its extra)."""
        key = head.api_key
        ctx = self.ctx
        keys: list[TopicKey] = []
        reason: str | None = None
        commit: Callable[[], None] | None = None
        kind = E_PASS
        extra: Any = None
        if key in ALWAYS_ALLOWED:
            allowed = True
            if key == API_VERSIONS:
                kind = E_VERSIONS
        elif key == METADATA:
            allowed = True
            kind = E_META
            if body is not None:
                keys = list(body.topics)
                topics = body.tree.get("Topics")
                extra = topics is None or (head.version == 0 and not topics)
        elif body is None:
            allowed = False
            reason = f"topics not readable within max_inspect_bytes ({self.budget})"
        else:
            keys = [*body.topics, *body.topic_ids]
            if key == FETCH and head.version >= 7:
                got = self._fetch_session(head, body)
                if got is None:
                    return False, [], "unknown fetch session", FETCH_SESSION_ID_NOT_FOUND, None, E_PASS, None
                keys, commit, pairs = got
                if pairs is not None:
                    kind, extra = E_SESSION, pairs
            names: list[str] = []
            for k in dict.fromkeys(keys):
                if isinstance(k, bytes):
                    name = self.ids.name(self.upstream, k)
                    if name is None:
                        reason = "topic id not named by any Metadata response relayed"
                        break
                    names.append(name)
                else:
                    names.append(k)
            if reason is not None:
                allowed = False
            else:
                keys = list(names)  # logged by name
                lay = layout(key, head.version, False)
                topic_type = lay is not None and lay.topics
                trans = key == INIT_PRODUCER_ID and body.tree.get("TransactionalId") is not None
                cid, ver = head.client_id, head.version
                if not names:
                    allowed = ctx.matches(KafkaRequest(key, ver, cid, None, topic_type, trans))
                else:
                    allowed = True
                    for t in dict.fromkeys(names):
                        if not ctx.matches(KafkaRequest(key, ver, cid, t, True, trans)):
                            allowed = False
                            break
        return allowed, keys, reason, None, commit, kind, extra

    def _deny(self, head: Head, body: Body | None, keys: list[TopicKey], reason: str | None,
              code: int | None) -> Verdict:  # fmt: skip
        frame = 4 + head.size
        self.ctx.log(EntryType.DENIED, self._fields(head, keys, reason))
        if head.api_key == PRODUCE and body is not None and body.tree.get("Acks") == 0:
            return (DROP, frame)
        payload = denial(head, body, code if code is not None else code_for(head, body))
        if payload is None:
            return self._fatal("no denial response for this API version")
        if not self._push(Entry(E_DENY, head, payload)):
            return self._fatal("too many pending responses")
        self._flush_denials()
        return (DROP, frame)

    def _fetch_session(
        self, head: Head, body: Body
    ) -> tuple[list[TopicKey], Callable[[], None] | None, set[tuple[TopicKey, int]] | None] | None:
        """The topics a Fetch really reads, what to remember if it is allowed, and the
        partitions of a session it opens. None: a session this connection never saw opened."""
        tree = body.tree
        sid = int(tree.get("SessionId", 0))
        epoch = int(tree.get("SessionEpoch", -1))
        pairs: set[tuple[TopicKey, int]] = set()
        for t in tree.get("Topics") or ():
            k = t.get("TopicId") if "TopicId" in t else t.get("Topic")
            for p in t.get("Partitions") or ():
                pairs.add((k, int(p.get("Partition", 0))))
        own: list[TopicKey] = [*body.topics, *body.topic_ids]
        if epoch > 0:
            sess = self.sessions.get(sid)
            if sess is None:
                return None
            gone = {(k, int(p)) for k, parts in body.forgotten for p in parts}
            new = (sess | pairs) - gone
            if len(new) > MAX_SESSION_PARTITIONS:
                return None

            def keep() -> None:
                self.sessions[sid] = new

            held = sorted({k for k, _ in new}, key=lambda k: (isinstance(k, bytes), k))
            return [*own, *held], keep, None
        if epoch == 0:
            return own, None, pairs
        if sid:

            def close() -> None:
                self.sessions.pop(sid, None)

            return own, close, None
        return own, None, None

    def _fields(self, head: Head, keys: list[TopicKey], reason: str | None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "api_key": API_NAMES.get(head.api_key, str(head.api_key)),
            "api_version": head.version,
            "correlation_id": head.corr,
            "client_id": _text(head.client_id) if head.client_id is not None else None,
        }
        if keys:
            uniq = list(dict.fromkeys(keys))
            fields["topics"] = [_key_text(k) for k in uniq[:MAX_LOGGED_TOPICS]]
            if len(uniq) > MAX_LOGGED_TOPICS:
                fields["topics_total"] = len(uniq)
        if reason is not None:
            fields["reason"] = reason
        return fields

    def _push(self, entry: Entry) -> bool:
        if len(self.pending) >= MAX_PENDING:
            return False
        self.pending.append(entry)
        return True

    def _flush_denials(self) -> None:
        """Inject the denials at the head of the queue: nothing is owed before them."""
        q = self.pending
        out = []
        while q and q[0].kind == E_DENY:
            out.append(q.popleft().payload)
        if out:
            self.ctx.inject(True, b"".join(out))

    def _fatal(self, reason: str) -> Verdict:
        """Close the connection, after the answers owed before this point."""
        self.ctx.log(EntryType.DENIED, {"error": reason})
        if not self.pending:
            return (ERROR, ERROR_PROTOCOL)
        self.dead = True
        self.pending.append(Entry(E_DENY, Head(0, -1, 0, 0, None, 0, False), b"", reason))
        return (DROP, 1 << 30)

    # --- responses ------------------------------------------------------------------------

    def _on_reply(self, data: Data) -> Verdict:
        if self.rep_owed:
            n, self.rep_owed = self.rep_owed, 0
            return (INJECT, n)
        if self.close_next:
            return (ERROR, ERROR_PROTOCOL)
        n = len(data)
        if not n:
            return NOP_VERDICT
        q = self.pending
        pos = 0
        while pos < n:
            if n - pos < 8:
                return (PASS, pos) if pos else (MORE, 8 - n)
            size, corr = struct.unpack_from(">ii", data, pos)
            if not q:
                self.ctx.log(EntryType.RESPONSE, {"error": "response with no request pending"})
                return (ERROR, ERROR_PROTOCOL)
            entry = q[0]
            if entry.corr != corr or size < 4:
                self.ctx.log(
                    EntryType.RESPONSE,
                    {"error": f"response correlation id {corr} where {entry.corr} was expected"},
                )
                return (ERROR, ERROR_PROTOCOL)
            end = pos + 4 + size
            swap: bytes | None = None
            if entry.kind >= E_META:
                if pos:
                    return (PASS, pos)
                got = self._read_special(entry, data, end, n)
                if isinstance(got, tuple):
                    return got
                swap = got
            q.popleft()
            pos = end
            verdict = self._after(data, pos, n, swap)
            if verdict is not None:
                return verdict
        return (PASS, pos)

    def _after(self, data: Data, pos: int, n: int, swap: bytes | None) -> Verdict | None:
        """After the response ending at ``pos``: inject what follows it (denials, a rewritten
        response, the close). None: nothing to do, the caller may go on to the next frame."""
        q = self.pending
        out = [swap] if swap is not None else []
        while q and q[0].kind == E_DENY:
            entry = q.popleft()
            if entry.api_key == -1:  # the fatal marker: close after what is owed
                if pos > n:  # the response is still being passed through: close after it
                    if out:
                        self.ctx.inject(True, b"".join(out))
                    self.close_next = True
                    return (DROP if swap is not None else PASS, pos)
                self.ctx.inject(True, (b"" if swap is not None else bytes(data[:pos])) + b"".join(out))
                return (ERROR, ERROR_PROTOCOL)
            out.append(entry.payload)
        if not out:
            return None
        payload = b"".join(out)
        self.ctx.inject(True, payload)
        if pos < n:
            self.rep_owed = len(payload)
        return (DROP if swap is not None else PASS, pos)

    def _read_special(self, entry: Entry, data: Data, end: int, n: int) -> bytes | Verdict | None:
        """A Metadata response (returns its rewrite, or None to pass it) or the head of a Fetch
        response opening a session; a verdict when more bytes are needed or it is malformed."""
        hv = response_header_version(entry.api_key, entry.version)
        lay = layout(entry.api_key, entry.version, True)
        assert lay is not None
        if entry.kind == E_VERSIONS:
            return self._cap_versions(entry, data, end, n, hv, lay)
        if entry.kind == E_SESSION:
            r = Reader(data, 8, min(n, end))
            try:
                if hv:
                    r.tags()
                tree = {}
                for f in lay.fields[:3]:
                    tree[f.name] = r.scalar(f.kind, lay.flexible, False)
            except Short:
                if n >= end:
                    return self._bad_response("Fetch response too short")
                return (MORE, 1)
            except Malformed as exc:
                return self._bad_response(f"Fetch response: {exc}")
            sid = int(tree.get("SessionId", 0))
            if sid and not tree.get("ErrorCode"):
                if len(self.sessions) >= MAX_SESSIONS and sid not in self.sessions:
                    self.sessions.pop(next(iter(self.sessions)))
                self.sessions[sid] = entry.extra
            return None
        if end > n:
            if end > self.budget:
                return self._bad_response(f"Metadata response larger than max_inspect_bytes ({self.budget})")
            return (MORE, end - n)
        r = Reader(data, 8, end)
        try:
            if hv:
                r.tags()
            body_start = r.pos
            # A first pass reads only the topic names and ids: when every topic is allowed
            # (the usual case) the response passes as it is, no tree built. Clients refresh
            # Metadata periodically and the answers repeat: the topics of the last few bodies
            # are remembered (the policy is asked again every time).
            key = (entry.version, bytes(data[body_start:end]))
            topics = self.meta_seen.get(key)
            if topics is None:
                topics = self._metadata_topics(r, lay)
                if r.pos != end:
                    return self._bad_response("bytes after the Metadata response body")
                if len(self.meta_seen) >= 4:
                    self.meta_seen.pop(next(iter(self.meta_seen)))
                self.meta_seen[key] = topics
            refused = self._judge_metadata(entry, topics)
            if not refused:
                return None
            r = Reader(data, body_start, end)
            tree = r.struct(lay)
        except (Short, Malformed) as exc:
            return self._bad_response(f"malformed Metadata response: {type(exc).__name__} {exc}")
        return self._filter_metadata(entry, lay, tree, refused)

    def _cap_versions(
        self, entry: Entry, data: Data, end: int, n: int, hv: int, lay: Any
    ) -> bytes | Verdict | None:
        """ApiVersions: where the broker offers a version past proxyd's table and the policy
        would refuse that version unread (a rule names topics), offer the table's last version
        instead, so the client sends requests proxyd can read. Otherwise (and for an answer it
        cannot read, such as the v0 error answer to a version the broker lacks) it passes."""
        if end > n:
            if end > self.budget:
                return None
            return (MORE, end - n)
        r = Reader(data, 8, end)
        try:
            if hv:
                r.tags()
            tree = r.struct(lay)
        except (Short, Malformed):
            return None
        if r.pos != end or tree.get("ErrorCode"):
            return None
        capped: list[str] = []
        for item in tree.get("ApiKeys") or ():
            key, low, high = item.get("ApiKey"), item.get("MinVersion"), item.get("MaxVersion")
            api = APIS.get(key)
            if api is None or high <= api[2] or low > api[2]:
                continue
            if self.ctx.matches(KafkaRequest(key, high, entry.client_id, None, True)):
                continue  # allowed unread anyway: nothing to gain
            item["MaxVersion"] = api[2]
            capped.append(f"{API_NAMES.get(key, key)} v{high}->v{api[2]}")
        if not capped:
            return None
        self.ctx.log(
            EntryType.RESPONSE,
            {"api_key": "apiversions", "api_version": entry.version, "correlation_id": entry.corr,
             "versions_capped": capped[:MAX_LOGGED_TOPICS]},
        )  # fmt: skip
        head = Head(0, API_VERSIONS, entry.version, entry.corr, None, 0, True)
        return response_frame(head, encode(lay, tree))

    def _judge_metadata(self, entry: Entry, topics: list[tuple[str, bytes | None]]) -> set[str]:
        """Learn the topic ids of a Metadata response; the topics the policy refuses."""
        refused: set[str] = set()
        ctx = self.ctx
        for name, tid in topics:
            if tid is not None and any(tid):
                self.ids.learn(self.upstream, tid, name)
            if not ctx.matches(KafkaRequest(METADATA, entry.version, entry.client_id, name, True)):
                refused.add(name)
        return refused

    @staticmethod
    def _metadata_topics(r: Reader, lay: Any) -> list[tuple[str, bytes | None]]:
        """Step over a Metadata response body: its topics' names and ids."""
        out: list[tuple[str, bytes | None]] = []
        flex = lay.flexible
        for f in lay.fields:
            if f.name != "Topics":
                r.skip_field(f, flex)
                continue
            n = r.length(flex, True)
            if n > r.end - r.pos:
                raise Malformed(f"Topics: count {n} beyond the message")
            elem = f.children
            for _ in range(max(n, 0)):
                name: str | None = None
                tid: bytes | None = None
                for g in elem.fields:
                    if g.name == "Name":
                        name = r.scalar(g.kind, flex, g.nullable)
                    elif g.name == "TopicId":
                        tid = r.scalar(g.kind, flex, False)
                    else:
                        r.skip_field(g, flex)
                if flex:
                    r.tags()
                if name is not None:
                    out.append((name, tid))
        if flex:
            r.tags()
        return out

    def _filter_metadata(self, entry: Entry, lay: Any, tree: dict[str, Any], refused: set[str]) -> bytes:
        topics = tree.get("Topics") or []
        kept = []
        for t in topics:
            if t.get("Name") not in refused:
                kept.append(t)
                continue
            if entry.extra:  # all topics asked for: leave it out
                continue
            t["ErrorCode"] = TOPIC_AUTHORIZATION_FAILED
            t["Partitions"] = []
            if "TopicId" in t:
                t["TopicId"] = b"\0" * 16
            if "IsInternal" in t:
                t["IsInternal"] = False
            if "TopicAuthorizedOperations" in t:
                t["TopicAuthorizedOperations"] = _NO_OPS
            kept.append(t)
        tree["Topics"] = kept
        names = sorted(refused)
        self.ctx.log(
            EntryType.RESPONSE,
            {
                "api_key": "metadata",
                "api_version": entry.version,
                "correlation_id": entry.corr,
                "client_id": _text(entry.client_id) if entry.client_id is not None else None,
                "topics_refused": [_text(x) for x in names[:MAX_LOGGED_TOPICS]],
            },
        )
        head = Head(0, METADATA, entry.version, entry.corr, None, 0, True)
        return response_frame(head, encode(lay, tree))

    def _bad_response(self, reason: str) -> Verdict:
        self.ctx.log(EntryType.RESPONSE, {"error": reason})
        return (ERROR, ERROR_PROTOCOL)


__all__ = ["KafkaParser"]
