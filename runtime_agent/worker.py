"""The agent as a Celery worker on its node's queue (``node.<id>``).

Each task is one operation of the control plane (``runtime_agent.protocol.AGENT_*``).
Operations that change state carry an ``op_id`` and run at most once per id
(:class:`runtime_agent.oplog.OperationLog`); late acks with prefetch 1 mean a task whose
worker died is delivered again, and replaying it is harmless. Every task returns a dict;
typed agent errors come back as ``{"error": {"code", "message"}}`` instead of exceptions,
so the control plane can show them.

Tenants share the node without holding each other up (:mod:`runtime_agent.lanes`):
operations run under a lock per operation id only; builds are accepted on a Celery thread
and run on the build pool (own threads, a FIFO queue per tenant served round-robin, a cap
per tenant); exec, logs and stats hold an interactive slot (capped per tenant and per
node, refused with ``resource_exhausted`` over a cap). The Celery pool has the lifecycle
threads plus one per interactive slot, so starts and stops always find a thread.

A reporter thread sends a full :class:`~runtime_agent.protocol.NodeReport` every
``report_interval`` seconds (the heartbeat), and right after each state change. A
container whose apply is running here is reported ``starting``: acknowledged and under
way (pulling its image, creating, starting), neither running yet nor lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import wraps
from typing import Any

from celery import Celery

from runtime_agent import control_api, protocol, tasklog
from runtime_agent.agent import Agent
from runtime_agent.distribution.ensure import ensure_image
from runtime_agent.distribution.tenant_auth import fetch_pull_token
from runtime_agent.errors import AgentError, AlreadyExists, InvalidArgument, NotFound
from runtime_agent.lanes import FairPool, KeyedLock, TenantSlots
from runtime_agent.names import node_namespace_refusal
from runtime_agent.node import NodeIdentity, capacity
from runtime_agent.oplog import OperationLog
from runtime_agent.runtime.security import tenant_container_spec

log = logging.getLogger("berth.agent.worker")

#: Output an exec returns at most; the rest is cut (an exec is for checks, not transfers).
EXEC_OUTPUT_LIMIT = 64 * 1024
#: Builds running at once on a node, and of one tenant (more wait in the tenant's queue).
BUILD_WORKERS = 2
BUILDS_PER_TENANT = 1
#: Exec, logs and stats running at once on a node, and of one tenant (more are refused).
#: Each slot is a Celery thread of its own, so the node total is generous: it takes
#: several tenants at their cap to fill it.
INTERACTIVE_SLOTS = 16
INTERACTIVE_PER_TENANT = 3
#: Failed applies remembered for reports at most (each is dropped once applied again or
#: removed; the oldest go first past this).
MAX_FAILED_REPORTS = 1000


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _error(exc: AgentError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": str(exc)}}


class NodeWorker:
    """Binds the agent's Python API to Celery tasks and reports back to the control plane."""

    def __init__(
        self,
        agent: Agent,
        identity: NodeIdentity,
        *,
        report_interval: float = 5.0,
        builds: FairPool | None = None,
        interactive: TenantSlots | None = None,
    ):
        self.agent = agent
        self.identity = identity
        self.report_interval = report_interval
        self.oplog = OperationLog(agent.config.root / "ops.sqlite")
        self.builds = builds or FairPool(
            "build", workers=BUILD_WORKERS, per_tenant=BUILDS_PER_TENANT
        )
        self.interactive = interactive or TenantSlots(
            "interactive", total=INTERACTIVE_SLOTS, per_tenant=INTERACTIVE_PER_TENANT
        )
        # Applies running here (op id -> what the report says about their container).
        self._starts: dict[str, protocol.ContainerReport] = {}
        # Apply, stop and remove of one container (tenant, name) run one after another.
        self._container_ops = KeyedLock()
        self._starts_lock = threading.Lock()
        # Applies that failed here (uid -> a "stopped" report carrying the error), kept
        # until the container is applied again or removed: reports give the control plane
        # the reason (a host port taken, an image refused) instead of a container that
        # silently "disappeared". Guarded by _starts_lock.
        self._failed: dict[str, protocol.ContainerReport] = {}
        self.app = self._make_app()
        self._report_now = threading.Event()
        self._stop = threading.Event()
        # Builds running here (id -> cancel flag) and builds cancelled before they began.
        self._builds: dict[str, threading.Event] = {}
        self._cancelled_builds: set[str] = set()
        self._builds_lock = threading.Lock()

    # ------------------------------------------------------------------ celery wiring

    def _make_app(self) -> Celery:
        """The worker's Celery app, within what the node's broker user may do
        (``workloads.services.broker``): its own queue and unacked keys, its own results;
        no remote control (pidbox), events, gossip, mingle or heartbeat, which need keys
        and channels shared by every node. Task results are never logged."""
        queue = self.identity.queue
        app = Celery(
            "berth-agent", broker=self.identity.broker_url, backend=self.identity.broker_url
        )
        tasklog.install()
        app.conf.update(
            broker_transport_options=protocol.node_transport_options(queue),
            worker_enable_remote_control=False,
            worker_send_task_events=False,
            task_send_sent_event=False,
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            task_default_queue=queue,
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
            (protocol.AGENT_REMOVE_VOLUME, self.remove_volume),
            (protocol.AGENT_REMOVE_NETWORK, self.remove_network),
            (protocol.AGENT_BUILD, self.build_image),
            (protocol.AGENT_CANCEL_BUILD, self.cancel_build),
        ):
            # Not shared: Celery would hand a shared task to every app made later in this
            # process, so a second worker's names would reach the first worker's methods.
            app.task(name=name, shared=False)(self._guarded(func))
        return app

    def _guarded(self, func: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @wraps(func)
        def task(**kwargs: Any) -> dict[str, Any]:
            try:
                if refusal := node_namespace_refusal(kwargs):
                    raise InvalidArgument(refusal)
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
        container_spec = tenant_container_spec(
            self.agent.config, protocol.from_dict(protocol.ContainerSpec, spec)
        )

        def run() -> dict[str, Any]:
            key = (container_spec.tenant, container_spec.name)
            with self._starting(op_id, container_spec), self._container_ops.hold(key):
                return start()

        def start() -> dict[str, Any]:
            containers = self.agent.containers
            tenant, name = container_spec.tenant, container_spec.name
            assert name is not None
            existing = next((c for c in containers.list(tenant, all=True) if c.name == name), None)
            if existing is not None and existing.state in ("running", "paused"):
                return {"state": existing.state, "id": existing.id}
            if existing is not None:
                # A stopped container is recreated from the (possibly newer) spec: the
                # control plane's restart is a fresh start, as in docker's restart policy.
                containers.remove(tenant, name, force=True)
            self._ensure_networks(container_spec)
            self._ensure_volumes(container_spec)
            # The image from the tenant's namespace on the node, or pulled into it with a
            # token the control plane mints for this tenant (never the node's login).
            image = container_spec.image
            ensure_image(
                self.agent,
                tenant,
                image,
                tenant_auth=lambda: fetch_pull_token(self.identity, tenant, image),
            )
            created = containers.create(self._with_secrets(container_spec))
            started = containers.start(tenant, created.id)
            return {"state": started.state, "id": started.id}

        return self._once(op_id, "apply", run)

    def _with_secrets(self, spec: protocol.ContainerSpec) -> protocol.ContainerSpec:
        """The spec with its service secrets in ``env``, fetched from the control plane
        over HTTP right before the container is created (they never travel through the
        broker; ``protocol.CONTAINER_SECRETS_PATH``)."""
        if not spec.secrets_from:
            return spec
        found = control_api.fetch_container_secrets(self.identity, spec.secrets_from)
        return dataclasses.replace(spec, env={**spec.env, **found}, secrets_from=None)

    @contextlib.contextmanager
    def _starting(self, op_id: str, spec: protocol.ContainerSpec) -> Iterator[None]:
        """While the body runs, reports say the spec's container is ``starting``.

        No report is sent just for that: the periodic one (every ``report_interval``, well
        inside the control plane's start grace) carries it, and an extra report per start
        would cost the start-to-visible latency (benchmarks/bench_dispatch.py)."""
        uid = spec.labels.get(protocol.CONTAINER_UID_LABEL)
        if not uid or spec.name is None:
            yield
            return
        with self._starts_lock:
            self._failed.pop(uid, None)
            self._starts[op_id] = protocol.ContainerReport(
                uid=uid, tenant=spec.tenant, name=spec.name, state="starting"
            )
        try:
            yield
        except Exception as exc:  # a typed AgentError or an OSError of mkfs/mount: both shown
            failed = protocol.ContainerReport(
                uid=uid,
                tenant=spec.tenant,
                name=spec.name,
                state="stopped",
                finished_at=_now(),
                error=f"the node could not start it: {exc}",
            )
            with self._starts_lock:
                self._failed[uid] = failed
                while len(self._failed) > MAX_FAILED_REPORTS:  # the oldest go first
                    self._failed.pop(next(iter(self._failed)))
            raise
        finally:
            with self._starts_lock:
                self._starts.pop(op_id, None)

    def _ensure_networks(self, spec: protocol.ContainerSpec) -> None:
        """Tenant networks are created on a node the first time a container there needs them."""
        if spec.network_mode != "bridge":
            return
        networks = self.agent.networks
        networks.ensure_default(spec.tenant)
        for attachment in spec.networks:
            try:
                networks.inspect(spec.tenant, attachment.network)
            except NotFound:
                # Another operation may be creating it right now: that's as good.
                with contextlib.suppress(AlreadyExists):
                    networks.create(spec.tenant, attachment.network)

    def _ensure_volumes(self, spec: protocol.ContainerSpec) -> None:
        """Sized volumes are created with their size before a container first mounts them
        (unsized ones are created by the runtime on first mount, like ``docker run -v``)."""
        volumes = self.agent.volumes
        for mount in spec.mounts:
            if mount.kind != "volume" or mount.size_bytes is None:
                continue
            try:
                volumes.get(spec.tenant, mount.source)
            except NotFound:
                volumes.create(spec.tenant, mount.source, size_bytes=mount.size_bytes)

    def remove_volume(self, *, op_id: str, tenant: str, name: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            try:
                self.agent.volumes.remove(tenant, name)
            except NotFound:
                pass
            return {"state": "missing"}

        return self._once(op_id, "remove_volume", run)

    def remove_network(self, *, op_id: str, tenant: str, name: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            try:
                self.agent.networks.remove(tenant, name)
            except NotFound:
                pass
            return {"state": "missing"}

        return self._once(op_id, "remove_network", run)

    def build_image(self, *, op_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """Accept a build: queue it on the build pool, in the tenant's own queue, and return.

        The build then fetches its context from the control plane, builds into the
        tenant's image store (tagged) and streams its log and result back (the control
        plane waits for those, not for this task), once per ``op_id``. Accepting instead of
        building on the Celery thread is what keeps a long ``RUN`` off the threads that
        start other tenants' containers. A redelivery of an accepted or finished build
        changes nothing.
        """
        from runtime_agent.build_job import run_build

        req = protocol.from_dict(protocol.BuildRequest, request)
        recorded = self.oplog.get(op_id)
        if recorded is not None:
            return {**recorded, "replayed": True}
        cancel = threading.Event()
        with self._builds_lock:
            if req.build_id in self._builds:
                return {"state": "accepted", "replayed": True}
            if req.build_id in self._cancelled_builds:
                cancel.set()
            self._builds[req.build_id] = cancel

        def job() -> None:
            try:
                self._once(op_id, "build", lambda: run_build(self, req, cancel))
            finally:
                with self._builds_lock:
                    self._builds.pop(req.build_id, None)

        self.builds.submit(req.tenant, job)
        return {"state": "accepted"}

    def cancel_build(self, *, build_id: str) -> dict[str, Any]:
        with self._builds_lock:
            flag = self._builds.get(build_id)
            if flag is None:
                self._cancelled_builds.add(build_id)
            else:
                flag.set()
        return {"cancelled": flag is not None}

    def stop_container(
        self, *, op_id: str, tenant: str, name: str, timeout: int = 10
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            try:
                with self._container_ops.hold((tenant, name)):
                    self.agent.containers.stop(tenant, name, timeout=timeout)
            except NotFound:
                return {"state": "missing"}
            return {"state": "stopped"}

        return self._once(op_id, "stop", run)

    def remove_container(self, *, op_id: str, tenant: str, name: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            with self._starts_lock:
                for uid, failed in list(self._failed.items()):
                    if (failed.tenant, failed.name) == (tenant, name):
                        del self._failed[uid]
            try:
                with self._container_ops.hold((tenant, name)):
                    self.agent.containers.remove(tenant, name, force=True)
            except NotFound:
                pass
            return {"state": "missing"}

        return self._once(op_id, "remove", run)

    def exec_container(
        self, *, tenant: str, name: str, argv: list[str], exec_timeout: float = 30
    ) -> dict[str, Any]:
        with self.interactive.admit(tenant):
            code, output = self.agent.containers.exec_capture(
                tenant, name, list(argv), timeout=exec_timeout, limit=EXEC_OUTPUT_LIMIT
            )
        return {"exit_code": code, "output": output.decode(errors="replace")}

    def container_logs(
        self, *, tenant: str, name: str, tail: int = 100, since: str | None = None
    ) -> dict[str, Any]:
        with self.interactive.admit(tenant):
            lines = [
                {
                    "time": entry.time,
                    "stream": entry.stream,
                    "line": entry.line.decode(errors="replace") + ("" if entry.partial else "\n"),
                }
                for entry in self.agent.containers.logs(tenant, name, tail=tail, since=since)
            ]
        return {"lines": lines}

    def container_stats(self, *, tenant: str, name: str) -> dict[str, Any]:
        with self.interactive.admit(tenant):
            return dataclasses.asdict(self.agent.containers.stats(tenant, name))

    def request_report(self) -> dict[str, Any]:
        self._report_now.set()
        return {"ok": True}

    # ------------------------------------------------------------------ reports

    def build_report(self) -> protocol.NodeReport:
        with self._starts_lock:
            starting = {s.uid: s for s in self._starts.values()}
            failed = dict(self._failed)
        items = []
        containers = self.agent.containers
        for info in containers.list_all():
            uid = info.labels.get(protocol.CONTAINER_UID_LABEL)
            if not uid:
                continue
            if uid in starting and info.state not in ("running", "paused"):
                continue  # its apply is still under way: reported as starting below
            cpu_seconds = memory_bytes = None
            if info.state in ("running", "paused"):
                try:
                    stats = containers.stats(info.tenant, info.id)
                    cpu_seconds, memory_bytes = stats.cpu_seconds, stats.memory_bytes
                except AgentError:
                    pass  # it stopped meanwhile; the next report has its exit
            items.append(
                protocol.ContainerReport(
                    uid=uid,
                    tenant=info.tenant,
                    name=info.name,
                    state=info.state,
                    exit_code=info.exit_code if info.state == "stopped" else None,
                    oom_killed=info.oom_killed,
                    started_at=info.started_at,
                    finished_at=info.finished_at if info.state == "stopped" else None,
                    cpu_seconds=cpu_seconds,
                    memory_bytes=memory_bytes,
                )
            )
            starting.pop(uid, None)
            failed.pop(uid, None)
        items.extend(starting.values())
        items.extend(f for uid, f in failed.items() if uid not in starting)
        return protocol.NodeReport(
            node_id=self.identity.node_id,
            credential=self.identity.credential,
            sent_at=_now(),
            full=True,
            capacity=capacity(self.agent.config),
            containers=tuple(items),
        )

    def send_report(self) -> None:
        """POST the full report to the control plane (``protocol.NODE_REPORT_PATH``),
        signed with the node credential: the broker carries nothing from a node to the
        control plane."""
        control_api.send_node_report(self.identity, self.build_report())

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
        """Recover containers, start the reporter, and consume the node's queue.

        ``concurrency`` is the number of threads for lifecycle operations; the pool gets
        one more per interactive slot, which admission keeps from ever taking those.
        """
        from runtime_agent.cgroups import tune_host

        refused = tune_host(self.agent.config)
        if refused:
            log.warning("cgroup favordynmods not set (container starts ~10 ms slower): %s", refused)
        # Whatever a crash left half-done: containers re-attached to their monitors, build
        # steps' mounts and runc state removed.
        self.agent.containers.recover()
        self.agent.networks.recover(r.id for r in self.agent.containers.all_records())
        self.agent.builder.recover()
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
                    str(concurrency + self.interactive.total),
                    "--loglevel",
                    "INFO",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--hostname",
                    f"{self.identity.queue}@%h",
                ]
            )
        finally:
            self._stop.set()
