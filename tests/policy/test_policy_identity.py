"""Identities: longest prefix wins, IPv4 and IPv6, IPv4-mapped addresses looked up as IPv4."""

from __future__ import annotations

import pytest

from proxyd.policy.identity import IdentityMap

ENTRIES = [
    ("10.0.0.0/8", {"zone": "internal"}),
    ("10.0.1.0/24", {"app": "memcached"}),
    ("10.0.1.7/32", {"app": "special"}),
    ("fd00::/16", {"zone": "internal6"}),
    ("fd00:1::/64", {"app": "web"}),
    ("::ffff:192.0.2.0/120", {"app": "mapped"}),
    ("0.0.0.0/0", {"zone": "world"}),
]


@pytest.mark.parametrize(
    ("ip", "labels"),
    [
        ("10.0.1.5", {"app": "memcached"}),
        ("10.0.1.7", {"app": "special"}),
        ("10.9.9.9", {"zone": "internal"}),
        ("192.168.1.1", {"zone": "world"}),
        ("fd00:1::5", {"app": "web"}),
        ("fd00:2::5", {"zone": "internal6"}),
        ("2001:db8::1", {}),
        ("::ffff:10.0.1.5", {"app": "memcached"}),
        ("::ffff:10.0.1.7", {"app": "special"}),
        ("192.0.2.9", {"app": "mapped"}),
        ("fe80::1%eth0", {}),
    ],
)
def test_longest_prefix_wins(ip: str, labels: dict[str, str]) -> None:
    ids = IdentityMap.from_entries(ENTRIES)
    assert dict(ids.labels_for(ip)) == labels


def test_no_entries_no_labels() -> None:
    ids = IdentityMap.from_entries([])
    assert dict(ids.labels_for("10.0.0.1")) == {}
    assert ids.prefix_for("10.0.0.1") is None


def test_prefix_for_explains_the_match() -> None:
    ids = IdentityMap.from_entries(ENTRIES)
    assert str(ids.prefix_for("10.0.1.5")) == "10.0.1.0/24"
    assert str(ids.prefix_for("::ffff:10.0.1.7")) == "10.0.1.7/32"
    assert len(ids) == len(ENTRIES)


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.0.0.1/8", r"identities\[0\].cidr: '10.0.0.1/8' has host bits set \(did you mean 10.0.0.0/8\?\)"),
        ("10.0.0.0/33", r"identities\[0\].cidr: '10.0.0.0/33' is not a CIDR"),
        ("banana", r"identities\[0\].cidr: 'banana' is not a CIDR"),
    ],
)
def test_bad_cidr_is_a_clear_value_error(cidr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IdentityMap.from_entries([(cidr, {})])


def test_duplicate_prefix_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"identities\[1\].cidr: 10.0.0.0/8 is given twice"):
        IdentityMap.from_entries([("10.0.0.0/8", {}), ("10.0.0.0/8", {"a": "b"})])


def test_labels_are_read_only_and_shared() -> None:
    ids = IdentityMap.from_entries([("10.0.0.0/8", {"app": "x"})])
    labels = ids.labels_for("10.1.1.1")
    assert labels is ids.labels_for("10.2.2.2")
    with pytest.raises(TypeError):
        labels["app"] = "y"  # type: ignore[index]


def test_bad_address_raises() -> None:
    ids = IdentityMap.from_entries([])
    with pytest.raises(ValueError, match="nope"):
        ids.labels_for("nope")
