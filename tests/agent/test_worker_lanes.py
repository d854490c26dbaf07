"""The node worker keeps tenants from holding each other up (issue #17 item 5), on a real
agent: real runc containers, a real build, reports and build logs sent to a real Redis, the
build context served over real HTTP. Tasks are called through the worker's Celery task
objects, as a delivery would run them.

- A tenant's long ``RUN sleep`` build does not delay another tenant's container start.
- A tenant over its exec cap is refused with ``resource_exhausted`` at once, while another
  tenant's exec runs.
- A container whose apply is under way is reported ``starting``.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

from runtime_agent import protocol
from runtime_agent.agent import Agent
from runtime_agent.images.bootstrap import bootstrap_busybox
from runtime_agent.lanes import TenantSlots
from runtime_agent.node import NodeIdentity
from runtime_agent.worker import NodeWorker
from tests.agent.test_runtime_fixtures import cleanup_agent, needs_runtime, until

pytestmark = [*needs_runtime, pytest.mark.timeout(300)]

BUILD_SECONDS = 15
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _context(dockerfile: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    return buffer.getvalue()


@pytest.fixture
def context_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A control plane's node endpoints: GET <path> answers the build context stored under
    it (``contexts["served"]`` lists the paths asked for, newline-separated); a POST (a
    build report) is answered 200."""
    contexts: dict[str, bytes] = {"served": b""}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            contexts["served"] += self.path.encode() + b"\n"
            body = contexts.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def do_POST(self) -> None:
            """Reports the node sends over HTTP (build logs and results): taken, not read."""
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", contexts
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def worker(agent: Agent, context_server: tuple[str, dict[str, bytes]]) -> Iterator[NodeWorker]:
    bootstrap_busybox(agent)
    identity = NodeIdentity(
        node_id="00000000-0000-0000-0000-0000000000f1",
        credential="test-credential",
        broker_url=REDIS_URL,
        control_url=context_server[0],
        queue=f"node.{agent.config.name}",
    )
    node = NodeWorker(
        agent,
        identity,
        interactive=TenantSlots("interactive", total=4, per_tenant=2),
    )
    try:
        yield node
    finally:
        for build_id in list(node._builds):
            node.cancel_build(build_id=build_id)
        until(lambda: not node.oplog.in_flight("build"), timeout=BUILD_SECONDS + 60)
        cleanup_agent(agent)
        # What the build sent to the control plane's queue, which nobody consumes here.
        redis.Redis.from_url(REDIS_URL).delete(protocol.CONTROL_QUEUE)


def _task(worker: NodeWorker, task_name: str, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = worker.app.tasks[task_name](**kwargs)
    return result


def _spec(tenant: str, name: str, uid: str) -> dict[str, Any]:
    spec = protocol.ContainerSpec(
        tenant=tenant,
        image="busybox",
        name=name,
        command=("sleep", "1000"),
        network_mode="none",
        labels={protocol.CONTAINER_UID_LABEL: uid},
    )
    return protocol.to_dict(spec)


def _build_step_running(agent: Agent) -> bool:
    listed = subprocess.run(
        [agent.config.runc, "--root", str(agent.config.runc_root), "list", "-q"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return any(name.startswith(f"{agent.config.name}-build-") for name in listed)


def test_a_long_build_of_one_tenant_does_not_delay_another_tenants_start(
    worker: NodeWorker, agent: Agent, context_server: tuple[str, dict[str, bytes]]
) -> None:
    _, contexts = context_server
    contexts["/ctx/b1"] = _context(f"FROM busybox\nRUN sleep {BUILD_SECONDS}\n".encode())
    request = protocol.BuildRequest(
        build_id="b1", tenant="alpha", context_url="/ctx/b1", tag="slow:1", timeout_seconds=120
    )
    accepted: dict[str, Any] = {}
    delivery = threading.Thread(
        target=lambda: accepted.update(
            _task(worker, protocol.AGENT_BUILD, op_id="build:b1", request=protocol.to_dict(request))
        ),
        daemon=True,
    )
    delivery.start()
    until(lambda: _build_step_running(agent), timeout=60)
    build_started = time.monotonic()

    result = _task(
        worker,
        protocol.AGENT_APPLY_CONTAINER,
        op_id="c1:apply:1:0",
        spec=_spec("beta", "web", "c1"),
    )
    start_took = time.monotonic() - build_started

    assert result["state"] == "running", result
    assert worker.oplog.in_flight("build") == ["build:b1"], "the build ended before the start"
    assert start_took < BUILD_SECONDS - 3, f"beta's start took {start_took:.1f}s"
    # The build was accepted, not run on the delivering thread.
    delivery.join(5)
    assert accepted == {"state": "accepted"}
    # A redelivery of the build while it runs starts nothing new.
    again = _task(worker, protocol.AGENT_BUILD, op_id="build:b1", request=protocol.to_dict(request))
    assert again == {"state": "accepted", "replayed": True}
    until(lambda: not worker.oplog.in_flight("build"), timeout=BUILD_SECONDS + 60)
    assert worker.oplog.get("build:b1")["state"] == "succeeded"  # type: ignore[index]


def test_a_tenant_over_its_exec_cap_is_refused_while_another_tenants_exec_runs(
    worker: NodeWorker,
) -> None:
    for tenant, uid in (("alpha", "c-a"), ("beta", "c-b")):
        applied = _task(
            worker,
            protocol.AGENT_APPLY_CONTAINER,
            op_id=f"{uid}:apply",
            spec=_spec(tenant, "app", uid),
        )
        assert applied["state"] == "running", applied

    long_execs: list[dict[str, Any]] = []

    def long_exec() -> None:
        long_execs.append(
            _task(
                worker,
                protocol.AGENT_EXEC,
                tenant="alpha",
                name="app",
                argv=["sleep", "60"],
                exec_timeout=8,
            )
        )

    threads = [threading.Thread(target=long_exec, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    until(lambda: worker.interactive.running("alpha") == 2, timeout=10)

    began = time.monotonic()
    refused = _task(
        worker, protocol.AGENT_EXEC, tenant="alpha", name="app", argv=["true"], exec_timeout=5
    )
    assert refused["error"]["code"] == "resource_exhausted", refused
    assert "tenant alpha" in refused["error"]["message"]
    logs = _task(worker, protocol.AGENT_LOGS, tenant="alpha", name="app")
    assert logs["error"]["code"] == "resource_exhausted"

    other = _task(
        worker, protocol.AGENT_EXEC, tenant="beta", name="app", argv=["echo", "hi"], exec_timeout=5
    )
    assert other == {"exit_code": 0, "output": "hi\n"}
    assert time.monotonic() - began < 5
    assert worker.interactive.running("alpha") == 2  # alpha's execs were still running

    for thread in threads:
        thread.join(20)
    assert [r["exit_code"] for r in long_execs] == [124, 124]
    again = _task(worker, protocol.AGENT_EXEC, tenant="alpha", name="app", argv=["true"])
    assert again["exit_code"] == 0


def test_a_container_whose_apply_is_under_way_is_reported_starting(
    worker: NodeWorker, agent: Agent
) -> None:
    """The apply waits (inside its operation) until the report shows it as starting."""
    seen: dict[str, str] = {}
    real_create = agent.containers.create

    def create_and_look(spec: protocol.ContainerSpec) -> Any:
        seen.update({c.uid: c.state for c in worker.build_report().containers})
        return real_create(spec)

    agent.containers.create = create_and_look  # type: ignore[method-assign]
    try:
        result = _task(
            worker,
            protocol.AGENT_APPLY_CONTAINER,
            op_id="c9:apply:1:0",
            spec=_spec("gamma", "svc", "c9"),
        )
    finally:
        del agent.containers.create
    assert result["state"] == "running"
    assert seen == {"c9": "starting"}
    after = {c.uid: c.state for c in worker.build_report().containers}
    assert after == {"c9": "running"}


def test_a_build_cancelled_while_queued_behind_its_tenants_build_never_runs(
    worker: NodeWorker, context_server: tuple[str, dict[str, bytes]]
) -> None:
    _, contexts = context_server
    for build_id, seconds in (("q1", 6), ("q2", 0)):
        contexts[f"/ctx/{build_id}"] = _context(f"FROM busybox\nRUN sleep {seconds}\n".encode())
        request = protocol.BuildRequest(
            build_id=build_id, tenant="alpha", context_url=f"/ctx/{build_id}", tag=build_id
        )
        accepted = _task(
            worker,
            protocol.AGENT_BUILD,
            op_id=f"build:{build_id}",
            request=protocol.to_dict(request),
        )
        assert accepted == {"state": "accepted"}
    until(lambda: worker.builds.running("alpha") == 1, timeout=10)
    assert worker.builds.queued("alpha") == 1  # q2 waits behind alpha's own build

    assert _task(worker, protocol.AGENT_CANCEL_BUILD, build_id="q2") == {"cancelled": True}
    until(lambda: worker.oplog.get("build:q2"), timeout=60)
    result = worker.oplog.get("build:q2")
    assert result is not None and result["state"] == "cancelled", result
    assert worker.oplog.get("build:q1")["state"] == "succeeded"  # type: ignore[index]
    assert contexts["served"].split() == [b"/ctx/q1"]  # q2's context was never fetched


def test_a_remove_waits_for_the_apply_of_the_same_container(
    worker: NodeWorker, agent: Agent
) -> None:
    """Operations no longer wait for each other node-wide; on one container they still go
    in order, or a remove that overtook a slow apply would leave the container running."""
    creating, release = threading.Event(), threading.Event()
    real_create = agent.containers.create

    def slow_create(spec: protocol.ContainerSpec) -> Any:
        if spec.name == "web":
            creating.set()
            assert release.wait(30)
        return real_create(spec)

    agent.containers.create = slow_create  # type: ignore[method-assign]
    results: dict[str, Any] = {}
    try:
        apply = threading.Thread(
            target=lambda: results.update(
                apply=_task(
                    worker,
                    protocol.AGENT_APPLY_CONTAINER,
                    op_id="c5:apply:1:0",
                    spec=_spec("delta", "web", "c5"),
                )
            ),
            daemon=True,
        )
        apply.start()
        assert creating.wait(30)
        remove = threading.Thread(
            target=lambda: results.update(
                remove=_task(
                    worker,
                    protocol.AGENT_REMOVE_CONTAINER,
                    op_id="c5:remove:1:0",
                    tenant="delta",
                    name="web",
                )
            ),
            daemon=True,
        )
        remove.start()
        # Another container of the same tenant starts meanwhile.
        other = _task(
            worker,
            protocol.AGENT_APPLY_CONTAINER,
            op_id="c6:apply",
            spec=_spec("delta", "api", "c6"),
        )
        assert other["state"] == "running", other
        remove.join(0.5)
        assert remove.is_alive(), "the remove overtook the apply of its container"
        release.set()
        apply.join(30)
        remove.join(30)
    finally:
        release.set()
        del agent.containers.create
    assert results["apply"]["state"] == "running"
    assert results["remove"] == {"state": "missing"}
    assert [c.name for c in agent.containers.list("delta", all=True)] == ["api"]
