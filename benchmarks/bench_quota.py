"""Quota admission throughput: reserve+release pairs per second on Postgres.

Side by side: one thread; N threads on ONE tenant (all contend for the same locked usage
rows — the worst case, serialised by design); N threads on N tenants (no shared rows). The
ratio contended/uncontended shows what the row lock costs. Runs in a throw-away test
database (``test_<name>`` of DATABASE_URL), dropped at the end.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/berth SECRET_KEY=x STRIPE_WEBHOOK_SECRET=x \\
        EMAIL_BACKEND=django.core.mail.backends.locmem.EmailBackend \\
        .venv/bin/python benchmarks/bench_quota.py [--threads 8] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django

django.setup()

from django.db import connection  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402

AMOUNTS = {"cpu_millicores": 100, "memory_mib": 64, "containers": 1}


def run(tenants: list, threads: int, seconds: float) -> float:
    """Reserve+release pairs per second, thread i working on tenants[i % len]."""
    from tenants import services

    actor = services.Actor.for_system("bench")
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def work(i: int) -> None:
        tenant = tenants[i % len(tenants)]
        try:
            while time.monotonic() < stop:
                r = services.reserve(tenant, AMOUNTS, actor=actor, reason="bench")
                services.release(r, actor=actor)
                counts[i] += 1
        finally:
            connection.close()

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        raise SystemExit("needs DATABASE_URL=postgres://… (row locks are the point)")
    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        from tenants import services

        actor = services.Actor.for_system("bench")
        tenants = [
            services.create_tenant(
                slug=f"bench-{i}",
                owner_email=f"o{i}@bench.example",
                plan_code="business",
                seats=100,
                actor=actor,
            )[0]
            for i in range(args.threads)
        ]
        single = run(tenants[:1], 1, args.seconds)
        contended = run(tenants[:1], args.threads, args.seconds)
        spread = run(tenants, args.threads, args.seconds)
        print(f"reserve+release pairs per second ({args.seconds:.0f} s each):")
        print(f"  1 thread, 1 tenant:                 {single:8.0f}")
        print(f"  {args.threads} threads, 1 tenant (contended):  {contended:8.0f}")
        print(f"  {args.threads} threads, {args.threads} tenants:              {spread:8.0f}")
        print(f"  contended / 1 thread:   {contended / single:.2f}x")
        print(f"  spread / contended:     {spread / contended:.2f}x")
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


if __name__ == "__main__":
    main()
