"""Fixtures shared by the whole suite.

Control-plane tests run on the Postgres named by DATABASE_URL (infra/test.sh points it at
127.0.0.1:5432); agent tests are plain Python and need root for anything marked
``privileged``.
"""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests run last; privileged tests are skipped loudly when not root.

    Playwright's sync API keeps an asyncio loop running in the main thread until the end
    of the session, and pyroute2 (the agent's netlink library) cannot run its own loop
    there after that. This hook runs after pytest-django's reordering.
    """
    items[:] = [i for i in items if "browser" not in i.keywords] + [
        i for i in items if "browser" in i.keywords
    ]
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (cgroups, mounts, network namespaces)")
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)
