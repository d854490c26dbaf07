"""A control-plane build on this node (task ``AGENT_BUILD``, see worker.build_image).

The context is fetched over HTTP from the control plane with the node's credential (only
the node the build was placed on may fetch it), built with ``agent.builder`` into the
tenant's image store under the requested tag, and the log is streamed back as
:class:`~runtime_agent.protocol.BuildReport` messages to the control plane's queue: the
kept tail of the log with a growing sequence number (the control plane keeps the newest),
at most every ``LOG_INTERVAL`` seconds, and a last one carrying the result.

The image is not pushed to the registry: a node's registry credential may pull only
(docs/registry.md), so the image stays in this node's store and the control plane pins
services using it to this node.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from runtime_agent import protocol
from runtime_agent.build.steps import BuildLimits
from runtime_agent.errors import AgentError

if TYPE_CHECKING:
    from runtime_agent.worker import NodeWorker

logger = logging.getLogger("berth.agent.build")
LOG_INTERVAL = 0.5
FETCH_TIMEOUT = 60


class _Stop(Exception):
    """The build was cancelled or ran out of time."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


class BuildLog:
    """The kept tail of a build's log and its sender."""

    def __init__(self, worker: NodeWorker, req: protocol.BuildRequest) -> None:
        self.worker = worker
        self.req = req
        self.tail = ""
        self.size = 0
        self.seq = 0
        self.sent_at = 0.0
        self.dirty = False
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def write(self, text: str) -> None:
        if not text:
            return
        with self.lock:
            self.size += len(text)
            self.tail = (self.tail + text)[-self.req.log_keep_bytes :]
            self.dirty = True
            if time.monotonic() - self.sent_at >= LOG_INTERVAL:
                self._send()

    def flush_periodically(self) -> None:
        """Send what a quiet step wrote (a long RUN prints once, then works for minutes)."""
        while not self.stopped.wait(LOG_INTERVAL):
            with self.lock:
                if self.dirty and time.monotonic() - self.sent_at >= LOG_INTERVAL:
                    try:
                        self._send()
                    except Exception as exc:  # the next write or the result tries again
                        logger.warning(
                            "sending the log of build %s failed: %s", self.req.build_id, exc
                        )

    def send(self, **result: Any) -> None:
        with self.lock:
            self.stopped.set()
            self._send(**result)

    def _send(self, **result: Any) -> None:
        self.seq += 1
        report = protocol.BuildReport(
            build_id=self.req.build_id,
            node_id=self.worker.identity.node_id,
            credential=self.worker.identity.credential,
            seq=self.seq,
            log=self.tail,
            log_size=self.size,
            **result,
        )
        task = protocol.CONTROL_BUILD_RESULT if result.get("state") else protocol.CONTROL_BUILD_LOG
        self.worker.app.send_task(
            task, kwargs={"report": protocol.to_dict(report)}, queue=protocol.CONTROL_QUEUE
        )
        self.sent_at = time.monotonic()
        self.dirty = False


def fetch_context(worker: NodeWorker, req: protocol.BuildRequest, into: Any) -> int:
    url = urllib.parse.urljoin(worker.identity.control_url, req.context_url)
    if not url.startswith(("http://", "https://")):
        raise AgentError(f"the build context URL {url!r} is not http(s)")
    request = urllib.request.Request(  # noqa: S310 - checked just above
        url,
        headers={
            protocol.NODE_ID_HEADER: worker.identity.node_id,
            protocol.NODE_CREDENTIAL_HEADER: worker.identity.credential,
        },
    )
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:  # noqa: S310
        shutil.copyfileobj(response, into, 1024 * 1024)
    return int(into.tell())


def run_build(
    worker: NodeWorker, req: protocol.BuildRequest, cancel: threading.Event
) -> dict[str, Any]:
    """Run one build to its end; always reports the result to the control plane."""
    started = _now()
    log = BuildLog(worker, req)
    threading.Thread(target=log.flush_periodically, name="build-log", daemon=True).start()
    deadline = time.monotonic() + req.timeout_seconds
    digest = reference = error = None
    state = "failed"
    spool = worker.agent.config.root / "build-contexts"
    spool.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=spool) as context:
            try:
                size = fetch_context(worker, req, context)
            except (OSError, urllib.error.URLError) as exc:
                raise AgentError(f"could not fetch the build context: {exc}") from exc
            log.write(f"Sending build context to node {worker.identity.name or ''}: {size} bytes\n")
            context.seek(0)
            events = worker.agent.builder.build(
                req.tenant,
                context,
                dockerfile=req.dockerfile or None,
                tag=req.tag,
                build_args=dict(req.build_args),
                target=req.target or None,
                no_cache=req.no_cache,
                limits=BuildLimits(build_timeout=float(req.timeout_seconds)),
            )
            try:
                for event in events:
                    if cancel.is_set():
                        raise _Stop("cancelled")
                    if time.monotonic() > deadline:
                        raise _Stop(f"the build ran over its {req.timeout_seconds}s limit")
                    log.write(event.render())
                    if event.kind == "done":
                        digest, reference = event.digest, event.reference
            finally:
                events.close()
        state = "succeeded"
    except _Stop as exc:
        state = "cancelled" if str(exc) == "cancelled" else "failed"
        error = str(exc)
        log.write(f"{error}\n")
    except AgentError as exc:
        error = str(exc)
        if not log.tail.endswith(f"{error}\n"):
            log.write(f"error: {error}\n")
    except Exception as exc:  # a bug must still end the build on the control plane
        error = f"internal error: {exc}"
        log.write(f"{error}\n")
    result = {
        "state": state,
        "digest": digest,
        "reference": reference,
        "error": error,
        "started_at": started,
        "finished_at": _now(),
    }
    log.send(**result)
    return result
