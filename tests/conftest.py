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


_ACL_USERS_AT_START: set[str] = set()


def _acl_users() -> set[str] | None:
    """The shared Redis's ACL users, or None when it cannot be asked."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return None
    import redis

    try:
        users = redis.Redis.from_url(url, socket_timeout=5).execute_command("ACL", "USERS")
    except redis.RedisError:
        return None
    return {u.decode() if isinstance(u, bytes) else str(u) for u in users}


def pytest_sessionstart(session: pytest.Session) -> None:
    _ACL_USERS_AT_START.update(_acl_users() or ())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Nodes joined by tests get Redis ACL users (workloads/services/broker.py) in the
    shared Redis; transactional tests truncate the node rows without deleting them, so the
    users made during this run are removed here, and only those."""
    users = _acl_users()
    if not users:
        return
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
    for user in sorted(users - _ACL_USERS_AT_START):
        if user.startswith("node-"):
            client.execute_command("ACL", "DELUSER", user)
