"""The agent as a Celery worker on its node's queue (``node.<id>``).

Each task is one operation of the control plane (``runtime_agent.protocol.AGENT_*``).
Operations that change state carry an ``op_id`` and run at most once per id
(:class:`runtime_agent.oplog.OperationLog`); late acks with prefetch 1 mean a task whose
worker died is delivered again, and replaying it is harmless. Every task returns a dict;
typed agent errors come back as ``{"error": {"code", "message"}}`` instead of exceptions,
so the control plane can show them.

A reporter thread sends a full :class:`~runtime_agent.protocol.NodeReport` every
``report_interval`` seconds (the heartbeat), and right after each state change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any

from celery import Celery

from runtime_agent import protocol
from runtime_agent.agent import Agent
from runtime_agent.errors import AgentError, NotFound
from runtime_agent.node import NodeIdentity, capacity
from runtime_agent.oplog import OperationLog

log = logging.getLogger("berth.agent.worker")

#: Output an exec returns at most; the rest is cut (an exec is for checks, not transfers).
EXEC_OUTPUT_LIMIT = 64 * 1024


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _error(exc: AgentError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": str(exc)}}


class NodeWorker:
    """Binds the agent's Python API to Celery tasks and reports back to the control plane."""

    def __init__(self, agent: Agent, identity: NodeIdentity, *, report_interval: float = 5.0):
        self.agent = agent
        self.identity = identity
        self.report_interval = report_interval
        self.oplog = OperationLog(agent.config.root / "ops.sqlite")
        self.app = self._make_app()
        self._report_now = threading.Event()
        self._stop = threading.Event()

    # ------------------------------------------------------------------ celery wiring

    def _make_app(self) -> Celery:
        app = Celery(
            "berth-agent", broker=self.identity.broker_url, backend=self.identity.broker_url
        )
        app.conf.update(
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            task_default_queue=self.identity.queue,
            result_expires=600,
            broker_connection_retry_on_startup=True,
            worker_hijack_root_logger=False,
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
        )
        for name, func in (
            (protocol.AGENT_APPLY_CONTAINER, self.apply_container),
            (protocol.AGENT_STOP_CONTAINER, self.stop_container),
            (protocol.AGENT_REMOVE_CONTAINER, self.remove_container),
            (protocol.AGENT_EXEC, self.exec_container),
            (protocol.AGENT_LOGS, self.container_logs),
            (protocol.AGENT_STATS, self.container_stats),
            (protocol.AGENT_REPORT, self.request_report),
        ):
            app.task(name=name)(self._guarded(func))
        return app

    def _guarded(self, func: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @wraps(func)
        def task(**kwargs: Any) -> dict[str, Any]:
            try:
                return func(**kwargs)
            except AgentError as exc:
                log.warning("%s failed: %s", func.__name__, exc)
                return _error(exc)

        return task

    # ------------------------------------------------------------------ operations

    def _once(
        self, op_id: str, kind: str, operation: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        def guarded() -> dict[str, Any]:
            try:
                return operation()
            except AgentError as exc:
                return _error(exc)

        result = self.oplog.run_once(op_id, kind, guarded)
        self._report_now.set()
        return result

    def apply_container(self, *, op_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Make the container exist and run: create and start it, or start it again."""
        container_spec = protocol.from_dict(protocol.ContainerSpec, spec)

        def run() -> dict[str, Any]:
            containers = self.agent.containers
            assert container_spec.name is not None
            try:
                info = containers.inspect(container_spec.tenant, container_spec.name)
            except NotFound:
                info = None
            if info is not None and _state_of(info) == "running":
                return {"state": "running"}
            if info is not None:
                # A stopped container is recreated from the (possibly newer) spec: the
                # control plane's restart is a fresh start, as in docker's restart policy.
                containers.remove(container_spec.tenant, container_spec.name, force=True)
            created = containers.create(container_spec)
            containers.start(container_spec.tenant, container_spec.name)
            return {"state": "running", "id": _id_of(created)}

        return self._once(op_id, "apply", run)

    def stop_container(
        self, *, op_id: str, tenant: str, name: str, timeout: int = 10
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            try:
                self.agent.containers.stop(tenant, name, timeout=timeout)
            except NotFound:
                return {"state": "missing"}
            return {"state": "stopped"}

        return self._once(op_id, "stop", run)

    def remove_container(self, *, op_id: str, tenant: str, name: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            try:
                self.agent.containers.remove(tenant, name, force=True)
            except NotFound:
                pass
            return {"state": "missing"}

        return self._once(op_id, "remove", run)

    def exec_container(
        self, *, tenant: str, name: str, argv: list[str], exec_timeout: float = 30
    ) -> dict[str, Any]:
        code, output = self.agent.containers.exec_capture(
            tenant, name, list(argv), timeout=exec_timeout, limit=EXEC_OUTPUT_LIMIT
        )
        return {"exit_code": code, "output": output.decode(errors="replace")}

    def container_logs(
        self, *, tenant: str, name: str, tail: int = 100, since: str | None = None
    ) -> dict[str, Any]:
        lines = []
        for entry in self.agent.containers.logs(tenant, name, tail=tail, since=since):
            lines.append(_log_entry(entry))
        return {"lines": lines}

    def container_stats(self, *, tenant: str, name: str) -> dict[str, Any]:
        stats = self.agent.containers.stats(tenant, name)
        return stats if isinstance(stats, dict) else _as_dict(stats)

    def request_report(self) -> dict[str, Any]:
        self._report_now.set()
        return {"ok": True}

    # ------------------------------------------------------------------ reports

    def build_report(self) -> protocol.NodeReport:
        items = []
        for info in self.agent.containers.list_all():
            labels = _labels_of(info)
            uid = labels.get(protocol.CONTAINER_UID_LABEL)
            if not uid:
                continue
            items.append(_container_report(uid, info))
        return protocol.NodeReport(
            node_id=self.identity.node_id,
            credential=self.identity.credential,
            sent_at=_now(),
            full=True,
            capacity=capacity(self.agent.config),
            containers=tuple(items),
        )

    def send_report(self) -> None:
        report = self.build_report()
        self.app.send_task(
            protocol.CONTROL_NODE_REPORT,
            kwargs={"report": protocol.to_dict(report)},
            queue=protocol.CONTROL_QUEUE,
        )

    def _report_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_report()
            except Exception:
                log.exception("sending the node report failed; retrying")
            self._report_now.wait(self.report_interval)
            self._report_now.clear()
            time.sleep(0.2)  # coalesce bursts of state changes into one report

    def run(self, *, concurrency: int = 4) -> None:
        """Recover containers, start the reporter, and consume the node's queue."""
        recover = getattr(self.agent.containers, "recover", None)
        if recover is not None:
            recover()
        reporter = threading.Thread(target=self._report_loop, name="reporter", daemon=True)
        reporter.start()
        try:
            self.app.worker_main(
                [
                    "worker",
                    "--queues",
                    self.identity.queue,
                    "--pool",
                    "threads",
                    "--concurrency",
                    str(concurrency),
                    "--loglevel",
                    "INFO",
                    "--without-gossip",
                    "--without-mingle",
                    "--hostname",
                    f"{self.identity.queue}@%h",
                ]
            )
        finally:
            self._stop.set()


# --------------------------------------------------------------------------- adapters
# The container manager returns records; these read the fields the reports need from them
# whether they are dataclasses or dicts shaped like ``docker inspect``.


def _as_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    if isinstance(obj, dict):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(vars(obj))


def _state_of(info: Any) -> str:
    data = _as_dict(info)
    state = data.get("state") or data.get("State") or {}
    if isinstance(state, dict):
        return str(state.get("Status") or state.get("status") or "")
    return str(state)


def _id_of(info: Any) -> str:
    data = _as_dict(info)
    return str(data.get("id") or data.get("Id") or "")


def _labels_of(info: Any) -> dict[str, str]:
    data = _as_dict(info)
    if "labels" in data:
        return dict(data["labels"] or {})
    config = data.get("Config") or {}
    return dict(config.get("Labels") or {})


def _container_report(uid: str, info: Any) -> protocol.ContainerReport:
    data = _as_dict(info)
    state = _state_of(info)
    raw = data.get("State") if isinstance(data.get("State"), dict) else data
    assert isinstance(raw, dict)
    exit_code = raw.get("ExitCode", raw.get("exit_code"))
    return protocol.ContainerReport(
        uid=uid,
        tenant=str(data.get("tenant", "")),
        name=str(data.get("name") or data.get("Name", "")).lstrip("/"),
        state="running"
        if state in ("running", "paused")
        else ("created" if state == "created" else "stopped"),
        exit_code=None if state in ("running", "paused", "created") else exit_code,
        oom_killed=bool(raw.get("OOMKilled", raw.get("oom_killed", False))),
        started_at=raw.get("StartedAt", raw.get("started_at")) or None,
        finished_at=raw.get("FinishedAt", raw.get("finished_at")) or None,
    )


def _log_entry(entry: Any) -> dict[str, Any]:
    data = (
        _as_dict(entry)
        if not isinstance(entry, tuple)
        else {
            "time": entry[0],
            "stream": entry[1],
            "line": entry[2],
        }
    )
    line = data.get("line", data.get("message", ""))
    if isinstance(line, bytes):
        line = line.decode(errors="replace")
    time_value = data.get("time", data.get("timestamp", ""))
    return {"time": str(time_value), "stream": data.get("stream", "stdout"), "line": line}
