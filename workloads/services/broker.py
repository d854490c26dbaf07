"""Per-node broker credentials: one Redis ACL user per node, scoped to that node's keys.

A node consumes its own queue (``node.<id>``) and writes the results of the tasks sent
to it; nothing else. Reports, build logs and service secrets travel over HTTP with the
node credential instead (``protocol.NODE_REPORT_PATH`` and friends), so the broker never
needs to accept anything from a node for the control plane, and a node that reads every
byte its ACL allows learns nothing of another node, tenant or of the control plane.

The user ``node-<id>`` may (Redis 7 ACL rules, all in :func:`node_acl_rules`):

* keys ``node.<id>*`` (its queue and kombu's priority lists ``node.<id>\\x06\\x16<n>``),
  ``_kombu.binding.node.<id>`` and ``_kombu.binding_permanent.node.<id>`` (the queue's
  binding), ``unacked.node.<id>*`` (kombu's
  unacked hash, index and mutex, made per node by ``protocol.node_transport_options``) and
  ``celery-task-meta-node<id>-*`` (its results: the control plane prefixes every task id
  it sends a node with :func:`task_id_prefix`, and the result backend reads a key before
  writing it, so reads must be scoped as tightly as writes);
* publish on ``celery-task-meta-node<id>-*`` (the result notification);
* only the commands a Celery worker with late acks needs: no ``KEYS``, ``SCAN``,
  ``SUBSCRIBE``/``PSUBSCRIBE``, ``FLUSH*``, ``CONFIG``, ``ACL``, ``MONITOR`` or ``CLIENT
  LIST``/``KILL``.

The control plane manages users through its own connection (``REDIS_URL``), which must be
an admin (the default user, with a password in production; ``infra/run.sh``). The node's
password is returned once in the join response; Redis keeps only its SHA-256, so a
re-join (or ``manage.py provision_broker_users``) rotates it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from django.conf import settings

from tenants.errors import BerthError

log = logging.getLogger(__name__)


class BrokerUnavailable(BerthError):
    """The control plane could not manage a node's broker user (Redis down or refusing)."""

    status_code = 503
    code = "broker_unavailable"


#: kombu's separator between a queue's name and its priority (``node.<id>\x06\x16<n>``).
PRIORITY_SEP = "\x06\x16"
#: Commands a node's Celery worker runs (consume with late acks, store results).
NODE_COMMANDS = (
    "auth hello ping select echo quit reset client|setname client|getname client|id "
    "brpop rpop lpush rpush llen lrem sadd smembers srem hset hget hdel "
    "zadd zrem zrange zrangebyscore zrevrangebyscore set setex psetex get del exists "
    "expire pexpire publish multi exec discard watch unwatch eval evalsha script|load "
    "script|exists"
).split()


def node_user(node_id: Any) -> str:
    """The Redis ACL user of a node."""
    return f"node-{node_id}"


def task_id_prefix(node_id: Any) -> str:
    """What every task id sent to this node starts with (its result keys and channels)."""
    return f"node{node_id}-"


def node_acl_rules(node_id: Any, password: str) -> list[str]:
    """The ``ACL SETUSER`` rules of a node's user (see the module docstring)."""
    queue = f"node.{node_id}"
    results = f"celery-task-meta-{task_id_prefix(node_id)}*"
    return [
        "reset",
        "on",
        f">{password}",
        f"~{queue}",
        f"~{queue}{PRIORITY_SEP}*",
        f"~_kombu.binding.{queue}",
        f"~_kombu.binding_permanent.{queue}",
        f"~unacked.{queue}*",
        f"~{results}",
        f"&{results}",
        "-@all",
        *(f"+{command}" for command in NODE_COMMANDS),
    ]


def _admin() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def _acl(*args: Any) -> Any:
    try:
        return _admin().execute_command("ACL", *args)
    except redis.RedisError as exc:
        # The message names the command, never its arguments (the password).
        raise BrokerUnavailable(
            f"cannot manage the node's broker user: {type(exc).__name__}"
        ) from None


def node_broker_url(node_id: Any, password: str) -> str:
    """The broker URL handed to a node: the host agents reach Redis by
    (``BERTH_AGENT_BROKER_URL``, else ``REDIS_URL``) with the node's own user."""
    base = urlsplit(getattr(settings, "BERTH_AGENT_BROKER_URL", "") or settings.REDIS_URL)
    host = base.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(node_user(node_id), safe='')}:{quote(password, safe='')}@{host}"
    if base.port:
        netloc += f":{base.port}"
    return urlunsplit((base.scheme, netloc, base.path, base.query, ""))


def provision_node(node_id: Any) -> str:
    """Create (or rotate) the node's ACL user; returns its broker URL (with the password).

    Connections authenticated with the previous password are closed (``ACL DELUSER``
    disconnects them), so a rotated credential stops working at once."""
    password = secrets.token_urlsafe(32)
    _acl("DELUSER", node_user(node_id))
    _acl("SETUSER", node_user(node_id), *node_acl_rules(node_id, password))
    log.info("broker user %s provisioned", node_user(node_id))
    return node_broker_url(node_id, password)


def revoke_node(node_id: Any) -> None:
    """Remove the node's ACL user and close its connections."""
    _acl("DELUSER", node_user(node_id))
    log.info("broker user %s removed", node_user(node_id))


def stale_users(node_ids: Iterable[Any]) -> list[str]:
    """Node users in Redis whose node is not in ``node_ids`` (removed nodes)."""
    live = {node_user(n) for n in node_ids}
    users = [u.decode() if isinstance(u, bytes) else str(u) for u in _acl("USERS")]
    return sorted(u for u in users if u.startswith("node-") and u not in live)
