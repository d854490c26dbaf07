"""OperationLog: one run per operation id, different ids side by side (issue #17 item 5).

Concurrency is observed with events: an operation that waits for another one to start
can only finish if the two really overlap."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from runtime_agent.oplog import OperationLog

WAIT = 10  # seconds an event may take; reached only when the behaviour is wrong


@pytest.fixture
def oplog(tmp_path: Path) -> OperationLog:
    return OperationLog(tmp_path / "ops.sqlite")


def _in_thread(target: Any, results: dict[str, Any], key: str) -> threading.Thread:
    def run() -> None:
        results[key] = target()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_two_deliveries_of_one_op_id_run_it_once_and_both_get_the_result(
    oplog: OperationLog,
) -> None:
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow() -> dict[str, Any]:
        calls.append("first")
        entered.set()
        assert release.wait(WAIT)
        return {"state": "running", "id": "c1"}

    def second() -> dict[str, Any]:
        calls.append("second")
        return {"state": "second ran"}

    results: dict[str, Any] = {}
    first = _in_thread(lambda: oplog.run_once("op-1", "apply", slow), results, "first")
    assert entered.wait(WAIT)
    other = _in_thread(lambda: oplog.run_once("op-1", "apply", second), results, "second")
    other.join(0.3)
    assert other.is_alive(), "the second delivery did not wait for the running one"
    assert oplog.in_flight() == ["op-1"]
    release.set()
    first.join(WAIT)
    other.join(WAIT)
    assert calls == ["first"]
    assert results["first"] == {"state": "running", "id": "c1"}
    assert results["second"] == {"state": "running", "id": "c1", "replayed": True}
    # A later redelivery replays the recorded result too.
    assert oplog.run_once("op-1", "apply", second)["replayed"] is True
    assert calls == ["first"]
    assert oplog.in_flight() == []


def test_different_op_ids_run_at_the_same_time(oplog: OperationLog) -> None:
    """Op A only finishes once op B has started: under one node-wide lock it never does."""
    a_started, b_started = threading.Event(), threading.Event()
    release_b = threading.Event()

    def op_a() -> dict[str, Any]:
        a_started.set()
        return {"saw_b": b_started.wait(WAIT)}

    def op_b() -> dict[str, Any]:
        b_started.set()
        assert release_b.wait(WAIT)
        return {"ok": True}

    results: dict[str, Any] = {}
    a = _in_thread(lambda: oplog.run_once("build:1", "build", op_a), results, "a")
    assert a_started.wait(WAIT)
    assert sorted(oplog.in_flight()) == ["build:1"]
    b = _in_thread(lambda: oplog.run_once("c2:apply:1:0", "apply", op_b), results, "b")
    a.join(WAIT + 1)
    assert results["a"] == {"saw_b": True}
    assert oplog.in_flight("apply") == ["c2:apply:1:0"]
    assert oplog.in_flight("build") == []
    release_b.set()
    b.join(WAIT)
    assert results["b"] == {"ok": True}


def test_a_crashed_run_leaves_no_record_and_a_waiting_delivery_runs_it(
    oplog: OperationLog,
) -> None:
    entered, release = threading.Event(), threading.Event()

    def crashing() -> dict[str, Any]:
        entered.set()
        assert release.wait(WAIT)
        raise RuntimeError("the agent's bug")

    results: dict[str, Any] = {}

    def first() -> Any:
        with pytest.raises(RuntimeError):
            oplog.run_once("op-9", "stop", crashing)
        return "raised"

    t1 = _in_thread(first, results, "first")
    assert entered.wait(WAIT)
    t2 = _in_thread(lambda: oplog.run_once("op-9", "stop", lambda: {"n": 2}), results, "second")
    release.set()
    t1.join(WAIT)
    t2.join(WAIT)
    assert results == {"first": "raised", "second": {"n": 2}}
    assert oplog.get("op-9") == {"n": 2}


def test_many_deliveries_of_many_ids_each_run_once(oplog: OperationLog) -> None:
    counts: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(16)

    def deliver(op: str) -> None:
        def operation() -> dict[str, Any]:
            with lock:
                counts[op] = counts.get(op, 0) + 1
            return {"op": op}

        start.wait(WAIT)
        assert oplog.run_once(op, "apply", operation)["op"] == op

    threads = [
        threading.Thread(target=deliver, args=(f"op-{i % 4}",), daemon=True) for i in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert counts == {f"op-{i}": 1 for i in range(4)}
