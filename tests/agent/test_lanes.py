"""Lanes: per-tenant caps and fair turns for builds and interactive work (issue #17 item 5)."""

from __future__ import annotations

import contextlib
import functools
import threading

import pytest

from runtime_agent.errors import ResourceExhausted
from runtime_agent.lanes import FairPool, KeyedLock, TenantSlots

WAIT = 10


def test_slots_refuse_a_tenant_over_its_cap_but_admit_other_tenants() -> None:
    slots = TenantSlots("interactive", total=4, per_tenant=2)
    with contextlib.ExitStack() as held:
        held.enter_context(slots.admit("alpha"))
        held.enter_context(slots.admit("alpha"))
        with pytest.raises(ResourceExhausted, match=r"tenant alpha .*at most 2"):
            held.enter_context(slots.admit("alpha"))
        held.enter_context(slots.admit("beta"))
        held.enter_context(slots.admit("gamma"))
        assert slots.running() == 4
        with pytest.raises(ResourceExhausted, match="maximum of 4"):
            held.enter_context(slots.admit("delta"))
    assert slots.running() == 0
    with slots.admit("alpha"):
        assert slots.running("alpha") == 1


def test_a_slot_is_given_back_when_the_work_fails() -> None:
    slots = TenantSlots("interactive", total=1, per_tenant=1)
    with pytest.raises(ValueError), slots.admit("alpha"):
        raise ValueError("exec failed")
    with slots.admit("alpha"):
        pass


def test_a_busy_tenant_waits_in_its_own_queue_while_another_tenant_runs() -> None:
    pool = FairPool("build", workers=2, per_tenant=1)
    release = threading.Event()
    a_running = threading.Event()
    b_ran = threading.Event()

    def alpha_build() -> None:
        a_running.set()
        release.wait(WAIT)

    for _ in range(3):
        pool.submit("alpha", alpha_build)
    assert a_running.wait(WAIT)
    pool.submit("beta", b_ran.set)
    assert b_ran.wait(WAIT), "beta's job waited behind alpha's"
    assert pool.running("alpha") == 1
    assert pool.queued("alpha") == 2
    release.set()


def test_tenants_take_turns() -> None:
    pool = FairPool("build", workers=1, per_tenant=1)
    gate = threading.Event()
    order: list[str] = []
    done = threading.Event()
    pool.submit("alpha", lambda: gate.wait(WAIT))  # holds the only thread while we queue
    for name in ("a1", "a2", "a3"):
        pool.submit("alpha", functools.partial(order.append, name))
    pool.submit("beta", lambda: order.append("b1"))
    pool.submit("gamma", lambda: order.append("c1"))
    pool.submit("gamma", done.set)
    gate.set()
    assert done.wait(WAIT)
    assert order[:3] == ["b1", "c1", "a1"] or order[:3] == ["a1", "b1", "c1"]
    assert order.index("b1") < order.index("a2")
    assert order.index("c1") < order.index("a2")


def test_a_failing_job_does_not_stop_the_pool() -> None:
    pool = FairPool("build", workers=1, per_tenant=1)
    ran = threading.Event()

    def broken() -> None:
        raise RuntimeError("a bug")

    pool.submit("alpha", broken)
    pool.submit("alpha", ran.set)
    assert ran.wait(WAIT)


def test_a_keyed_lock_orders_one_key_and_never_holds_up_another() -> None:
    locks = KeyedLock()
    inside, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with locks.hold(("alpha", "web")):
            inside.set()
            release.wait(WAIT)
            order.append("apply")

    def second() -> None:
        with locks.hold(("alpha", "web")):
            order.append("remove")

    t1 = threading.Thread(target=first, daemon=True)
    t1.start()
    assert inside.wait(WAIT)
    t2 = threading.Thread(target=second, daemon=True)
    t2.start()
    with locks.hold(("beta", "web")):  # another container: no wait
        order.append("other")
    t2.join(0.3)
    assert t2.is_alive()
    release.set()
    t1.join(WAIT)
    t2.join(WAIT)
    assert order == ["other", "apply", "remove"]
    assert len(locks) == 0  # nothing kept for keys nobody holds
