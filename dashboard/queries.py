"""Read-only helpers for pages: log tails from nodes, charts from stored usage readings.

Nothing here writes. Log tails ask the container's node through the same dispatch call
the API's ``logs`` endpoint uses; graphs come from ``billing.UsageReading`` rows, which
node reports feed (one row per container reading, source ``<node id>/<container id>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone

from billing.models import UsageReading
from tenants.errors import BerthError
from workloads.api.views import _container_logs
from workloads.choices import ContainerState
from workloads.models import BatchJob, Container, Service

#: Seconds the dashboard waits for a node's answer before saying it is unavailable.
NODE_ANSWER_SECONDS = 5
CHART_WIDTH, CHART_HEIGHT = 600, 160
COLOURS = ("#1d4ed8", "#b45309", "#047857", "#7e22ce", "#be123c", "#0e7490")


def live_containers(service: Service) -> list[Container]:
    """Replicas the service has on nodes now (not removed, not lost), oldest first."""
    return list(
        service.containers.exclude(state__in=[ContainerState.REMOVED, ContainerState.LOST])
        .select_related("node", "tenant")
        .order_by("created_at")
    )


def service_logs(service: Service, *, tail: int = 200) -> tuple[list[dict[str, Any]], list[str]]:
    """The last lines of every live replica, merged by time, and the problems met."""
    lines: list[dict[str, Any]] = []
    problems: list[str] = []
    for container in live_containers(service):
        if container.node is None or container.state not in (
            ContainerState.RUNNING,
            ContainerState.EXITED,
        ):
            continue
        try:
            for line in _container_logs(container, tail=tail, since=None):
                text = str(line.get("line", "")).rstrip("\n")
                lines.append({**line, "line": text, "replica": container.agent_name})
        except BerthError as exc:
            problems.append(f"{container.agent_name}: {exc.message}")
    lines.sort(key=lambda line: line.get("time", ""))
    return lines[-tail:], problems


def job_logs(job: BatchJob, index: int) -> dict[str, Any]:
    """Output of the latest run of one index: kept on the run once ended, else live."""
    run = job.runs.filter(index=index).order_by("-attempt").first()
    if run is None:
        return {"run": None, "text": "", "problem": ""}
    if run.log:
        return {"run": run, "text": run.log, "problem": ""}
    container = Container.objects.filter(job_run=run).select_related("node", "tenant").first()
    if container is None or container.state != ContainerState.RUNNING:
        return {"run": run, "text": "", "problem": ""}
    try:
        lines = _container_logs(container, tail=1000, since=None)
    except BerthError as exc:
        return {"run": run, "text": "", "problem": exc.message}
    text = "\n".join(str(line.get("line", "")).rstrip("\n") for line in lines)
    return {"run": run, "text": text, "problem": ""}


@dataclass
class Series:
    label: str
    colour: str
    points: list[tuple[datetime, float]]


@dataclass
class Chart:
    """An inline SVG line chart, laid out on the server."""

    title: str
    unit: str
    series: list[Series]
    start: datetime
    end: datetime
    peak: float
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT

    @property
    def empty(self) -> bool:
        return not any(s.points for s in self.series)

    def polylines(self) -> list[dict[str, str]]:
        span = max((self.end - self.start).total_seconds(), 1.0)
        top = self.peak or 1.0
        out = []
        for s in self.series:
            coords = " ".join(
                f"{(at - self.start).total_seconds() / span * self.width:.1f},"
                f"{self.height - value / top * (self.height - 8):.1f}"
                for at, value in s.points
            )
            out.append({"label": s.label, "colour": s.colour, "points": coords})
        return out

    def summary(self) -> str:
        """Text equivalent of the chart for screen readers."""
        if self.empty:
            return f"{self.title}: no readings yet"
        parts = [
            f"{s.label} latest {s.points[-1][1]:.0f} {self.unit}" for s in self.series if s.points
        ]
        return f"{self.title}: " + "; ".join(parts) + f"; peak {self.peak:.0f} {self.unit}"


def usage_charts(service: Service, *, minutes: int = 30) -> tuple[Chart, Chart]:
    """CPU (millicores, from the cumulative counter's slope) and memory (MiB) per replica.

    The time axis runs from the first reading in the window (at most ``minutes`` ago, at
    least one minute wide) to now, so a young service's lines are not squeezed to the edge.
    """
    end = timezone.now()
    start = end - timedelta(minutes=minutes)
    containers = list(
        service.containers.filter(created_at__lte=end)
        .exclude(finished_at__lt=start)
        .order_by("created_at")
    )
    cpu_series, mem_series = [], []
    cpu_peak = mem_peak = 0.0
    for i, container in enumerate(containers[: len(COLOURS)]):
        readings = list(
            UsageReading.objects.filter(
                tenant_id=service.tenant_id,
                source__endswith=f"/{container.pk}",
                read_at__gte=start,
            )
            .order_by("read_at")
            .values_list("read_at", "cpu_usage_ns", "memory_bytes")[:2000]
        )
        cpu_points: list[tuple[datetime, float]] = []
        mem_points: list[tuple[datetime, float]] = []
        previous = None
        for at, cpu_ns, mem in readings:
            mem_points.append((at, mem / (1024 * 1024)))
            if previous is not None:
                seconds = (at - previous[0]).total_seconds()
                if seconds > 0 and cpu_ns >= previous[1]:
                    cpu_points.append((at, (cpu_ns - previous[1]) / seconds / 1_000_000))
            previous = (at, cpu_ns)
        label = container.agent_name
        colour = COLOURS[i]
        cpu_series.append(Series(label, colour, cpu_points))
        mem_series.append(Series(label, colour, mem_points))
        cpu_peak = max([cpu_peak, *(v for _, v in cpu_points)])
        mem_peak = max([mem_peak, *(v for _, v in mem_points)])
    first = min((s.points[0][0] for s in mem_series if s.points), default=start)
    start = min(max(start, first), end - timedelta(minutes=1))
    return (
        Chart("CPU", "millicores", cpu_series, start, end, cpu_peak),
        Chart("Memory", "MiB", mem_series, start, end, mem_peak),
    )
