"""Batch jobs: admission per tenant under its concurrency quota, fair sharing of the fleet,
retries with exponential back-off, timeouts, logs and resource use kept per run.

A run is admitted (state ``running``) when it has taken its quota — one
``concurrent_jobs`` plus its CPU and memory — and has a container; the container's reports
then tell when it really started and how it ended. ``dispatch_runs`` admits runs round-robin
across tenants, fewest running first, so one tenant's 10,000 queued runs never starve
another tenant's one.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone

from runtime_agent import protocol
from tenants import services as tenant_services
from tenants.errors import Conflict, InvalidInput, QuotaExceeded
from tenants.models import Tenant
from tenants.services import Actor, record
from workloads.choices import ContainerState, DesiredState, JobState, RunState
from workloads.models import BatchJob, Container, JobRun
from workloads.services import builds, deploy, placement, specs

SYSTEM = Actor.for_system("job-dispatcher")
MAX_ARRAY_SIZE = 10_000
#: Admitted job containers still waiting for a node, beyond which no more are admitted:
#: a full fleet should not turn every queued run into a reserved-but-waiting one.
MAX_WAITING_CONTAINERS = 200
#: A finished run keeps the end of its output: at most this many lines and this many bytes
#: (one run printing megabytes must not grow the database by as much).
LOG_LINES_KEPT = 1000
LOG_BYTES_KEPT = 64 * 1024
_MARKER_ROOM = 80  # bytes of LOG_BYTES_KEPT left for the truncation marker


def _int(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{key} must be an integer between {low} and {high}")
    return value


@transaction.atomic
def submit_job(tenant: Tenant, data: dict[str, Any], *, actor: Actor) -> BatchJob:
    deploy.admit_new_usage(tenant, "job")
    fields = specs.service_fields(
        {
            k: data[k]
            for k in ("image", "command", "env", "cpu_millicores", "memory_mib", "gpus")
            if k in data
        },
        tenant,
    )
    if "image" not in fields:
        raise InvalidInput("image is required")
    name = data.get("name") or f"job-{uuid.uuid4().hex[:8]}"
    job = BatchJob(
        tenant=tenant,
        name=name,
        array_size=_int(data, "array_size", 1, 1, MAX_ARRAY_SIZE),
        parallelism=_int(data, "parallelism", 1, 1, 1000),
        max_retries=_int(data, "max_retries", 0, 0, 100),
        backoff_seconds=_int(data, "backoff_seconds", 10, 0, 3600),
        timeout_seconds=data.get("timeout_seconds")
        and _int(data, "timeout_seconds", 0, 1, 7 * 24 * 3600),
        priority=_int(data, "priority", 0, -100, 100),
        **fields,
    )
    job.full_clean(exclude=["tenant"])
    # Every run, retries included, runs the digest the tag named at submission.
    job.resolved_image = builds.resolve_image(tenant, job.image)
    # Refuse up front a job whose single run could never fit the tenant's quotas.
    limits = tenant.quota_limits()
    for quota, amount in (
        ("concurrent_jobs", 1),
        ("cpu_millicores", job.cpu_millicores),
        ("memory_mib", job.memory_mib),
        ("gpus", job.gpus),
        ("array_size", job.array_size),
    ):
        if amount > limits[quota]:
            raise QuotaExceeded(quota, limits[quota], 0, amount)
    job.save()
    JobRun.objects.bulk_create(JobRun(job=job, index=i) for i in range(job.array_size))
    details: dict[str, Any] = {"array_size": job.array_size}
    if job.resolved_image:
        details["resolved_image"] = job.resolved_image
    record(actor, "job.submit", tenant=tenant, target=job, details=details)
    transaction.on_commit(_dispatch_soon)
    return job


def _dispatch_soon() -> None:
    from workloads.tasks import dispatch_runs_task

    dispatch_runs_task.delay()


def _run_container(run: JobRun) -> Container:
    job = run.job
    uid = uuid.uuid4()
    container = Container(
        id=uid,
        tenant=job.tenant,
        job_run=run,
        name=f"{job.name}-{run.index}",
        cpu_millicores=job.cpu_millicores,
        memory_mib=job.memory_mib,
        gpus=job.gpus,
    )
    env = {**job.env, "BERTH_JOB_INDEX": str(run.index), "BERTH_JOB_ATTEMPT": str(run.attempt)}
    spec = protocol.ContainerSpec(
        tenant=job.tenant.slug,
        image=job.run_image,
        name=container.agent_name,
        command=tuple(job.command) if job.command is not None else None,
        env=env,
        labels={
            protocol.CONTAINER_UID_LABEL: str(uid),
            "berth.job": job.name,
            "berth.job.index": str(run.index),
        },
        limits=protocol.from_dict(
            protocol.Limits, specs.limits(job.tenant, job.cpu_millicores, job.memory_mib, None)
        ),
        network_mode=specs.default_network_mode(),  # type: ignore[arg-type]
    )
    container.spec = protocol.to_dict(spec)
    return container


def _admit(run: JobRun) -> bool:
    """Take the run's quota and give it a container; False when the quota is full now."""
    job = run.job
    amounts = {
        "concurrent_jobs": 1,
        "cpu_millicores": job.cpu_millicores,
        "memory_mib": job.memory_mib,
    }
    if job.gpus:
        amounts["gpus"] = job.gpus
    try:
        with transaction.atomic():
            reservation = tenant_services.reserve(
                job.tenant, amounts, actor=SYSTEM, reason=f"job {job.name} #{run.index}"
            )
    except QuotaExceeded:
        return False
    container = _run_container(run)
    container.reservation = reservation
    container.save()
    run.state = RunState.RUNNING
    run.save(update_fields=["state"])
    if job.state == JobState.QUEUED:
        BatchJob.objects.filter(pk=job.pk, state=JobState.QUEUED).update(state=JobState.RUNNING)
    return True


#: Key of the Postgres advisory lock that makes admission decisions one at a time.
DISPATCH_LOCK_KEY = 0x6265727468  # "berth"


def _serialize_dispatch() -> None:
    """Admission counts running runs, then admits more: two dispatchers interleaving would
    both see the same count and overshoot a job's parallelism. One at a time, then; SQLite
    transactions (immediate mode) are serialized already."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [DISPATCH_LOCK_KEY])


@transaction.atomic
def dispatch_runs(*, now: Any = None) -> int:
    """Admit pending runs, round-robin across tenants. Returns how many were admitted."""
    now = now or timezone.now()
    _serialize_dispatch()
    waiting = Container.objects.filter(
        job_run__isnull=False, state=ContainerState.PENDING, desired_state=DesiredState.RUNNING
    ).count()
    budget = max(0, MAX_WAITING_CONTAINERS - waiting)
    if budget == 0:
        return 0
    running_per_job = dict(
        JobRun.objects.filter(state=RunState.RUNNING).values_list("job_id").annotate(n=Count("id"))
    )
    running_per_tenant: dict[int, int] = defaultdict(int)
    for job_id, tenant_id in BatchJob.objects.filter(pk__in=list(running_per_job)).values_list(
        "pk", "tenant_id"
    ):
        running_per_tenant[tenant_id] += running_per_job[job_id]

    candidates = (
        JobRun.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(state=RunState.PENDING, not_before__lte=now)
        .filter(job__state__in=[JobState.QUEUED, JobState.RUNNING], job__tenant__status="active")
        .select_related("job", "job__tenant")
        .order_by("-job__priority", "job__created_at", "index", "attempt")[:5000]
    )
    queues: dict[int, list[JobRun]] = defaultdict(list)
    for run in candidates:
        queues[run.job.tenant_id].append(run)
    admitted = 0
    blocked: set[int] = set()
    while budget > 0:
        progressed = False
        for tenant_id in sorted(queues, key=lambda t: running_per_tenant[t]):
            if tenant_id in blocked:
                continue
            queue = queues[tenant_id]
            while queue:
                run = queue.pop(0)
                if running_per_job.get(run.job_id, 0) >= run.job.parallelism:
                    continue
                if not _admit(run):
                    blocked.add(tenant_id)  # its quota is full: try again next tick
                    break
                running_per_job[run.job_id] = running_per_job.get(run.job_id, 0) + 1
                running_per_tenant[tenant_id] += 1
                admitted += 1
                budget -= 1
                progressed = True
                break
            if budget == 0:
                break
        if not progressed:
            break
    if admitted:
        placement.schedule_soon()
    return admitted


def run_started(container: Container) -> None:
    assert container.job_run_id is not None
    JobRun.objects.filter(pk=container.job_run_id, started_at__isnull=True).update(
        started_at=container.started_at or timezone.now()
    )


def run_finished(container: Container, *, cpu_seconds: float | None, memory: int | None) -> None:
    """The run's container exited: settle the run, maybe retry, collect logs, clean up."""
    assert container.job_run_id is not None
    run = JobRun.objects.select_for_update().select_related("job").get(pk=container.job_run_id)
    if run.state == RunState.RUNNING:
        run.state = RunState.SUCCEEDED if container.exit_code == 0 else RunState.FAILED
        if container.exit_code is None:
            run.reason = container.pending_reason or "the container failed to start"
        elif container.oom_killed:
            run.reason = "killed: out of memory"
    run.exit_code = container.exit_code
    run.started_at = run.started_at or container.started_at
    run.finished_at = container.finished_at or timezone.now()
    run.cpu_seconds = cpu_seconds
    run.max_memory_bytes = memory
    run.save()
    # The run's quota (a concurrent-job slot, its CPU and memory) comes back as soon as it
    # ends; its stopped container only lingers until its logs are collected.
    if container.reservation_id is not None:
        Container.objects.filter(pk=container.pk).update(reservation=None)
        tenant_services.release(container.reservation_id, actor=SYSTEM, reason="run ended")
        container.reservation_id = None
    job = run.job
    if run.state in (RunState.FAILED, RunState.TIMED_OUT) and run.attempt <= job.max_retries:
        delay = job.backoff_seconds * 2 ** (run.attempt - 1)
        JobRun.objects.create(
            job=job,
            index=run.index,
            attempt=run.attempt + 1,
            not_before=timezone.now() + timedelta(seconds=delay),
        )
    _settle_job(job)
    container_id = container.pk
    transaction.on_commit(lambda: _collect_logs_soon(container_id))
    transaction.on_commit(_dispatch_soon)


def _collect_logs_soon(container_id: Any) -> None:
    from workloads.tasks import collect_run_logs_task

    collect_run_logs_task.delay(str(container_id))


def keep_run_log(run_id: int, lines: list[str]) -> str:
    """Store the end of a run's output on the run, capped to :data:`LOG_BYTES_KEPT` bytes
    of UTF-8 (and the lines the node was asked for). When output was dropped, the log
    starts with a marker saying how much, so a short log is never mistaken for all of it."""
    data = "".join(lines[-LOG_LINES_KEPT:]).encode()
    if len(data) > LOG_BYTES_KEPT:
        tail = data[-(LOG_BYTES_KEPT - _MARKER_ROOM) :]
        dropped = len(data) - len(tail)
        data = f"[berth: log truncated, {dropped} earlier bytes not kept]\n".encode() + tail
    # A cut inside a multi-byte character leaves a partial one at the start of the tail.
    text = data.decode(errors="ignore")
    JobRun.objects.filter(pk=run_id).update(log=text)
    return text


def _settle_job(job: BatchJob) -> None:
    """Mark the job finished once no index has a live run left."""
    live = job.runs.filter(state__in=[RunState.PENDING, RunState.RUNNING]).exists()
    if live or job.state in (JobState.CANCELLED, JobState.SUCCEEDED, JobState.FAILED):
        return
    # An index succeeded if any of its attempts did.
    succeeded = set(
        job.runs.filter(state=RunState.SUCCEEDED).values_list("index", flat=True).distinct()
    )
    job.state = JobState.SUCCEEDED if len(succeeded) == job.array_size else JobState.FAILED
    job.finished_at = timezone.now()
    job.save(update_fields=["state", "finished_at"])


@transaction.atomic
def cancel_job(job: BatchJob, *, actor: Actor) -> BatchJob:
    job = BatchJob.objects.select_for_update().get(pk=job.pk)
    if job.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        raise Conflict(f"job {job.name} has already ended ({job.state})")
    job.runs.filter(state=RunState.PENDING).update(
        state=RunState.CANCELLED, finished_at=timezone.now(), reason="cancelled"
    )
    for run in job.runs.filter(state=RunState.RUNNING):
        run.state = RunState.CANCELLED
        run.reason = "cancelled"
        run.save(update_fields=["state", "reason"])
        container = Container.objects.filter(job_run=run).select_related("tenant").first()
        if container is not None:
            deploy.retire(container)
    job.state = JobState.CANCELLED
    job.finished_at = timezone.now()
    job.save(update_fields=["state", "finished_at"])
    record(actor, "job.cancel", tenant=job.tenant, target=job)
    return job


@transaction.atomic
def enforce_timeouts(*, now: Any = None) -> int:
    """Stop runs that outlived their job's timeout; they count as failed attempts."""
    now = now or timezone.now()
    expired = 0
    for run in (
        JobRun.objects.select_for_update(of=("self",))
        .filter(
            state=RunState.RUNNING, started_at__isnull=False, job__timeout_seconds__isnull=False
        )
        .select_related("job")
    ):
        assert run.started_at is not None and run.job.timeout_seconds is not None
        if run.started_at + timedelta(seconds=run.job.timeout_seconds) > now:
            continue
        run.state = RunState.TIMED_OUT
        run.reason = f"timed out after {run.job.timeout_seconds}s"
        run.save(update_fields=["state", "reason"])
        container = Container.objects.filter(job_run=run).select_related("tenant", "node").first()
        if container is not None and container.node is not None:
            from workloads.services import dispatch

            dispatch.send_after_commit(
                container.node,
                protocol.AGENT_STOP_CONTAINER,
                op_id=f"{container.pk}:timeout",
                tenant=container.tenant.slug,
                name=container.agent_name,
                timeout=5,
            )
        expired += 1
    return expired


def job_counts(job: BatchJob) -> dict[str, int]:
    rows = job.runs.values("state").annotate(n=Count("id"))
    counts = {row["state"]: row["n"] for row in rows}
    counts["indices_succeeded"] = (
        job.runs.filter(state=RunState.SUCCEEDED).values("index").distinct().count()
    )
    return counts
