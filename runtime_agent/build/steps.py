"""How a RUN step executes: behind a small interface so the builder's other steps never
depend on the container runtime.

``StepRunner.run_step`` prepares a snapshot of the parent layers, runs the command in a
container with the build's limits and network, captures the snapshot's change as a layer
and removes the snapshot on every path (success, failure, timeout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class BuildLimits:
    """Caps for one build: every RUN step gets these (docker build's --cpus/--memory)."""

    cpus: float = 1.0
    memory_bytes: int = 1024**3
    pids: int = 1024
    step_timeout: float = 600.0  # wall time of one RUN step
    build_timeout: float = 3600.0  # wall time of the whole build
    context_bytes: int = 2 * 1024**3
    network: str | None = None  # tenant network name for RUN steps; None = no network
    user_namespace: bool = False  # RUN as the tenant's unprivileged host id range


@dataclass
class RunRequest:
    tenant: str
    key: str  # unique snapshot / container key for this step
    layers: list[dict[str, Any]]  # parent layer descriptors, bottom first
    argv: list[str]
    env: list[str]
    user: str
    workdir: str
    limits: BuildLimits
    on_output: Callable[[bytes], None] = field(default=lambda _data: None)


@dataclass
class RunResult:
    exit_code: int
    layer: dict[str, Any] | None  # None when the step changed nothing
    timed_out: bool = False
    oom_killed: bool = False


class StepRunner(Protocol):
    def run_step(self, request: RunRequest) -> RunResult: ...
