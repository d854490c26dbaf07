"""Image builds: a context tar uploaded through the API, built on a node.

The context is streamed to disk under ``BERTH_BUILD_CONTEXT_DIR`` (never into the
database), size-capped by ``BERTH_BUILD_CONTEXT_MAX_BYTES``. Admission refuses a
suspended tenant or one at its spend cap, one with ``BERTH_BUILD_CONCURRENCY`` builds
already queued or running, and one with no build minutes left; otherwise it holds what is
left of the tenant's ``build_minutes_month`` (at most ``BERTH_BUILD_TIMEOUT_SECONDS``),
and that hold is the build's deadline, which the node enforces (``timeout_seconds``), so
a build cannot overshoot the month. When the build ends the hold is released and the
minutes actually used (rounded up, never more than held) are added to the month's use,
exactly once, and the build is recorded for billing (``billing.services.record_build``).
The node the build is placed on fetches the context over HTTP with its node credential,
builds with ``agent.builder`` and reports its log and result back
(``handle_build_report``).

The built image goes to the tenant's registry: the build request carries the target
``<registry-host>/<tenant>/<repo>:<tag>`` but no credential. When its last step is done,
the node asks for a push token over HTTP with its node credential
(``issue_push_token``): a registry bearer token for exactly that repository (pull, push),
valid ``BERTH_REGISTRY_TOKEN_TTL`` seconds, granted only to the node the build is running
on while it runs (a node's own registry credential may only pull). So no push credential
waits in the broker, none is minted for a build that fails or is cancelled before its
push, and a cancelled build gets none afterwards. The token is never logged or saved. A
tenant that may not push (suspended, storage quota used up) is refused at dispatch and
again when the token is asked for. A build succeeds only once its image is pushed, and
records it as ``<registry-host>/<tenant>/<repo>@<manifest digest>``, which services pull
on any node. Services and jobs naming the build's bare tag (``app:v1``) resolve it to
that reference when they are created, deployed or submitted (``resolve_image``). A
control plane without a registry (``registry_configured()`` false) keeps the image in the
build node's store, and services using it are pinned to that node
(``storage.pin_constraints``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from registry import services as registry_services
from registry.errors import RegistryDenied
from registry.tokens import IssuedToken
from runtime_agent import archive, protocol
from runtime_agent.archive import ArchiveLimits
from runtime_agent.build.steps import BuildLimits
from runtime_agent.config import AgentConfig
from runtime_agent.errors import InvalidArchive, ResourceExhausted
from runtime_agent.images.reference import is_registry_host
from tenants import services as tenant_services
from tenants.errors import BerthError, Conflict, InvalidInput, PermissionDenied
from tenants.models import QuotaReservation, QuotaUsage, Tenant
from tenants.services import Actor, record
from workloads.choices import BuildState, NodeState
from workloads.models import Build, Node
from workloads.services import dispatch, nodes, storage

log = logging.getLogger(__name__)
SYSTEM = Actor.for_system("builds")
TERMINAL = (BuildState.SUCCEEDED, BuildState.FAILED, BuildState.CANCELLED)
REPOSITORY_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ContextTooLarge(BerthError):
    status_code = 413
    code = "context_too_large"


def context_dir() -> Path:
    path = Path(getattr(settings, "BERTH_BUILD_CONTEXT_DIR", "var/build-contexts"))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def max_context_bytes() -> int:
    return int(getattr(settings, "BERTH_BUILD_CONTEXT_MAX_BYTES", 256 * 1024**2))


def log_keep_bytes() -> int:
    return int(getattr(settings, "BERTH_BUILD_LOG_KEEP_BYTES", 256 * 1024))


def build_timeout() -> int:
    return int(getattr(settings, "BERTH_BUILD_TIMEOUT_SECONDS", 3600))


def max_concurrent_builds() -> int:
    """Builds one tenant may have queued or running at once (``BERTH_BUILD_CONCURRENCY``)."""
    return int(getattr(settings, "BERTH_BUILD_CONCURRENCY", 2))


class TooManyBuilds(BerthError):
    """The tenant already has as many builds queued or running as it may."""

    status_code = 429
    code = "too_many_builds"


# --------------------------------------------------------------------------- input


def validate_tag(tag: Any) -> str:
    """``repository[:tag]`` in the tenant's namespace -> ``repository:tag``."""
    if not isinstance(tag, str) or not tag or len(tag) > 255:
        raise InvalidInput("tag must be a repository[:tag] such as myapp:1.0")
    repository, _, name = tag.partition(":") if "/" not in tag.rpartition(":")[2] else (tag, "", "")
    name = name or "latest"
    if "@" in tag or not REPOSITORY_RE.match(repository):
        raise InvalidInput(
            f"tag {tag!r}: the repository must be lowercase path components of letters, "
            "digits and separators (no registry host: images go in your tenant's namespace)",
            details={"field": "tag"},
        )
    if not TAG_RE.match(name):
        raise InvalidInput(f"tag {tag!r}: {name!r} is not a valid tag", details={"field": "tag"})
    return f"{repository}:{name}"


def validate_build_args(value: Any) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and ARG_RE.match(k) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidInput("build_args must be an object of NAME: string value")
    if sum(len(k) + len(v) for k, v in value.items()) > 64 * 1024:
        raise InvalidInput("build_args are too large (64 KiB at most)")
    return dict(value)


def validate_dockerfile(value: Any) -> str:
    if value in (None, ""):
        return "Dockerfile"
    if (
        not isinstance(value, str)
        or len(value) > 500
        or value.startswith("/")
        or ".." in value.split("/")
    ):
        raise InvalidInput("dockerfile must be a relative path inside the context")
    return value


def store_context(
    chunks: Iterable[bytes], *, declared_size: int | None = None
) -> tuple[Path, int, str]:
    """Spool an uploaded context to disk, capped, and check that it is a tar archive.

    Returns ``(path, size, sha256)``; raises :class:`ContextTooLarge` or
    :class:`InvalidInput` leaving no file behind.
    """
    limit = max_context_bytes()
    if declared_size is not None and declared_size > limit:
        raise ContextTooLarge(
            f"the build context is {declared_size} bytes; at most {limit} are accepted",
            details={"limit_bytes": limit, "size_bytes": declared_size},
        )
    path = context_dir() / f".upload-{uuid.uuid4().hex}.tar"
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise ContextTooLarge(
                        f"the build context is over the {limit}-byte limit",
                        details={"limit_bytes": limit},
                    )
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise InvalidInput("the build context is empty: upload a tar of the build directory")
        _check_context_archive(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size, digest.hexdigest()


def context_archive_limits() -> ArchiveLimits:
    """What a context may unpack to: the node's own caps (``BuildLimits.context_bytes``,
    ``BERTH_CONTEXT_MAX_ENTRIES``), so the control plane refuses at upload exactly what
    the node would refuse later. ``BERTH_BUILD_CONTEXT_MAX_UNPACKED_BYTES`` lowers the
    byte cap (it can never usefully be higher than the node's)."""
    unpacked = int(
        getattr(settings, "BERTH_BUILD_CONTEXT_MAX_UNPACKED_BYTES", BuildLimits().context_bytes)
    )
    return AgentConfig().context_limits(unpacked)


def _check_context_archive(path: Path) -> None:
    """Read the uploaded context through the node's hardened archive reader
    (``runtime_agent.archive.scan``): decompression counted and stopped at the unpacked
    cap, extended headers capped before they are buffered, member count and names
    checked. So a small compressed bomb costs the control plane bounded CPU and memory,
    and the tenant learns at once (413 naming the limit, 400 for a bad archive) instead
    of from a failed build."""
    limits = context_archive_limits()
    try:
        with path.open("rb") as stream:
            archive.scan(stream, limits)
    except ResourceExhausted as exc:
        raise ContextTooLarge(
            f"{exc.message}; nodes refuse to unpack it",
            details={"limit": exc.details.get("limit"), "resource": exc.details.get("resource")},
        ) from None
    except InvalidArchive as exc:
        raise InvalidInput(
            f"the build context is not a readable tar archive: {exc.message}"
        ) from None


def discard_context(path: str | Path) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


# --------------------------------------------------------------------------- lifecycle


def create_build(
    tenant: Tenant,
    *,
    context: tuple[Path, int, str],
    tag: str,
    dockerfile: str | None = None,
    build_args: dict[str, str] | None = None,
    target: str | None = None,
    no_cache: bool = False,
    actor: Actor,
) -> Build:
    """Admit a build (:func:`_admit_minutes`, the spend cap) and send it to a node.

    The spooled context file is owned by the build from here: moved next to it, or
    removed when admission fails (nothing else is left behind then either).
    """
    path, size, sha = context
    final = path.with_name(f"{uuid.uuid4()}.tar")
    try:
        with transaction.atomic():
            from billing.services import check_new_usage_allowed

            check_new_usage_allowed(tenant, "build")  # suspended, or the spend cap reached
            clean_tag = validate_tag(tag)
            clean_dockerfile = validate_dockerfile(dockerfile)
            clean_args = validate_build_args(build_args)
            if target is not None and (not isinstance(target, str) or len(target) > 128):
                raise InvalidInput("target must be a stage name")
            build = Build(
                id=uuid.UUID(final.stem),
                tenant=tenant,
                tag=clean_tag,
                dockerfile=clean_dockerfile,
                build_args=clean_args,
                target=target or "",
                no_cache=bool(no_cache),
                context_path=str(final),
                context_size=size,
                context_sha256=sha,
            )
            build.reservation = _admit_minutes(tenant, build, actor=actor)
            build.save()
            record(
                actor,
                "build.create",
                tenant=tenant,
                target=build,
                details={"tag": clean_tag, "context_bytes": size},
            )
            _dispatch(build)
            path.rename(final)  # before commit: the node fetches it once the task is sent
    except BaseException:
        discard_context(path)
        discard_context(final)
        raise
    return build


def _admit_minutes(tenant: Tenant, build: Build, *, actor: Actor) -> QuotaReservation:
    """Hold the minutes this build may run: what is left of the month's
    ``build_minutes_month``, at most ``BERTH_BUILD_TIMEOUT_SECONDS``; refused when
    nothing is left (QuotaExceeded) or the tenant has ``max_concurrent_builds`` builds
    queued or running (TooManyBuilds).

    The hold is the build's deadline (:func:`granted_seconds`): the node stops it there,
    so builds running side by side can never use more minutes than the month had left
    (99 of 100 used: the next build gets one minute, not the three it would take). The
    tenant row is locked meanwhile, so concurrent admissions are counted one at a time.
    """
    Tenant.objects.select_for_update(no_key=True).filter(pk=tenant.pk).first()
    active = Build.objects.filter(
        tenant=tenant, state__in=[BuildState.QUEUED, BuildState.RUNNING]
    ).count()
    if active >= max_concurrent_builds():
        raise TooManyBuilds(
            f"{tenant.slug} already has {active} builds queued or running, the most it may "
            "have at once; wait for one to end or cancel one",
            details={"limit": max_concurrent_builds(), "active": active},
        )
    limit = int(tenant.quota_limits()["build_minutes_month"])
    usage = QuotaUsage.objects.filter(tenant=tenant, quota="build_minutes_month").first()
    left = limit - (usage.used if usage else 0)
    minutes = max(1, min(left, math.ceil(build_timeout() / 60)))  # refused below if none left
    return tenant_services.reserve(
        tenant, {"build_minutes_month": minutes}, actor=actor, reason=f"build {build.pk}"
    )


def granted_minutes(build: Build) -> int:
    """The minutes held for the build at admission (its whole allowance)."""
    reservation = build.reservation
    if reservation is None:
        return math.ceil(build_timeout() / 60)
    return int(reservation.amounts.get("build_minutes_month", 1))


def granted_seconds(build: Build) -> int:
    """How long the build may run: its held minutes, never over the platform's timeout."""
    return min(build_timeout(), granted_minutes(build) * 60)


def _pick_node() -> Node | None:
    """The ready node with the fewest builds running (builds are CPU-heavy)."""
    return (
        Node.objects.filter(state=NodeState.READY)
        .annotate(running=Count("builds", filter=Q(builds__state=BuildState.RUNNING)))
        .order_by("running", "name", "pk")
        .first()
    )


def context_path_url(build: Build) -> str:
    from django.urls import reverse

    return reverse("build-context", kwargs={"build_id": build.pk})


def push_target(build: Build) -> str:
    """Where a build's image goes: ``<registry-host>/<tenant>/<repo>:<tag>``."""
    repository, _, tag = build.tag.rpartition(":")
    return f"{settings.BERTH_REGISTRY_HOST}/{build.tenant.slug}/{repository}:{tag}"


def resolve_image(tenant: Tenant, image: str) -> str:
    """The registry digest reference that a bare ``name[:tag]`` names, or ``""``.

    It is the ``image_reference`` (``<registry-host>/<tenant>/<repo>@sha256:…``) of the
    tenant's latest succeeded, pushed build tagged ``image``, looked up in that tenant's
    builds only. Services and jobs resolve their image once, when created, deployed or
    submitted (as Docker Swarm does), and their containers run that digest on any node,
    so every replica runs the same image and a later build changes nothing until the
    next deploy. An image with a registry host or a digest, or a tag no pushed build has,
    resolves to nothing and is used as written (an unpushed build's tag stays pinned to
    its node, ``storage.pin_constraints``).
    """
    first, slash, _ = image.partition("/")
    if "@" in image or (slash and is_registry_host(first)):
        return ""
    reference = (
        Build.objects.for_tenant(tenant)
        .filter(tag=storage.normalize_image(image), state=BuildState.SUCCEEDED, pushed=True)
        .exclude(image_reference="")
        .order_by(F("finished_at").desc(nulls_last=True), "-created_at")
        .values_list("image_reference", flat=True)
        .first()
    )
    return reference or ""


def _dispatch(build: Build) -> bool:
    """Send the build to a node (raises RegistryDenied when its push would be refused:
    better now than after the whole build)."""
    node = _pick_node()
    if node is None:
        if build.reason != "waiting for a ready node":
            build.reason = "waiting for a ready node"
            build.save(update_fields=["reason"])
        return False
    push_to = None
    if registry_services.registry_configured():
        registry_services.check_push_allowed(build.tenant)
        push_to = push_target(build)
    build.node = node
    build.state = BuildState.RUNNING
    build.started_at = timezone.now()
    build.reason = ""
    build.save(update_fields=["node", "state", "started_at", "reason"])
    request = protocol.BuildRequest(
        build_id=str(build.pk),
        tenant=build.tenant.slug,
        context_url=context_path_url(build),
        tag=build.tag,
        dockerfile=build.dockerfile,
        build_args=dict(build.build_args),
        target=build.target or None,
        no_cache=build.no_cache,
        log_keep_bytes=log_keep_bytes(),
        timeout_seconds=granted_seconds(build),
        push_to=push_to,
    )
    dispatch.send_after_commit(
        node, protocol.AGENT_BUILD, op_id=f"build:{build.pk}", request=protocol.to_dict(request)
    )
    return True


def _finish(
    build: Build, state: str, *, reason: str = "", finished_at: datetime | None = None
) -> None:
    """End a build: its minutes are counted exactly once, its context removed."""
    now = timezone.now()
    build.state = state
    build.reason = reason[:1000]
    build.finished_at = finished_at or now
    if build.started_at is not None and build.finished_at < build.started_at:
        build.finished_at = build.started_at
    build.save()
    granted = granted_minutes(build)
    if build.reservation_id is not None and tenant_services.release(
        build.reservation_id, actor=SYSTEM, reason="build ended"
    ):
        if build.started_at is not None:
            seconds = (build.finished_at - build.started_at).total_seconds()
            # The node stopped it at its deadline: what ran past it (the report's way
            # back) is not taken from the month's minutes.
            minutes = min(granted, max(1, math.ceil(seconds / 60)))
            QuotaUsage.objects.filter(
                tenant_id=build.tenant_id, quota="build_minutes_month"
            ).update(used=F("used") + minutes, updated_at=now)
            from billing.services import record_build

            record_build(
                build.tenant,
                str(build.pk),
                started_at=build.started_at,
                finished_at=build.finished_at,
            )
            record(
                SYSTEM,
                "build.minutes",
                tenant=build.tenant,
                target=build,
                details={"minutes": minutes, "seconds": round(seconds, 3)},
            )
    path = build.context_path
    transaction.on_commit(lambda: discard_context(path))


@transaction.atomic
def cancel_build(build: Build, *, actor: Actor) -> Build:
    build = (
        Build.objects.select_for_update(of=("self",))
        .select_related("tenant", "node")
        .get(pk=build.pk)
    )
    if build.state in TERMINAL:
        raise Conflict(f"the build already ended ({build.state})", details={"state": build.state})
    node = build.node if build.state == BuildState.RUNNING else None
    _finish(build, BuildState.CANCELLED, reason="cancelled")
    if node is not None:
        dispatch.send_after_commit(node, protocol.AGENT_CANCEL_BUILD, build_id=str(build.pk))
    record(actor, "build.cancel", tenant=build.tenant, target=build)
    return build


def _running_build_on(node: Node, build_id: str, *, lock: bool = False) -> Build:
    """The build ``build_id`` if it is running on ``node``; PermissionDenied otherwise (a
    build of another node, a finished or cancelled one and an unknown id look alike)."""
    query = Build.objects.select_related("tenant")
    if lock:
        query = query.select_for_update(of=("self",))
    build = query.filter(pk=build_id).first()
    if build is None or build.node_id != node.pk or build.state != BuildState.RUNNING:
        raise PermissionDenied("this node has no running build with that id")
    return build


def authenticate_context_fetch(build_id: str, node_id: str, credential: str) -> Build:
    """Only the node a running build was placed on may fetch its context."""
    node = nodes.authenticate_node(node_id, credential)
    return _running_build_on(node, build_id)


@transaction.atomic
def issue_push_token(build_id: str, node_id: str, credential: str) -> IssuedToken:
    """A registry token to push a build's image, for the node running it, right now.

    Only the node the build is running on gets one (PermissionDenied otherwise: another
    node, a wrong credential, a build that ended or was cancelled), for exactly the
    build's repository (pull, push), valid ``BERTH_REGISTRY_TOKEN_TTL`` seconds. Refused
    with RegistryDenied when the tenant may not push now (suspended, storage quota used
    up), and with Conflict when this control plane has no registry. The build's row is
    locked meanwhile, so a cancellation either comes first (no token) or after it.
    Nothing is stored or logged: the token goes back in the response only.
    """
    node = nodes.authenticate_node(node_id, credential)
    build = _running_build_on(node, build_id, lock=True)
    if not registry_services.registry_configured():
        raise Conflict("this control plane has no registry to push to")
    return registry_services.repository_push_token(
        build.tenant,
        build.tag.rpartition(":")[0],
        subject=f"build {build.pk} on node {node.name}",
    )


@transaction.atomic
def handle_build_report(report: protocol.BuildReport) -> None:
    """Apply a node's log or result report (newest sequence wins; results end the build)."""
    node = nodes.authenticate_node(report.node_id, report.credential)
    build = (
        Build.objects.select_for_update(of=("self",))
        .select_related("tenant")
        .filter(pk=report.build_id)
        .first()
    )
    if build is None or build.node_id != node.pk:
        log.warning("ignoring a build report of %s from node %s", report.build_id, node.name)
        return
    fields = []
    if report.seq > build.log_seq:
        build.log, build.log_size, build.log_seq = report.log, report.log_size, report.seq
        fields = ["log", "log_size", "log_seq"]
    if report.state is None or build.state in TERMINAL:
        if fields:
            build.save(update_fields=fields)
        return
    state = report.state if report.state in TERMINAL else BuildState.FAILED
    reason = report.error or ""
    pushed = _pushed_image(build, report) if report.pushed_reference is not None else None
    if state == BuildState.SUCCEEDED and report.pushed_reference is not None and pushed is None:
        state = BuildState.FAILED
        reason = (
            f"the node reported a push to {report.pushed_reference} "
            f"({report.manifest_digest}), not to {push_target(build)}"
        )
    if state == BuildState.SUCCEEDED:
        build.image_digest = report.digest or ""
        build.image_reference = pushed or report.reference or build.tag
        build.pushed = pushed is not None
    build.started_at = parse_datetime(report.started_at or "") or build.started_at
    _finish(
        build,
        state,
        reason=reason,
        finished_at=parse_datetime(report.finished_at or "") or None,
    )


def _pushed_image(build: Build, report: protocol.BuildReport) -> str | None:
    """``<host>/<tenant>/<repo>@<manifest digest>`` when the node pushed where it was
    told to, with a well-formed digest; None otherwise."""
    digest = report.manifest_digest or ""
    if report.pushed_reference != push_target(build) or not registry_services.DIGEST_RE.match(
        digest
    ):
        return None
    return f"{push_target(build).rpartition(':')[0]}@{digest}"


def reconcile_builds(*, now: datetime | None = None) -> int:
    """Send queued builds to nodes; fail builds whose node went down or that ran over time."""
    now = now or timezone.now()
    changed = 0
    with transaction.atomic():
        for build in (
            Build.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("tenant", "node")
            .filter(state__in=[BuildState.QUEUED, BuildState.RUNNING])
        ):
            if build.state == BuildState.QUEUED:
                try:
                    changed += _dispatch(build)
                except RegistryDenied as exc:
                    _finish(build, BuildState.FAILED, reason=f"cannot push the image: {exc}")
                    changed += 1
            elif build.node is None or build.node.state == NodeState.DOWN:
                _finish(build, BuildState.FAILED, reason="the build's node went down")
                changed += 1
            elif (
                build.started_at
                and (now - build.started_at).total_seconds() > granted_seconds(build) + 120
            ):
                _finish(
                    build, BuildState.FAILED, reason=f"no result within {granted_seconds(build)}s"
                )
                changed += 1
    return changed
