"""Lanes: how tenants share a node's worker threads without one holding up the others.

The Celery worker's threads carry the node's lifecycle operations (apply, stop, remove,
volumes, networks); work a tenant can make long is kept off them:

- :class:`FairPool` runs builds on threads of its own. Each tenant has its own FIFO queue,
  tenants are served round-robin, and at most ``per_tenant`` of one tenant's jobs run at
  once: a tenant with ten queued builds waits behind itself, never in front of another.
- :class:`TenantSlots` admits interactive work (exec, logs, stats), which the control
  plane waits for and which therefore runs on the Celery thread that received it: at most
  ``total`` at once on the node and ``per_tenant`` per tenant. Work over a cap is refused
  at once with :class:`~runtime_agent.errors.ResourceExhausted` (never queued on a shared
  thread), so the worker always keeps threads for lifecycle operations.
- :class:`KeyedLock` keeps the operations on one container in order: with operations no
  longer behind one node-wide lock, a remove must still wait for the apply of the same
  container that is under way, or the apply would create what was just removed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from runtime_agent.errors import ResourceExhausted

log = logging.getLogger("berth.agent.lanes")


class TenantSlots:
    """Counts running work per tenant and refuses what goes over a cap."""

    def __init__(self, name: str, *, total: int, per_tenant: int) -> None:
        if total < 1 or per_tenant < 1:
            raise ValueError("lane caps must be at least 1")
        self.name = name
        self.total = total
        self.per_tenant = per_tenant
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()

    def running(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._running[tenant] if tenant is not None else self._running.total()

    @contextlib.contextmanager
    def admit(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s slots for the ``with`` body, or raise ResourceExhausted."""
        with self._lock:
            if self._running[tenant] >= self.per_tenant:
                raise ResourceExhausted(
                    f"too many {self.name} operations of tenant {tenant} at once on this node "
                    f"(at most {self.per_tenant}); retry when one has finished"
                )
            if self._running.total() >= self.total:
                raise ResourceExhausted(
                    f"this node is running its maximum of {self.total} {self.name} "
                    "operations; retry shortly"
                )
            self._running[tenant] += 1
        try:
            yield
        finally:
            with self._lock:
                self._running[tenant] -= 1
                if not self._running[tenant]:
                    del self._running[tenant]


class FairPool:
    """``workers`` threads serving per-tenant FIFO queues round-robin, at most
    ``per_tenant`` jobs of one tenant at a time. Threads start on first use."""

    def __init__(self, name: str, *, workers: int, per_tenant: int) -> None:
        if workers < 1 or per_tenant < 1:
            raise ValueError("lane caps must be at least 1")
        self.name = name
        self.workers = workers
        self.per_tenant = per_tenant
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Callable[[], object]]] = {}
        self._turns: deque[str] = deque()  # tenants with queued jobs, next turn first
        self._running: Counter[str] = Counter()
        self._threads: list[threading.Thread] = []

    def submit(self, tenant: str, job: Callable[[], object]) -> None:
        """Queue ``job`` behind ``tenant``'s earlier jobs; it runs on one of the pool's threads."""
        with self._cond:
            queue = self._queues.setdefault(tenant, deque())
            queue.append(job)
            if tenant not in self._turns:
                self._turns.append(tenant)
            if len(self._threads) < self.workers:
                thread = threading.Thread(
                    target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._cond.notify()

    def queued(self, tenant: str) -> int:
        with self._cond:
            return len(self._queues.get(tenant, ()))

    def running(self, tenant: str) -> int:
        with self._cond:
            return self._running[tenant]

    def _next(self) -> tuple[str, Callable[[], object]] | None:
        """The first tenant in turn order that is under its cap, and its oldest job."""
        for tenant in list(self._turns):
            if self._running[tenant] >= self.per_tenant:
                continue
            queue = self._queues[tenant]
            job = queue.popleft()
            self._turns.remove(tenant)
            if queue:
                self._turns.append(tenant)  # its next job waits for the other tenants' turns
            else:
                del self._queues[tenant]
            self._running[tenant] += 1
            return tenant, job
        return None

    def _serve(self) -> None:
        while True:
            with self._cond:
                picked = self._next()
                while picked is None:
                    self._cond.wait()
                    picked = self._next()
            tenant, job = picked
            try:
                job()
            except Exception:  # a job reports its own outcome; the pool must survive a bug
                log.exception("a %s job of tenant %s failed", self.name, tenant)
            finally:
                with self._cond:
                    self._running[tenant] -= 1
                    if not self._running[tenant]:
                        del self._running[tenant]
                    self._cond.notify_all()


@dataclass
class _Held:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class KeyedLock:
    """One lock per key (a container's tenant and name), made on first use and dropped
    when nobody holds or waits for it. Different keys never wait for each other."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[Hashable, _Held] = {}

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._lock:
            held = self._held.setdefault(key, _Held())
            held.users += 1
        try:
            with held.lock:
                yield
        finally:
            with self._lock:
                held.users -= 1
                if not held.users:
                    del self._held[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
