"""Container records on disk and the lifecycle state machine.

A record is one JSON file per container (``containers/<tenant>/<id>/record.json``),
replaced atomically. It holds what the agent decided (spec, image, status as last set)
plus what the monitor reported (exit code, OOM flag, timestamps), so any agent process —
the CLI, the worker, conmon's exit hook — sees the same container.

Lifecycle (docker's, as one table; anything not listed raises FailedPrecondition)::

    created --start--> running --pause--> paused --unpause--> running
    running/paused --exit|stop|kill--> stopped --start--> running
    created/stopped --remove--> removed    (running/paused only with force)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime_agent.errors import FailedPrecondition

CREATED = "created"
RUNNING = "running"
PAUSED = "paused"
STOPPED = "stopped"
REMOVED = "removed"

# (state, action) -> next state. "exit" is the monitor reporting the process ended.
TRANSITIONS: dict[tuple[str, str], str] = {
    (CREATED, "start"): RUNNING,
    (CREATED, "remove"): REMOVED,
    (RUNNING, "pause"): PAUSED,
    (RUNNING, "stop"): STOPPED,
    (RUNNING, "kill"): STOPPED,
    (RUNNING, "exit"): STOPPED,
    (RUNNING, "force_remove"): REMOVED,
    (PAUSED, "unpause"): RUNNING,
    (PAUSED, "stop"): STOPPED,
    (PAUSED, "kill"): STOPPED,
    (PAUSED, "exit"): STOPPED,
    (PAUSED, "force_remove"): REMOVED,
    (STOPPED, "start"): RUNNING,
    (STOPPED, "remove"): REMOVED,
    (CREATED, "force_remove"): REMOVED,
    (STOPPED, "force_remove"): REMOVED,
}

_REASONS = {
    "start": "it is {state}",
    "pause": "it is not running",
    "unpause": "it is not paused",
    "stop": "it is not running",
    "kill": "it is not running",
    "exit": "it is not running",
    "remove": "it is {state}: stop it first or force-remove it (rm -f)",
}


def transition(state: str, action: str, *, name: str = "") -> str:
    """The state after ``action``, or FailedPrecondition saying why it isn't allowed."""
    try:
        return TRANSITIONS[(state, action)]
    except KeyError:
        reason = _REASONS.get(action, "it is {state}").format(state=state)
        raise FailedPrecondition(
            f"cannot {action.replace('_', ' ')} container {name}: {reason}",
            state=state,
            action=action,
        ) from None


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ContainerRecord:
    id: str
    tenant: str
    name: str
    runc_id: str
    image: str  # the reference as asked for
    image_id: str  # config digest
    manifest_digest: str
    snapshot_key: str
    created: str
    status: str = CREATED
    spec: dict[str, Any] = field(default_factory=dict)  # protocol.to_dict(ContainerSpec)
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = ""
    hostname: str = ""
    stop_signal: int = 15
    cgroups_path: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    pid_start: int = 0  # /proc/<pid>/stat start time, so a reused pid is never mistaken
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""
    restart_count: int = 0
    manually_stopped: bool = False
    network: dict[str, Any] | None = None
    volumes: list[str] = field(default_factory=list)
    # While "creating": "<boot id> <pid> <start time>" of the process making it, so that
    # recover() in another process tells a create in progress from a crash's leftover.
    creator: str = ""

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def auto_remove(self) -> bool:
        return bool(self.spec.get("auto_remove"))

    @property
    def restart_policy(self) -> tuple[str, int]:
        policy = self.spec.get("restart") or {}
        return str(policy.get("name") or "no"), int(policy.get("max_retries") or 0)

    @property
    def image_reference(self) -> str:
        return self.image

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


FIELD_NAMES = tuple(f.name for f in fields(ContainerRecord))


class RecordStore:
    """Records under ``containers/<tenant>/<id>/`` with per-container and per-tenant locks."""

    def __init__(self, containers_dir: Path) -> None:
        self.root = containers_dir

    def dir(self, tenant: str, container_id: str) -> Path:
        return self.root / tenant / container_id

    def save(self, record: ContainerRecord) -> None:
        directory = self.dir(record.tenant, record.id)
        tmp = directory / "record.json.tmp"
        # A shallow dict: the fields are JSON values already (asdict's deep copy cost
        # ~10x more, on every save).
        tmp.write_text(json.dumps({name: getattr(record, name) for name in FIELD_NAMES}))
        os.replace(tmp, directory / "record.json")

    def load(self, tenant: str, container_id: str) -> ContainerRecord | None:
        try:
            data = json.loads((self.dir(tenant, container_id) / "record.json").read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        return ContainerRecord.from_json(data)

    def tenants(self) -> list[str]:
        try:
            return sorted(p for p in os.listdir(self.root) if not p.startswith("."))
        except FileNotFoundError:
            return []

    def all(self, tenant: str) -> list[ContainerRecord]:
        try:
            ids = os.listdir(self.root / tenant)
        except FileNotFoundError:
            return []
        records = []
        for container_id in ids:
            if container_id.startswith("."):
                continue
            record = self.load(tenant, container_id)
            if record is not None:
                records.append(record)
        return records

    @contextlib.contextmanager
    def tenant_lock(self, tenant: str) -> Iterator[None]:
        """Serialises name allocation within a tenant."""
        directory = self.root / tenant
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def lock(self, tenant: str, container_id: str) -> Iterator[None]:
        """Serialises lifecycle operations on one container across processes."""
        directory = self.dir(tenant, container_id)
        try:
            fh = open(directory / ".lock", "a")
        except FileNotFoundError:
            yield  # already removed: callers re-check the record
            return
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield
