"""Plan catalogue and quota arithmetic.

Every tenant quota is computed the same way::

    effective[q] = max(0, per_seat[q] * seats + override[q])     # pooled quotas
    effective[q] = max(0, per_seat[q] + override[q])             # per-container caps

``per_seat`` comes from the tenant's :class:`billing.models.Plan` row (plans are data, edited
in the admin), ``seats`` is the tenant's paid seat count, ``override`` is the sum a platform
admin added (``tenants.QuotaOverride``; it may be negative). Per-container caps (block I/O
bandwidth, processes, networks joined; the array size of one batch job) bound one container
or job, so buying seats does not multiply them.

The functions here are pure: they take numbers, return numbers, and never touch the database,
so billing code (proration, previews of a plan change) can call them freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

#: Quotas, in the order the API and the admin show them.
QUOTA_NAMES: Final[tuple[str, ...]] = (
    "cpu_millicores",
    "memory_mib",
    "blkio_bps",
    "storage_gib",
    "containers",
    "concurrent_jobs",
    "build_minutes_month",
    "gpus",
    "pids",
    "networks",
    "networks_per_container",
    "array_size",
)

#: Quotas that cap each container (``array_size``: each batch job) instead of being pooled
#: across the tenant. They are checked by ``reserve`` (the request must not exceed the cap)
#: but never accumulate usage. ``blkio_bps`` and ``pids`` are also what a container gets
#: when it asks for nothing (``workloads.services.specs.limits``): a tenant's defaults are
#: its plan's caps, never "unlimited".
PER_CONTAINER_QUOTAS: Final[frozenset[str]] = frozenset(
    {"blkio_bps", "pids", "networks_per_container", "array_size"}
)

#: Quotas consumed over a calendar month and reset by ``tenants.services.reset_usage``.
MONTHLY_QUOTAS: Final[frozenset[str]] = frozenset({"build_minutes_month"})

QUOTA_UNITS: Final[Mapping[str, str]] = {
    "cpu_millicores": "millicores (1000 = one vCPU)",
    "memory_mib": "MiB",
    "blkio_bps": "bytes per second per container",
    "storage_gib": "GiB",
    "containers": "running containers",
    "concurrent_jobs": "concurrently running batch jobs",
    "build_minutes_month": "build minutes per calendar month",
    "gpus": "GPUs",
    "pids": "processes (and threads) per container",
    "networks": "networks",
    "networks_per_container": "networks one container joins",
    "array_size": "runs in one batch job array",
}


@dataclass(frozen=True)
class PlanDefaults:
    """The seed values of one plan (``billing`` migration 0002 writes them as rows)."""

    code: str
    name: str
    seat_price_cents: int
    min_seats: int
    max_seats: int | None
    per_seat: Mapping[str, int]


_MIB_PER_GIB = 1024
_MB = 1024 * 1024

#: Defaults modelled on Docker's public tiers (Personal/Pro/Team/Business), in USD cents.
DEFAULT_PLANS: Final[tuple[PlanDefaults, ...]] = (
    PlanDefaults(
        code="free",
        name="Free",
        seat_price_cents=0,
        min_seats=1,
        max_seats=1,
        per_seat={
            "cpu_millicores": 1000,
            "memory_mib": 1 * _MIB_PER_GIB,
            "blkio_bps": 20 * _MB,
            "storage_gib": 5,
            "containers": 3,
            "concurrent_jobs": 1,
            "build_minutes_month": 100,
            "gpus": 0,
            "pids": 256,
            "networks": 3,
            "networks_per_container": 4,
            "array_size": 100,
        },
    ),
    PlanDefaults(
        code="pro",
        name="Pro",
        seat_price_cents=900,
        min_seats=1,
        max_seats=5,
        per_seat={
            "cpu_millicores": 4000,
            "memory_mib": 8 * _MIB_PER_GIB,
            "blkio_bps": 100 * _MB,
            "storage_gib": 50,
            "containers": 20,
            "concurrent_jobs": 5,
            "build_minutes_month": 1000,
            "gpus": 0,
            "pids": 1024,
            "networks": 5,
            "networks_per_container": 8,
            "array_size": 1000,
        },
    ),
    PlanDefaults(
        code="team",
        name="Team",
        seat_price_cents=1500,
        min_seats=2,
        max_seats=100,
        per_seat={
            "cpu_millicores": 4000,
            "memory_mib": 8 * _MIB_PER_GIB,
            "blkio_bps": 200 * _MB,
            "storage_gib": 100,
            "containers": 25,
            "concurrent_jobs": 10,
            "build_minutes_month": 1500,
            "gpus": 0,
            "pids": 1024,
            "networks": 5,
            "networks_per_container": 12,
            "array_size": 5000,
        },
    ),
    PlanDefaults(
        code="business",
        name="Business",
        seat_price_cents=2400,
        min_seats=5,
        max_seats=None,
        per_seat={
            "cpu_millicores": 8000,
            "memory_mib": 16 * _MIB_PER_GIB,
            "blkio_bps": 500 * _MB,
            "storage_gib": 250,
            "containers": 50,
            "concurrent_jobs": 20,
            "build_minutes_month": 3000,
            "gpus": 1,
            "pids": 2048,
            "networks": 10,
            "networks_per_container": 16,
            "array_size": 10000,
        },
    ),
)


def effective_quota(
    per_seat: Mapping[str, int], seats: int, overrides: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Return every quota's limit for a tenant with ``seats`` seats on a plan.

    ``per_seat`` must name every quota in :data:`QUOTA_NAMES`; ``overrides`` may name any
    subset (missing ones count as 0). Limits are never negative.
    """
    if seats < 0:
        raise ValueError(f"seats must be >= 0, got {seats}")
    overrides = overrides or {}
    unknown = set(overrides) - set(QUOTA_NAMES)
    if unknown:
        raise ValueError(f"unknown quota(s): {', '.join(sorted(unknown))}")
    limits: dict[str, int] = {}
    for name in QUOTA_NAMES:
        base = per_seat[name] if name in PER_CONTAINER_QUOTAS else per_seat[name] * seats
        limits[name] = max(0, base + overrides.get(name, 0))
    return limits
