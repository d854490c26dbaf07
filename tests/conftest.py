"""Fixtures shared by the whole suite.

Control-plane tests run on the Postgres named by DATABASE_URL (infra/test.sh points it at
127.0.0.1:5432); agent tests are plain Python and need root for anything marked
``privileged``.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Privileged tests need root; skip them loudly elsewhere instead of failing obscurely."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (cgroups, mounts, network namespaces)")
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)
