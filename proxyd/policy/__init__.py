"""Policy: CiliumNetworkPolicy-shaped documents, identities and enforcement (docs/policy.md).

- :mod:`.identity`: labels of IP addresses (longest prefix wins);
- :mod:`.selector`: endpoint selectors over labels, Cilium's source-prefix rules;
- :mod:`.model`: the frozen, validated documents;
- :mod:`.loader`: files and text to documents, every problem reported as ``file:line: path``;
- :mod:`.engine`: documents to per-connection and per-request verdicts;
- :mod:`.store`: the policy in force, reloads, imports and their persistence;
- :mod:`.explain`: why a connection is allowed or denied.

Pure Python, no I/O besides reading policy files and the store's state file.
"""

from proxyd.policy.engine import ConnectionPolicy, PolicySet
from proxyd.policy.identity import IdentityMap
from proxyd.policy.loader import load_paths, parse_text, warnings
from proxyd.policy.model import Document
from proxyd.policy.store import LiveConnectionPolicy, PolicyStore

__all__ = [
    "ConnectionPolicy",
    "Document",
    "IdentityMap",
    "LiveConnectionPolicy",
    "PolicySet",
    "PolicyStore",
    "load_paths",
    "parse_text",
    "warnings",
]
