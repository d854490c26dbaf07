"""Keep task results and arguments out of Celery's log lines.

Celery's worker logs every successful task as ``Task name[id] succeeded in 0.1s: <result>``.
Berth's task results carry tenants' data — exec output (a secret read with ``env``), log
lines, health-check output — and log files outlive the data's own access rules, so the
result (and, for any line that has them, the arguments) is dropped before formatting. Both
the agent's worker and the control plane's workers install this filter. Plain Python: the
agent imports it without Django.
"""

from __future__ import annotations

import logging

TRACE_LOGGER = "celery.app.trace"
_SECRET_FIELDS = ("return_value", "args", "kwargs")


class DropTaskData(logging.Filter):
    """Rewrites Celery trace records so they name the task, its id and timing only."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = record.args
        if isinstance(context, dict) and "return_value" in context:
            record.msg = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
        if isinstance(context, dict):
            record.args = {k: v for k, v in context.items() if k not in _SECRET_FIELDS}
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            record.data = {k: v for k, v in data.items() if k not in _SECRET_FIELDS}
        return True


def install() -> None:
    """Add :class:`DropTaskData` to Celery's trace logger once (idempotent)."""
    logger = logging.getLogger(TRACE_LOGGER)
    if not any(isinstance(f, DropTaskData) for f in logger.filters):
        logger.addFilter(DropTaskData())
