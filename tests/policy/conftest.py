"""Fixtures for the policy tests (helpers live in ``policy_helpers``)."""

from __future__ import annotations

import pytest
from policy_helpers import make_registry

from proxyd.registry import Registry


@pytest.fixture
def registry() -> Registry:
    return make_registry()
