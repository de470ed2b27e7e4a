"""Policy side of the kafka parser: Cilium's ``rules.kafka`` fields, their checks, the matcher.

Rule fields (Cilium's ``PortRuleKafka``; all optional, all must match)::

    rules:
      kafka:
        - role: produce            # or consume: a set of API keys (below)
          topic: deathstar-plans   # exact topic name
        - apiKey: metadata         # one API key by Cilium's name (case-insensitive)
          apiVersion: "9"          # exact version
          clientID: my-client      # exact client id

Checks, as Cilium's ``Sanitize``: ``role`` and ``apiKey`` not together; ``role`` is ``produce``
or ``consume`` and ``apiKey`` a known name (both case-insensitive); ``apiVersion`` a decimal
integer 0-32767; ``topic`` at most 255 characters of ``a-z A-Z 0-9 . _ -``.

Role expansion is Cilium's, plus what today's default clients send that it predates:
``produce`` = Produce, Metadata, ApiVersions, and InitProducerId (idempotent producers, the
default since Kafka 3.0 and librdkafka 2, ask for a producer id before producing; a request
with a transactional id is not covered: transactions need explicit ``apiKey`` rules);
``consume`` = Fetch, ListOffsets, Metadata, OffsetCommit, OffsetFetch, FindCoordinator,
JoinGroup, Heartbeat, LeaveGroup, SyncGroup, ApiVersions, and OffsetForLeaderEpoch (consumers
validate their position after a leader change with it since Kafka 2.3).

The parser asks once per topic a request names (``topic`` set), or once with ``topic=None``:
a rule with ``topic`` never matches ``None`` for a request type that carries topics, and
ignores its topic for a type that does not (Cilium: "ignored if the matched request message
type doesn't contain any topic").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from proxyd.errors import RuleError
from proxyd.parser import ALLOW_ALL, RuleMatcher

from .apis import APIS

RULE_KEYS = ("role", "apiKey", "apiVersion", "clientID", "topic")

#: Cilium's names (pkg/policy/api/kafka APIKeyMap) for keys 0-33.
CILIUM_NAMES: dict[int, str] = {
    0: "produce", 1: "fetch", 2: "offsets", 3: "metadata", 4: "leaderandisr", 5: "stopreplica",
    6: "updatemetadata", 7: "controlledshutdown", 8: "offsetcommit", 9: "offsetfetch",
    10: "findcoordinator", 11: "joingroup", 12: "heartbeat", 13: "leavegroup", 14: "syncgroup",
    15: "describegroups", 16: "listgroups", 17: "saslhandshake", 18: "apiversions",
    19: "createtopics", 20: "deletetopics", 21: "deleterecords", 22: "initproducerid",
    23: "offsetforleaderepoch", 24: "addpartitionstotxn", 25: "addoffsetstotxn", 26: "endtxn",
    27: "writetxnmarkers", 28: "txnoffsetcommit", 29: "describeacls", 30: "createacls",
    31: "deleteacls", 32: "describeconfigs", 33: "alterconfigs",
}  # fmt: skip
#: Every key's name: Cilium's, else Kafka's name in lower case (``saslauthenticate``).
API_NAMES: dict[int, str] = {k: CILIUM_NAMES.get(k, v[0].lower()) for k, v in APIS.items()}
#: Names a rule may use: the above plus Kafka's own lower-case names (``listoffsets``).
NAME_TO_KEY: dict[str, int] = {v[0].lower(): k for k, v in APIS.items()} | {
    v: k for k, v in API_NAMES.items()
}

PRODUCE, FETCH, LIST_OFFSETS, METADATA = 0, 1, 2, 3
OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP, HEARTBEAT, LEAVE_GROUP, SYNC_GROUP = range(8, 15)
SASL_HANDSHAKE, API_VERSIONS, INIT_PRODUCER_ID, OFFSET_FOR_LEADER_EPOCH = 17, 18, 22, 23
SASL_AUTHENTICATE = 36

ROLES: dict[str, frozenset[int]] = {
    "produce": frozenset({PRODUCE, METADATA, API_VERSIONS, INIT_PRODUCER_ID}),
    "consume": frozenset(
        {FETCH, LIST_OFFSETS, METADATA, OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP,
         HEARTBEAT, LEAVE_GROUP, SYNC_GROUP, API_VERSIONS, OFFSET_FOR_LEADER_EPOCH}
    ),
}  # fmt: skip

MAX_TOPIC_LEN = 255
_TOPIC = re.compile(r"[a-zA-Z0-9._-]+")
_VERSION = re.compile(r"[+-]?[0-9]+")


class KafkaRequest(NamedTuple):
    """One policy question: a request's key, version, client id, and one of its topics.

    ``topic`` is None for a request that names no topic; ``topic_type`` says whether the
    request's type carries topics at all (then a rule with ``topic`` cannot match None).
    ``transactional`` marks an InitProducerId with a transactional id (not in a role).
    """

    api_key: int
    api_version: int
    client_id: str | None
    topic: str | None
    topic_type: bool
    transactional: bool = False


class KafkaRule:
    """A compiled rule; see the module docstring."""

    __slots__ = ("client_id", "keys", "role", "source", "topic", "version")

    def __init__(
        self,
        keys: frozenset[int] | None,
        role: bool,
        version: int | None,
        client_id: str | None,
        topic: str | None,
        source: Mapping[str, Any],
    ) -> None:
        self.keys = keys
        self.role = role
        self.version = version
        self.client_id = client_id
        self.topic = topic
        self.source = dict(source)

    def matches(self, request: Any) -> bool:
        if not isinstance(request, KafkaRequest):
            return False
        if self.keys is not None:
            if request.api_key not in self.keys:
                return False
            if self.role and request.transactional:
                return False
        if self.version is not None and request.api_version != self.version:
            return False
        if self.client_id is not None and request.client_id != self.client_id:
            return False
        if self.topic is not None:
            if request.topic is None:
                return not request.topic_type
            return request.topic == self.topic
        return True

    def __repr__(self) -> str:
        return f"KafkaRule({self.source!r})"


def compile_rule(rule: Mapping[str, Any]) -> RuleMatcher:
    """Compile one ``rules.kafka`` entry; raises :class:`RuleError` naming the bad field."""
    values: dict[str, str] = {}
    for key, value in rule.items():
        if key not in RULE_KEYS:
            raise RuleError(f"unknown field of a kafka rule (known: {', '.join(RULE_KEYS)})", str(key))
        if value is None:
            continue
        if not isinstance(value, str):
            raise RuleError(f"must be a string, not {type(value).__name__}", key)
        if value:  # Go's omitempty: "" is as if absent
            values[key] = value
    if "role" in values and "apiKey" in values:
        raise RuleError(
            f"cannot set both role {values['role']!r} and apiKey {values['apiKey']!r} together", "apiKey"
        )
    keys: frozenset[int] | None = None
    if "role" in values:
        keys = ROLES.get(values["role"].lower())
        if keys is None:
            raise RuleError(f"invalid Kafka role {values['role']!r} (produce or consume)", "role")
    if "apiKey" in values:
        code = NAME_TO_KEY.get(values["apiKey"].lower())
        if code is None:
            raise RuleError(
                f"invalid Kafka apiKey {values['apiKey']!r} (a name such as produce, fetch, offsets, "
                "metadata, apiversions; see docs/parsers/kafka.md)",
                "apiKey",
            )
        keys = frozenset({code})
    version: int | None = None
    if "apiVersion" in values:
        text = values["apiVersion"]
        n = int(text) if _VERSION.fullmatch(text) else -1
        if not 0 <= n <= 0x7FFF:
            raise RuleError(f"invalid Kafka apiVersion {text!r} (an integer 0-32767)", "apiVersion")
        version = n
    topic = values.get("topic")
    if topic is not None:
        if len(topic) > MAX_TOPIC_LEN:
            raise RuleError(f"kafka topic exceeds maximum len of {MAX_TOPIC_LEN}", "topic")
        if not _TOPIC.fullmatch(topic):
            raise RuleError(f"invalid Kafka topic name {topic!r} (letters, digits, '.', '_', '-')", "topic")
    if keys is None and version is None and "clientID" not in values and topic is None:
        return ALLOW_ALL
    return KafkaRule(keys, "role" in values, version, values.get("clientID"), topic, rule)
