"""Topic ids to names, learnt from the Metadata responses proxyd relays (bounded, per upstream).

Fetch v13+ names topics by their 16-byte id only. The only trustworthy source of the name is
the broker itself: every Metadata response (v10+) carries each topic's name and id. The map is
shared by the connections of one process and keyed by the upstream the response came from, so
a broker answering on one address cannot name the topics of another. It is bounded twice: at
most :data:`MAX_UPSTREAMS` upstreams and :data:`MAX_IDS` ids each, the least recently used
going first. A topic id that no relayed Metadata response named is denied.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_UPSTREAMS = 1024
MAX_IDS = 65536


class TopicIds:
    """upstream -> (topic id -> topic name), both levels LRU-bounded."""

    __slots__ = ("_by_upstream", "max_ids", "max_upstreams")

    def __init__(self, max_upstreams: int = MAX_UPSTREAMS, max_ids: int = MAX_IDS) -> None:
        self._by_upstream: OrderedDict[str, OrderedDict[bytes, str]] = OrderedDict()
        self.max_upstreams = max_upstreams
        self.max_ids = max_ids

    def learn(self, upstream: str, topic_id: bytes, name: str) -> None:
        ids = self._by_upstream.get(upstream)
        if ids is None:
            ids = self._by_upstream[upstream] = OrderedDict()
            if len(self._by_upstream) > self.max_upstreams:
                self._by_upstream.popitem(last=False)
        else:
            self._by_upstream.move_to_end(upstream)
        ids[topic_id] = name
        ids.move_to_end(topic_id)
        if len(ids) > self.max_ids:
            ids.popitem(last=False)

    def name(self, upstream: str, topic_id: bytes) -> str | None:
        ids = self._by_upstream.get(upstream)
        if ids is None:
            return None
        return ids.get(topic_id)

    def clear(self) -> None:
        self._by_upstream.clear()


#: The process-wide map every kafka parser shares.
TOPIC_IDS = TopicIds()
