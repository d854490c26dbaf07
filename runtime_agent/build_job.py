"""A control-plane build on this node (task ``AGENT_BUILD``, see worker.build_image).

The context is fetched over HTTP from the control plane with the node's credential (only
the node the build was placed on may fetch it), built with ``agent.builder`` into the
tenant's image store under the requested tag, and the log is streamed back as
:class:`~runtime_agent.protocol.BuildReport` messages to the control plane's queue: the
kept tail of the log with a growing sequence number (the control plane keeps the newest),
at most every ``LOG_INTERVAL`` seconds, and a last one carrying the result, each POSTed
with the node credential (``protocol.BUILD_REPORT_PATH``; the broker carries nothing from
a node). A log report that fails is sent again with the next; the result is tried
``RESULT_TRIES`` times (the reconciler fails a build whose result never arrives).

With ``push_to`` in the request, a built image is then pushed to the tenant's registry.
The request carries no credential for that (the node's own registry login may only
pull): after the last step, unless the build was cancelled meanwhile, the agent asks the
control plane for a push token with its node credential (``protocol.BUILD_PUSH_TOKEN_PATH``),
a short-lived bearer token for that one repository which is used for this push and
dropped, never logged or stored. The result carries the pushed reference and the
manifest digest; a push that fails, or a token the control plane refuses (the build was
cancelled, the tenant may not push), fails the build with the reason (the local tag goes
back to what it was, so no half-pushed build is left looking like a success). Without
``push_to`` (a control plane with no registry) the image stays in this node's store and
the control plane pins services using it here.
"""

from __future__ import annotations

import json
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

from runtime_agent import control_api, protocol
from runtime_agent.build.steps import BuildLimits
from runtime_agent.distribution.auth import BearerToken
from runtime_agent.distribution.push import push
from runtime_agent.errors import AgentError
from runtime_agent.images.reference import parse_reference

if TYPE_CHECKING:
    from runtime_agent.worker import NodeWorker

logger = logging.getLogger("berth.agent.build")
LOG_INTERVAL = 0.5
RESULT_TRIES = 3
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
                try:
                    self._send()
                except AgentError as exc:  # the next write or the result sends it again
                    logger.warning("sending the log of build %s failed: %s", self.req.build_id, exc)

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
            for attempt in range(1, RESULT_TRIES + 1):
                try:
                    self._send(**result)
                    return
                except AgentError as exc:
                    logger.warning(
                        "sending the result of build %s failed (try %d): %s",
                        self.req.build_id,
                        attempt,
                        exc,
                    )
                    if attempt < RESULT_TRIES:
                        time.sleep(attempt)

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
        # Over HTTP with the node credential: a node's broker user enqueues nothing.
        control_api.send_build_report(self.worker.identity, report)
        self.sent_at = time.monotonic()
        self.dirty = False


def _node_request(worker: NodeWorker, path: str, *, method: str) -> urllib.request.Request:
    """A request to the control plane signed with this node's id and credential."""
    url = urllib.parse.urljoin(worker.identity.control_url, path)
    if not url.startswith(("http://", "https://")):
        raise AgentError(f"the control plane URL {url!r} is not http(s)")
    return urllib.request.Request(  # noqa: S310 - checked just above
        url,
        method=method,
        headers={
            protocol.NODE_ID_HEADER: worker.identity.node_id,
            protocol.NODE_CREDENTIAL_HEADER: worker.identity.credential,
        },
    )


def fetch_context(worker: NodeWorker, req: protocol.BuildRequest, into: Any) -> int:
    request = _node_request(worker, req.context_url, method="GET")
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:  # noqa: S310
        shutil.copyfileobj(response, into, 1024 * 1024)
    return int(into.tell())


class PushFailed(AgentError):
    """The image was built but could not be pushed to the tenant's registry."""

    code = "push_failed"


def fetch_push_token(worker: NodeWorker, req: protocol.BuildRequest) -> BearerToken:
    """Ask the control plane for the token to push this build's image with, now.

    Raises :class:`PushFailed` with the control plane's reason when it refuses (the build
    is no longer running here, the tenant may not push) or cannot be reached.
    """
    path = protocol.BUILD_PUSH_TOKEN_PATH.format(build_id=req.build_id)
    request = _node_request(worker, path, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:  # noqa: S310
            token = json.load(response).get("token")
    except urllib.error.HTTPError as exc:
        raise PushFailed(
            f"cannot push {req.push_to}: the control plane refused a push token "
            f"({exc.code}): {_error_message(exc)}"
        ) from None
    except (OSError, ValueError) as exc:
        raise PushFailed(f"cannot push {req.push_to}: no push token: {exc}") from None
    if not isinstance(token, str) or not token:
        raise PushFailed(f"cannot push {req.push_to}: the control plane sent no push token")
    # A push that outlives this short-lived token asks for the next one the same way.
    return BearerToken(token, renew=lambda: fetch_push_token(worker, req).token)


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The message of an error in the API's format (``{"error": {"message"}}``)."""
    try:
        body = json.loads(exc.read(65536) or b"{}")
        message = body["error"]["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return str(exc.reason)
    return str(message)


def push_image(worker: NodeWorker, req: protocol.BuildRequest, log: BuildLog) -> tuple[str, str]:
    """Push the built image to ``req.push_to`` with a push token fetched just now.

    Returns ``(pushed reference, manifest digest)``; raises :class:`PushFailed`.
    """
    assert req.push_to is not None
    token = fetch_push_token(worker, req)
    log.write(f"Pushing {req.push_to}\n")
    try:
        result = push(worker.agent, req.tenant, req.push_to, token, source=req.tag)
    except (AgentError, OSError) as exc:
        raise PushFailed(f"pushing {req.push_to} failed: {exc}") from exc
    log.write(
        f"Pushed {result.reference}: {len(result.uploaded)} blob(s) uploaded "
        f"({result.bytes_uploaded} bytes), {len(result.existing)} already there; "
        f"digest: {result.digest}\n"
    )
    return result.reference, result.digest


def _restore_tag(worker: NodeWorker, tenant: str, tag: str, previous: str | None) -> None:
    """Point ``tag`` back where it was before a build whose push failed (or drop it)."""
    images = worker.agent.images
    try:
        if previous is not None:
            images.set_reference(tenant, tag, previous)
        else:
            images.remove(tenant, tag)
    except AgentError as exc:
        logger.warning("could not restore tag %s of %s after a failed push: %s", tag, tenant, exc)


def run_build(
    worker: NodeWorker, req: protocol.BuildRequest, cancel: threading.Event
) -> dict[str, Any]:
    """Run one build to its end (and its push, when asked); always reports the result to
    the control plane."""
    started = _now()
    log = BuildLog(worker, req)
    threading.Thread(target=log.flush_periodically, name="build-log", daemon=True).start()
    deadline = time.monotonic() + req.timeout_seconds
    digest = reference = error = pushed_reference = manifest_digest = None
    state = "failed"
    spool = worker.agent.config.root / "build-contexts"
    spool.mkdir(parents=True, exist_ok=True)
    try:
        if cancel.is_set():  # cancelled while it waited in its tenant's queue
            raise _Stop("cancelled")
        tag_key = parse_reference(req.tag).tagged
        previous = worker.agent.images.references(req.tenant).get(tag_key)
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
                limits=BuildLimits(
                    build_timeout=float(req.timeout_seconds),
                    # RUN steps as the tenant's unprivileged id range (operator opt-out only).
                    user_namespace=worker.agent.config.tenant_userns,
                ),
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
        if req.push_to:
            try:
                if cancel.is_set():
                    raise _Stop("cancelled")
                pushed_reference, manifest_digest = push_image(worker, req, log)
            except (_Stop, PushFailed):
                _restore_tag(worker, req.tenant, tag_key, previous)
                digest = reference = None
                raise
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
        "pushed_reference": pushed_reference,
        "manifest_digest": manifest_digest,
        "error": error,
        "started_at": started,
        "finished_at": _now(),
    }
    log.send(**result)
    return result
