"""Scheduler benchmark: place 10,000 containers on 1,000 nodes (target: under 1 s).

    .venv/bin/python benchmarks/bench_scheduler.py

Prints the median and worst of several runs for two shapes: many small services (1,000
services × 10 replicas) and a few large ones (20 × 500), with a fifth of the nodes labelled
and some requests constrained to those labels.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workloads.scheduling import NodeCapacity, PlacementRequest, place


def fleet(count: int, rng: random.Random) -> list[NodeCapacity]:
    return [
        NodeCapacity(
            id=f"node-{i}",
            cpu_millicores=rng.choice([8000, 16000, 32000]),
            memory_mib=rng.choice([16384, 32768, 65536]),
            gpus=2 if i % 50 == 0 else 0,
            labels={"zone": "a" if i % 5 == 0 else "b"},
        )
        for i in range(count)
    ]


def workload(services: int, replicas: int, rng: random.Random) -> list[PlacementRequest]:
    requests = []
    for s in range(services):
        cpu = rng.choice([100, 250, 500, 1000])
        memory = rng.choice([128, 256, 512, 1024])
        constraints = {"zone": "a"} if s % 7 == 0 else {}
        for r in range(replicas):
            requests.append(PlacementRequest(f"s{s}-r{r}", f"s{s}", cpu, memory, 0, constraints))
    return requests


def main() -> None:
    rng = random.Random(7)
    nodes = fleet(1000, rng)
    for services, replicas in [(1000, 10), (20, 500)]:
        requests = workload(services, replicas, rng)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            result = place(requests, nodes)
            times.append(time.perf_counter() - start)
        placed = len(result.assignments)
        print(
            f"{len(requests)} containers ({services} services x {replicas}) on {len(nodes)} nodes:"
            f" median {statistics.median(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms,"
            f" placed {placed}, unplaced {len(result.unplaced)} (target < 1000 ms)"
        )


if __name__ == "__main__":
    main()
