"""Sending operations to node agents over Celery, one queue per node (``node.<id>``).

Writes never talk to a node inside their transaction: they call :func:`send_after_commit`,
which enqueues once the transaction has committed, so a rolled-back write sends nothing
and a node never acts on state that was not saved. Each operation carries an ``op_id``;
the agent runs an operation id at most once, so redelivery is harmless.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from django.db import transaction

from config.celery import app
from tenants.errors import BerthError
from workloads.models import Node

log = logging.getLogger(__name__)


class NodeUnavailable(BerthError):
    """The node did not answer in time (it may be down or overloaded)."""

    status_code = 503
    code = "node_unavailable"


class NodeOperationFailed(BerthError):
    """The node answered with an error."""

    status_code = 409
    code = "node_operation_failed"


def send(node: Node, task: str, **kwargs: Any) -> Any:
    return app.send_task(task, kwargs=kwargs, queue=node.queue)


def send_after_commit(node: Node, task: str, **kwargs: Any) -> None:
    """Enqueue ``task`` for ``node`` once the current transaction commits."""
    queue = node.queue
    transaction.on_commit(lambda: app.send_task(task, kwargs=kwargs, queue=queue))


def call(node: Node, task: str, *, timeout: float = 15, **kwargs: Any) -> dict[str, Any]:
    """Run ``task`` on ``node`` and wait for its result (logs, exec, stats)."""
    result = send(node, task, **kwargs)
    try:
        # Tasks of the control plane may wait on a node: the node's task runs on the node's
        # own worker, never on this one, so waiting cannot deadlock.
        value = result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
    except CeleryTimeout:
        result.revoke()
        raise NodeUnavailable(
            f"node {node.name} did not answer within {timeout:g}s", details={"node": node.name}
        ) from None
    finally:
        result.forget()
    if isinstance(value, Exception):
        raise NodeOperationFailed(f"node {node.name}: {value}", details={"node": node.name})
    if isinstance(value, dict) and value.get("error"):
        error = value["error"]
        raise NodeOperationFailed(
            error.get("message", "operation failed"), details={"code": error.get("code")}
        )
    return value if isinstance(value, dict) else {"result": value}
