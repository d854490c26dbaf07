"""Container start latency with and without the tenant's writable-layer filesystem.

Two agents on this machine, one with ``tenant_layer_bytes=0`` (upper dirs on the state
disk, as before #17 item 8) and one with the default (upper dirs on the tenant's loop
filesystem), each running ``busybox true`` (no network) round by round in a shuffled
order, so both see the same machine load: whole-run figures of ``bench_run.py`` taken one
after the other differ more between runs than between the two layouts on this shared
machine. Prints p50/p95 of start-to-running and of removal.
Run as root: ``python benchmarks/bench_tenant_layer.py [--runs 60]``.
"""

from __future__ import annotations

import argparse
import random
import secrets
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime_agent.agent import Agent  # noqa: E402
from runtime_agent.config import AgentConfig  # noqa: E402
from runtime_agent.images.bootstrap import bootstrap_busybox  # noqa: E402
from runtime_agent.protocol import ContainerSpec  # noqa: E402

WARM_UP = 3


def quantile(samples: list[float], q: float) -> float:
    """The ``q`` quantile of ``samples`` in milliseconds (nearest rank)."""
    ordered = sorted(samples)
    return ordered[round(q * (len(ordered) - 1))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--state", default="/var/lib/berth-bench-layer")
    args = parser.parse_args()
    from tests.agent.test_runtime_fixtures import cleanup_agent

    token = secrets.token_hex(3)
    state = Path(args.state) / token
    agents: dict[str, Agent] = {}
    for label, size in (("state disk (before)", 0), ("tenant filesystem", 10 << 30)):
        root = state / str(len(agents))
        config = AgentConfig(
            root=root / "state",
            run_root=root / "run",
            name=f"bl{len(agents)}{token}",
            tenant_layer_bytes=size,
        )
        agents[label] = Agent(config)
        bootstrap_busybox(agents[label])
    starts: dict[str, list[float]] = {label: [] for label in agents}
    removals: dict[str, list[float]] = {label: [] for label in agents}
    request = ContainerSpec(tenant="bench", image="busybox", command=("true",), network_mode="none")
    try:
        for round_number in range(args.runs + WARM_UP):
            for label in random.sample(list(agents), len(agents)):
                containers = agents[label].containers
                began = time.perf_counter()
                info = containers.run(request, watch_exit=False)
                running = time.perf_counter()
                containers.wait("bench", info.id)
                exited = time.perf_counter()
                containers.remove("bench", info.id)
                removed = time.perf_counter()
                if round_number >= WARM_UP:
                    starts[label].append(running - began)
                    removals[label].append(removed - exited)
        print(f"busybox true, no network, {args.runs} interleaved runs each:")
        for label in agents:
            print(
                f"  {label:22} start-to-running p50 {quantile(starts[label], 0.5):6.1f} ms"
                f"  p95 {quantile(starts[label], 0.95):6.1f} ms"
                f"   remove p50 {quantile(removals[label], 0.5):5.1f} ms"
            )
    finally:
        for agent in agents.values():
            cleanup_agent(agent)
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
