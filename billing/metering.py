"""Usage metering arithmetic: pure functions from cgroup readings to billable quantities.

Five metrics are billed above what a plan's seats include each month:

=====================  =============================  ====================================
metric                 from                           how
=====================  =============================  ====================================
cpu_seconds            cgroup cpuacct/cpu.stat usage  counter delta between two readings
memory_gib_hours       memory usage (bytes)           trapezoid of the two readings × time
gpu_hours              GPUs attached                  earlier reading's count × time
storage_gib_hours      volume/rootfs bytes            trapezoid of the two readings × time
build_minutes          a finished build               its wall-clock minutes, once per build
=====================  =============================  ====================================

A gap longer than :data:`MAX_INTERVAL_SECONDS` between two readings of one container only
counts that long for the gauges: Berth does not bill for time it did not observe. A CPU
counter lower than the previous reading means the container restarted, so the new value is
counted from zero.

Nothing here touches the database; :mod:`billing.services` stores readings and ledger rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Final

METRICS: Final[tuple[str, ...]] = (
    "cpu_seconds",
    "memory_gib_hours",
    "gpu_hours",
    "storage_gib_hours",
    "build_minutes",
)

METRIC_UNITS: Final[Mapping[str, str]] = {
    "cpu_seconds": "vCPU-seconds",
    "memory_gib_hours": "GiB-hours of memory",
    "gpu_hours": "GPU-hours",
    "storage_gib_hours": "GiB-hours of storage",
    "build_minutes": "build minutes",
}

#: Price of one unit above the included amount, in cents.
OVERAGE_CENTS_PER_UNIT: Final[Mapping[str, Decimal]] = {
    "cpu_seconds": Decimal("0.0012"),  # $0.0432 per vCPU-hour
    "memory_gib_hours": Decimal("0.5"),  # $0.005 per GiB-hour
    "gpu_hours": Decimal("150"),  # $1.50 per GPU-hour
    "storage_gib_hours": Decimal("0.02"),  # ~$0.15 per GiB-month
    "build_minutes": Decimal("0.8"),  # $0.008 per build minute
}

#: Usage included per seat per calendar month, by plan code. Build minutes come from the
#: plan's own ``build_minutes_month`` so the quota and the allowance never disagree.
INCLUDED_PER_SEAT: Final[Mapping[str, Mapping[str, Decimal]]] = {
    "free": {
        "cpu_seconds": Decimal(36_000),
        "memory_gib_hours": Decimal(72),
        "gpu_hours": Decimal(0),
        "storage_gib_hours": Decimal(3_650),
    },
    "pro": {
        "cpu_seconds": Decimal(360_000),
        "memory_gib_hours": Decimal(720),
        "gpu_hours": Decimal(0),
        "storage_gib_hours": Decimal(36_500),
    },
    "team": {
        "cpu_seconds": Decimal(540_000),
        "memory_gib_hours": Decimal(1_080),
        "gpu_hours": Decimal(0),
        "storage_gib_hours": Decimal(73_000),
    },
    "business": {
        "cpu_seconds": Decimal(1_080_000),
        "memory_gib_hours": Decimal(2_160),
        "gpu_hours": Decimal(20),
        "storage_gib_hours": Decimal(182_500),
    },
}

MAX_INTERVAL_SECONDS: Final[int] = 600
GIB: Final[int] = 1024**3
_NS_PER_SECOND: Final[Decimal] = Decimal(1_000_000_000)
_SIX_PLACES: Final[Decimal] = Decimal("0.000001")


@dataclass(frozen=True)
class Reading:
    """What the agent read from one container's cgroup at one moment (epoch seconds)."""

    at: float
    cpu_usage_ns: int
    memory_bytes: int
    gpus: int = 0
    storage_bytes: int = 0


@dataclass(frozen=True)
class Contribution:
    cpu_seconds: Decimal
    memory_gib_hours: Decimal
    gpu_hours: Decimal
    storage_gib_hours: Decimal


def contribution(previous: Reading | None, current: Reading) -> Contribution:
    """Usage between ``previous`` and ``current`` readings of the same container.

    The first reading of a container counts its CPU counter from zero (cgroups start at
    zero when the container is created) and no gauge time (there is no interval yet).
    """
    if previous is None:
        cpu_ns = current.cpu_usage_ns
        seconds = Decimal(0)
    else:
        if current.at <= previous.at:
            raise ValueError("readings must be in time order")
        cpu_ns = current.cpu_usage_ns - previous.cpu_usage_ns
        if cpu_ns < 0:  # counter went backwards: the container restarted
            cpu_ns = current.cpu_usage_ns
        seconds = Decimal(str(min(current.at - previous.at, MAX_INTERVAL_SECONDS)))
    hours = seconds / 3600
    prev = previous or current
    mem = Decimal(prev.memory_bytes + current.memory_bytes) / 2 / GIB
    storage = Decimal(prev.storage_bytes + current.storage_bytes) / 2 / GIB
    return Contribution(
        cpu_seconds=_q(Decimal(cpu_ns) / _NS_PER_SECOND),
        memory_gib_hours=_q(mem * hours),
        gpu_hours=_q(Decimal(prev.gpus) * hours),
        storage_gib_hours=_q(storage * hours),
    )


def included_usage(plan_code: str, build_minutes_per_seat: int, seats: int) -> dict[str, Decimal]:
    """Usage a tenant's seats include this month, per metric."""
    per_seat = INCLUDED_PER_SEAT.get(plan_code, INCLUDED_PER_SEAT["pro"])
    included = {metric: per_seat[metric] * seats for metric in per_seat}
    included["build_minutes"] = Decimal(build_minutes_per_seat) * seats
    return included


@dataclass(frozen=True)
class MetricCharge:
    metric: str
    used: Decimal
    included: Decimal
    overage: Decimal
    cents: Decimal


def overage_charges(
    used: Mapping[str, Decimal], included: Mapping[str, Decimal]
) -> list[MetricCharge]:
    """Per metric: what was used, what is included, the excess and its price in cents."""
    charges = []
    for metric in METRICS:
        u = used.get(metric, Decimal(0))
        inc = included.get(metric, Decimal(0))
        over = max(Decimal(0), u - inc)
        charges.append(
            MetricCharge(
                metric=metric,
                used=u,
                included=inc,
                overage=over,
                cents=over * OVERAGE_CENTS_PER_UNIT[metric],
            )
        )
    return charges


def whole_cents(amount: Decimal) -> int:
    """Round down to a whole cent: Berth never bills a fraction it cannot show."""
    return int(amount.to_integral_value(rounding=ROUND_FLOOR))


def _q(value: Decimal) -> Decimal:
    return value.quantize(_SIX_PLACES)
