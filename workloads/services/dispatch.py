"""Sending operations to node agents over Celery, one queue per node (``node.<id>``).

Writes never talk to a node inside their transaction: they call :func:`send_after_commit`,
which enqueues once the transaction has committed, so a rolled-back write sends nothing
and a node never acts on state that was not saved. Each operation carries an ``op_id``;
the agent runs an operation id at most once, so redelivery is harmless.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from django.db import transaction

from config.celery import app
from tenants.errors import BerthError
from workloads.models import Node
from workloads.services.broker import task_id_prefix

log = logging.getLogger(__name__)


class NodeUnavailable(BerthError):
    """The node did not answer in time (it may be down or overloaded)."""

    status_code = 503
    code = "node_unavailable"


class NodeOperationFailed(BerthError):
    """The node answered with an error."""

    status_code = 409
    code = "node_operation_failed"


def _send(node_id: Any, queue: str, task: str, kwargs: dict[str, Any]) -> Any:
    """The one place tasks leave for a node: on its queue, with a task id under the node's
    prefix, so its result key and channel are ones the node's broker user may write
    (:mod:`workloads.services.broker`) and no other node's may read."""
    task_id = f"{task_id_prefix(node_id)}{uuid.uuid4()}"
    return app.send_task(task, kwargs=kwargs, queue=queue, task_id=task_id)


def send(node: Node, task: str, **kwargs: Any) -> Any:
    return _send(node.pk, node.queue, task, kwargs)


def send_after_commit(node: Node, task: str, **kwargs: Any) -> None:
    """Enqueue ``task`` for ``node`` once the current transaction commits."""
    node_id, queue = node.pk, node.queue
    transaction.on_commit(lambda: _send(node_id, queue, task, kwargs))


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
