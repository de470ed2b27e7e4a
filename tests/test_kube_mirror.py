"""A worker's copy of the cluster's identities (proxyd/kube/mirror.py): what the control process
sends for an event is the addresses it changed, and the copy ends equal to the control's state
whatever order and however often snapshots and deltas arrive (they travel pickled, as here)."""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

import proxyd.workers  # noqa: F401 (registers how identity label mappings pickle)
from proxyd.kube.mirror import ClusterMirror, Delta, delta, snapshot
from proxyd.kube.state import ClusterState, Pod


def pod(i: int, ns: str = "prod", **labels: str) -> Pod:
    return Pod(uid=f"u{i}", namespace=ns, name=f"p{i}", labels=labels or {"app": f"a{i % 10}"},
               ips=(f"10.0.{i >> 8}.{i & 255}",))  # fmt: skip


def sent(changes: Delta) -> Delta:
    """As a worker receives it: through pickle."""
    got: Delta = pickle.loads(pickle.dumps(changes, protocol=pickle.HIGHEST_PROTOCOL))
    return got


def same(mirror: ClusterMirror, state: ClusterState) -> bool:
    return dict(mirror.identities()) == dict(state.identities())


def test_a_pod_event_is_a_delta_of_its_addresses_only() -> None:
    s = ClusterState("east")
    s.replace_pods(pod(i) for i in range(2000))
    m = ClusterMirror()
    assert m.apply(sent(snapshot(s))) == set(s.identities())
    assert same(m, s)

    changed = s.apply_pod("ADDED", pod(5000, app="new"))
    one = delta(s, changed)
    assert list(one) == ["10.0.19.136"]
    # What goes to each worker for it: a few hundred bytes, not the table (tens of kilobytes here).
    assert len(pickle.dumps(one, protocol=pickle.HIGHEST_PROTOCOL)) < 512
    assert len(pickle.dumps(snapshot(s), protocol=pickle.HIGHEST_PROTOCOL)) > 50_000
    assert m.apply(sent(one)) == {"10.0.19.136"}
    assert m.identity("10.0.19.136").origin == "pod prod/p5000"  # type: ignore[union-attr]
    assert m.identity("::ffff:10.0.19.136") == m.identity("10.0.19.136")  # as the socket reports it
    assert m.apply(sent(one)) == set()  # applied twice: nothing changes

    gone = delta(s, s.apply_pod("DELETED", pod(7)))
    assert gone == {"10.0.0.7": None}
    assert m.apply(sent(gone)) == {"10.0.0.7"}
    assert m.identity("10.0.0.7") is None
    assert same(m, s)


def test_label_sets_are_shared_across_deltas() -> None:
    s = ClusterState()
    m = ClusterMirror()
    for i in range(50):  # a deployment's pods, one event each
        m.apply(sent(delta(s, s.apply_pod("ADDED", pod(i, app="web")))))
    labels = {id(i.labels) for i in m.identities().values()}
    assert len(labels) == 1 and len(m.identities()) == 50


events = st.lists(
    st.tuples(st.sampled_from(["ADDED", "DELETED", "ns", "relist"]), st.integers(0, 30), st.integers(0, 3)),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(events, st.integers(0, 40))
def test_snapshot_then_deltas_equal_the_state(evs: list[tuple[str, int, int]], restart_at: int) -> None:
    """A worker restarted at any point (a snapshot, with deltas it may already have after it)
    ends equal to the control's state, as does one that saw every delta."""
    s = ClusterState()
    always, late = ClusterMirror(), ClusterMirror()
    pending: set[str] = set()
    for n, (kind, i, v) in enumerate(evs):
        if kind == "ns":
            changed = s.apply_namespace("MODIFIED", "prod", {"v": str(v)})
        elif kind == "relist":
            changed = s.replace_pods(pod(j, app=str(v)) for j in range(i))
        else:
            changed = s.apply_pod(kind, pod(i, app=str(v)))
        pending |= changed
        if n == restart_at:
            late.apply(sent(snapshot(s)))  # pending changes still go to everyone next
        if v % 2:  # a push: pending changes coalesced into one delta
            d = sent(delta(s, pending))
            always.apply(d)
            late.apply(d)
            pending = set()
    d = sent(delta(s, pending))
    always.apply(d)
    late.apply(d)
    assert same(always, s)
    if restart_at < len(evs):
        assert same(late, s)


async def test_a_big_delta_is_read_off_the_loop_the_same() -> None:
    """A relist's delta (over BIG_DELTA pickled) is unpickled on a thread: same result."""
    from proxyd.workers import BIG_DELTA, _unpickle

    s = ClusterState()
    small = delta(s, s.apply_pod("ADDED", pod(1)))
    big = delta(s, s.replace_pods(pod(i) for i in range(3000)))
    for changes in (small, big):
        blob = pickle.dumps(changes, protocol=pickle.HIGHEST_PROTOCOL)
        assert (len(blob) > BIG_DELTA) == (changes is big)
        m = ClusterMirror()
        m.apply(await _unpickle(blob))
        assert dict(m.identities()) == {ip: i for ip, i in s.identities().items() if ip in changes}
