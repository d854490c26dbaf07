"""Operation log: makes every control-plane operation idempotent by its operation id.

Celery delivers at least once (late acks: a task whose worker died is delivered again), so
each operation the control plane sends carries an ``op_id``. The first execution records
its result here; a redelivery returns the recorded result instead of acting twice.
SQLite in WAL mode, one row per operation, pruned by age.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
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


class OperationLog:
    def __init__(self, path: Path, *, keep_seconds: float = 7 * 24 * 3600) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._keep = keep_seconds
        self._lock = threading.Lock()
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

    def run_once(
        self, op_id: str, kind: str, operation: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Run ``operation`` unless ``op_id`` already ran; return its (recorded) result.

        Only successful results and typed agent errors are recorded: a crash mid-way leaves
        no row, so the redelivered task runs again (every agent operation is itself safe to
        repeat after a crash).
        """
        with self._lock:
            previous = self.get(op_id)
            if previous is not None:
                return {**previous, "replayed": True}
            result = operation()
            self.record(op_id, kind, result)
            return result

    def prune(self) -> int:
        with self._connect() as db:
            cursor = db.execute("DELETE FROM ops WHERE done_at < ?", (time.time() - self._keep,))
            return cursor.rowcount
