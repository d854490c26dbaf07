"""Operation log: makes every control-plane operation idempotent by its operation id.

Celery delivers at least once (late acks: a task whose worker died is delivered again), so
each operation the control plane sends carries an ``op_id``. The first execution records
its result here; a redelivery returns the recorded result instead of acting twice.
SQLite in WAL mode, one row per operation, pruned by age.

Operations are serialized per operation id only: a second delivery of an id that is
running right now waits for that run and gets its result, while operations with other ids
run side by side (one tenant's long build never holds up another tenant's start). The ids
running at the moment are visible through :meth:`OperationLog.in_flight`, which is how
the node report tells the control plane that a start is acknowledged and still going.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ops (
    op_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    result TEXT NOT NULL,
    done_at REAL NOT NULL
)
"""


@dataclass
class _Flight:
    """One run of an operation id in progress; later deliveries of the id wait on it."""

    kind: str
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None


class OperationLog:
    def __init__(self, path: Path, *, keep_seconds: float = 7 * 24 * 3600) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._keep = keep_seconds
        # Guards only the table of runs in progress, never an operation itself.
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=30)

    def get(self, op_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT result FROM ops WHERE op_id = ?", (op_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def record(self, op_id: str, kind: str, result: dict[str, Any]) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO ops (op_id, kind, result, done_at) VALUES (?, ?, ?, ?)",
                (op_id, kind, json.dumps(result), time.time()),
            )

    def in_flight(self, kind: str | None = None) -> list[str]:
        """The operation ids running right now (of ``kind``, when given)."""
        with self._lock:
            return [op for op, f in self._flights.items() if kind is None or f.kind == kind]

    def run_once(
        self, op_id: str, kind: str, operation: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Run ``operation`` unless ``op_id`` already ran; return its (recorded) result.

        A delivery of an id that is running at this moment waits for that run and returns
        its result (marked ``replayed``); other ids never wait for each other. Only
        successful results and typed agent errors are recorded: a crash mid-way leaves no
        row, so the redelivered task — or a delivery that was waiting — runs it again
        (every agent operation is itself safe to repeat after a crash).
        """
        while True:
            with self._lock:
                flight = self._flights.get(op_id)
                if flight is None:
                    flight = self._flights[op_id] = _Flight(kind)
                    break
            flight.done.wait()
            if flight.result is not None:
                return {**flight.result, "replayed": True}
        try:
            previous = self.get(op_id)
            if previous is not None:
                flight.result = previous
                return {**previous, "replayed": True}
            result = operation()
            self.record(op_id, kind, result)
            flight.result = result
            return result
        finally:
            # Recorded before the flight goes: a delivery that finds no flight finds the row.
            with self._lock:
                del self._flights[op_id]
            flight.done.set()

    def prune(self) -> int:
        with self._connect() as db:
            cursor = db.execute("DELETE FROM ops WHERE done_at < ?", (time.time() - self._keep,))
            return cursor.rowcount
