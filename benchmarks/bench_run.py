"""Container start latency and idle memory: Berth side by side with bare runc and docker.

Measures, over ``--runs`` runs each (default 50):

  cli      whole ``berth-agent run --rm busybox true`` commands (default bridge network,
           and ``--network none``) vs ``docker run --rm <same busybox> true``: served by
           the agent's resident CLI server (``berth-agent serve``, as on a node where the
           worker runs; docker's CLI likewise needs dockerd running), and cold, in-process
           (``BERTH_NO_SERVER=1``: Python start-up and every import paid by the command)
  api      the Python API: ``agent.containers.run(spec)`` until the container is running
           (start-to-running) and until ``wait`` returns (run-to-exit), vs bare
           ``runc run`` of a default ``runc spec`` bundle on the same rootfs; and
           run-to-exit on the tenant's default bridge network (a recycled netns)
  steady   the served CLI and docker again, each ``--steady`` times in a row (4 blocks,
           alternating): every tool in its own steady state, as a CI job runs them
  memory   host memory per idle container: PSS of each container's conmon, vs the PSS
           of docker's containerd-shim per container
  moves    moving a fresh process into a new cgroup, as runc does at every start, and
           whether the host's cgroup2 hierarchy has ``favordynmods`` (the agent sets it)
  floor    what any Python CLI pays before doing anything: this venv's interpreter
           starting (``python -c pass``, site hooks included; ``python -S -c pass``, as
           ``berth-agent-py`` starts it, which ``berth-agent``, the native client, runs
           when there is no server, and which is ``berth-agent`` where the native
           client couldn't be built) and importing the modules ``run``
           needs, for reading the CLI figures

and prints p50/p95 and the ratios against the targets (CLI <= 1/5 of docker, API within
1.5x of bare runc, <= 2 MB per idle container). The API target compares against runc
running the very config.json Berth wrote, alone: the agent's own cost. The ratio against
a default ``runc spec`` bundle is printed too: that bundle has no seccomp filter, no /etc
binds and no overlay rootfs, whose cost is runc's, not the agent's.
Run as root: ``python benchmarks/bench_run.py``. Docker's image is Berth's busybox rootfs
loaded with ``docker import``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime_agent.agent import Agent  # noqa: E402
from runtime_agent.cgroups import CGROUP_ROOT, cgroup2_mounts  # noqa: E402
from runtime_agent.config import AgentConfig  # noqa: E402
from runtime_agent.images.bootstrap import bootstrap_busybox, busybox_rootfs_tar, find_busybox  # noqa: E402
from runtime_agent.protocol import ContainerSpec  # noqa: E402

DOCKER_IMAGE = "berth-bench/busybox:latest"
# What `berth-agent run` imports before it touches a container.
RUN_PATH_IMPORTS = (
    "import runtime_agent.cli.main, runtime_agent.cli.containers, runtime_agent.agent,"
    " runtime_agent.runtime.manager, runtime_agent.runtime.spec, runtime_agent.runtime.security,"
    " runtime_agent.images.store, runtime_agent.snapshots.snapshotter, runtime_agent.cgroups.v1"
)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return p50, p95


def interleaved(
    runs: int, variants: dict[str, Callable[[], object]], warmup: int = 2
) -> dict[str, list[float]]:
    """Each variant once per round, in a new order every round (seeded): a fixed order
    favours whatever runs right after a similar command (warm caches, a spare just
    rehearsed) and penalises what follows docker or a pause."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    shuffler = random.Random(1)
    for round_number in range(warmup + runs):
        order = list(variants)
        shuffler.shuffle(order)
        for name in order:
            action = variants[name]
            started = time.perf_counter()
            action()
            if round_number >= warmup:
                samples[name].append(time.perf_counter() - started)
    return samples


def check(command: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, capture_output=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr.decode()[-500:]}")


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def row(name: str, samples: list[float]) -> tuple[float, float]:
    p50, p95 = percentiles(samples)
    print(f"  {name:<46} p50 {p50 * 1000:8.1f} ms   p95 {p95 * 1000:8.1f} ms")
    return p50, p95


def cgroup_moves(config: AgentConfig, runs: int) -> list[float]:
    """How long moving a fresh process into a new cgroup takes (s), as runc does for
    each container: the first write after a quiet spell, where the kernel may wait for
    an RCU grace period (see ``cgroups.favor_dynamic_moves``)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        base = CGROUP_ROOT
    else:
        base = CGROUP_ROOT / "memory"
    group = base / f"{config.name}-move"
    group.mkdir(exist_ok=True)
    taken = []
    try:
        for _ in range(runs):
            sleeper = subprocess.Popen(["sleep", "60"])
            time.sleep(0.05)
            started = time.perf_counter()
            (group / "cgroup.procs").write_text(str(sleeper.pid))
            taken.append(time.perf_counter() - started)
            sleeper.kill()
            sleeper.wait()
    finally:
        for _ in range(300):  # a killed sleeper leaves the cgroup a moment after wait()
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.01)
    return taken


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--idle", type=int, default=10, help="idle containers for memory")
    parser.add_argument("--state", default="/var/lib/berth-bench")
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument(
        "--steady",
        type=int,
        default=15,
        help="also time the served CLI and docker each N times in a row (4 alternating "
        "blocks; 0: skip)",
    )
    args = parser.parse_args()

    state = Path(args.state)
    config = AgentConfig(root=state / "state", run_root=state / "run", name="bbench")
    agent = Agent(config)
    bootstrap_busybox(agent)
    env = dict(os.environ, BERTH_ROOT=str(config.root), BERTH_RUN_ROOT=str(config.run_root),
               BERTH_AGENT_NAME=config.name)  # fmt: skip
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a deployed agent has its bytecode cached
    env.pop("BERTH_NO_SERVER", None)
    cold_env = dict(env, BERTH_NO_SERVER="1")
    berth = [str(Path(sys.executable).with_name("berth-agent"))]
    docker = shutil.which("docker") and not args.no_docker
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=state))
    results: dict[str, tuple[float, float]] = {}
    server = subprocess.Popen([*berth, "serve"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (config.run_root / "cli.sock").exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("berth-agent serve did not start")
            time.sleep(0.05)
        rootfs_tar = scratch / "rootfs.tar"
        with open(rootfs_tar, "wb") as out:
            busybox_rootfs_tar(find_busybox(), out)
        if docker:
            with open(rootfs_tar, "rb") as tar_in:
                subprocess.run(["docker", "import", "-", DOCKER_IMAGE], stdin=tar_in,
                               capture_output=True, check=True)  # fmt: skip

        # Bare runc: a default `runc spec` bundle on the same rootfs.
        bundle = scratch / "bundle"
        (bundle / "rootfs").mkdir(parents=True)
        with tarfile.open(rootfs_tar) as tar:
            tar.extractall(bundle / "rootfs")  # noqa: S202 - our own tar
        check(["runc", "spec", "--bundle", str(bundle)])
        spec_path = bundle / "config.json"
        oci = json.loads(spec_path.read_text())
        oci["process"]["terminal"] = False
        oci["process"]["args"] = ["true"]
        spec_path.write_text(json.dumps(oci))
        runc_root = scratch / "runc"
        counter = iter(range(10**6))

        def bare_runc() -> None:
            check(["runc", "--root", str(runc_root), "run", "--bundle", str(bundle),
                   f"bench{next(counter)}"])  # fmt: skip

        # Bare runc on the very config.json Berth generates (Docker's seccomp profile,
        # masked paths, cgroups, limits): what runc itself costs for a Berth container.
        containers = agent.containers
        template = containers.create(
            ContainerSpec(tenant="bench", image="busybox", command=("true",), network_mode="none")
        )
        same = scratch / "same-config"
        same.mkdir()
        berth_config = json.loads(
            (containers.store.dir("bench", template.id) / "config.json").read_text()
        )
        berth_config["linux"]["cgroupsPath"] = f"/{config.name}/bench/bare"
        (same / "config.json").write_text(json.dumps(berth_config))

        def bare_runc_same_config() -> None:
            check(["runc", "--root", str(runc_root), "run", "--bundle", str(same),
                   f"bench{next(counter)}"])  # fmt: skip

        api_start: list[float] = []
        api_exit: list[float] = []

        def api_run() -> None:
            started = time.perf_counter()
            request = ContainerSpec(
                tenant="bench", image="busybox", command=("true",), network_mode="none"
            )
            info = containers.run(request, watch_exit=False)
            running = time.perf_counter()
            containers.wait("bench", info.id)
            done = time.perf_counter()
            containers.remove("bench", info.id)
            api_start.append(running - started)
            api_exit.append(done - started)

        api_bridge: list[float] = []

        def api_run_bridge() -> None:  # the tenant's default network (a recycled netns)
            started = time.perf_counter()
            request = ContainerSpec(tenant="bench", image="busybox", command=("true",))
            info = containers.run(request, watch_exit=False)
            containers.wait("bench", info.id)
            api_bridge.append(time.perf_counter() - started)
            containers.remove("bench", info.id)

        # What the control plane's containers get since #17: the tenant's user namespace
        # (idmapped rootfs, the tenant's kept userns; a fresh netns is made inside it).
        api_userns: list[float] = []
        api_userns_bridge: list[float] = []

        def api_run_userns(taken: list[float], network_mode: str) -> None:
            started = time.perf_counter()
            request = ContainerSpec(tenant="bench", image="busybox", command=("true",),
                                    network_mode=network_mode, user_namespace=True)  # type: ignore[arg-type]  # fmt: skip
            info = containers.run(request, watch_exit=False)
            containers.wait("bench", info.id)
            taken.append(time.perf_counter() - started)
            containers.remove("bench", info.id)

        variants: dict[str, Callable[[], object]] = {
            "api_userns": lambda: api_run_userns(api_userns, "none"),
            "api_userns_bridge": lambda: api_run_userns(api_userns_bridge, "bridge"),
            "runc": bare_runc,
            "runc_same": bare_runc_same_config,
            "api": api_run,
            "api_bridge": api_run_bridge,
            "cli": lambda: check([*berth, "run", "--rm", "busybox", "true"], env),
            "cli_none": lambda: check(
                [*berth, "run", "--rm", "--network", "none", "busybox", "true"], env
            ),
            "cold": lambda: check([*berth, "run", "--rm", "busybox", "true"], cold_env),
            "cold_none": lambda: check(
                [*berth, "run", "--rm", "--network", "none", "busybox", "true"], cold_env
            ),
            "python": lambda: check([sys.executable, "-c", "pass"], env),
            "python_s": lambda: check([sys.executable, "-S", "-c", "pass"], env),
            "imports": lambda: check([sys.executable, "-c", RUN_PATH_IMPORTS], env),
        }
        if docker:
            variants["docker"] = lambda: check(["docker", "run", "--rm", DOCKER_IMAGE, "true"])
        # Round by round (each in a shuffled order), so every variant sees the same
        # machine load (others share it) and no variant always follows the same one.
        samples = interleaved(args.runs, variants)
        containers.remove("bench", template.id)
        api_start, api_exit, api_bridge = api_start[2:], api_exit[2:], api_bridge[2:]
        api_userns, api_userns_bridge = api_userns[2:], api_userns_bridge[2:]

        print(f"Latency over {args.runs} interleaved runs (after 2 warm-up rounds)")
        print("Python API vs bare runc (busybox true, no network):")
        results["runc"] = row("runc run (bare, default runc spec)", samples["runc"])
        results["runc_same"] = row("runc run (bare, Berth's config.json)", samples["runc_same"])
        results["api_start"] = row("agent.containers.run() start-to-running", api_start)
        results["api_exit"] = row("agent.containers.run() + wait() run-to-exit", api_exit)
        results["api_bridge"] = row("same, on the default bridge network", api_bridge)
        results["api_userns"] = row("run-to-exit in the tenant's user namespace", api_userns)
        results["api_userns_bridge"] = row("same, on the default bridge network",
                                           api_userns_bridge)  # fmt: skip
        print("Whole commands (berth-agent served by `berth-agent serve`):")
        results["cli"] = row("berth-agent run --rm busybox true", samples["cli"])
        results["cli_none"] = row("berth-agent run --rm --network none busybox true",
                                  samples["cli_none"])  # fmt: skip
        results["cold"] = row("same, cold (in-process)", samples["cold"])
        results["cold_none"] = row("same with --network none, cold", samples["cold_none"])
        if docker:
            results["docker"] = row("docker run --rm busybox true", samples["docker"])
        steady: dict[str, list[float]] = {}
        if docker and args.steady:
            # Each command in a row, as a CI job runs them: every tool in its own steady
            # state (caches warm with its own work), blocks alternating.
            commands = {
                "cli": variants["cli"],
                "cli_none": variants["cli_none"],
                "docker": variants["docker"],
            }
            steady = {name: [] for name in commands}
            for _block in range(4):
                for name, action in commands.items():
                    taken = interleaved(args.steady, {name: action}, warmup=1)[name]
                    steady[name] += taken
            print(f"Steady state ({args.steady} in a row, 4 alternating blocks):")
            results["steady_cli"] = row("berth-agent run --rm busybox true", steady["cli"])
            results["steady_cli_none"] = row("same with --network none", steady["cli_none"])
            results["steady_docker"] = row("docker run --rm busybox true", steady["docker"])
        print("Floor of any Python CLI here:")
        results["python"] = row("python -c pass (this venv, site hooks)", samples["python"])
        results["python_s"] = row("python -S -c pass (berth-agent-py's start)", samples["python_s"])
        results["imports"] = row("python -c 'import <run path modules>'", samples["imports"])

        moves = cgroup_moves(config, runs=20)
        mode = "on" if any("favordynmods" in opts for _, opts in cgroup2_mounts()) else "off"
        print(f"Moving a process into a new cgroup, first write after 50 ms idle "
              f"(favordynmods {mode}):")  # fmt: skip
        p50, p95 = percentiles(moves)
        print(f"  cgroup.procs write, as runc's at every start   p50 {p50 * 1000:8.2f} ms   "
              f"p95 {p95 * 1000:8.2f} ms")  # fmt: skip

        print(f"Host memory per idle container ({args.idle} idle `sleep` containers):")
        ids = [
            containers.run(ContainerSpec(tenant="bench", image="busybox",
                                         command=("sleep", "3600"), network_mode="none")).id
            for _ in range(args.idle)
        ]  # fmt: skip
        time.sleep(1)
        from runtime_agent.runtime.manager import monitor_rss_pids

        monitors = monitor_rss_pids(containers)
        berth_kib = sum(pss_kib(pid) for pid in monitors) / max(1, len(monitors))
        print(f"  berth (conmon PSS)                              {berth_kib / 1024:6.2f} MiB")
        for container_id in ids:
            containers.remove("bench", container_id, force=True)
        docker_kib = None
        if docker:
            names = [f"berth-bench-idle-{i}" for i in range(args.idle)]
            for name in names:
                check(["docker", "run", "-d", "--name", name, DOCKER_IMAGE, "sleep", "3600"])
            time.sleep(1)
            shims = set()
            for name in names:
                pid = subprocess.run(
                    ["docker", "inspect", "-f", "{{.State.Pid}}", name],
                    capture_output=True, text=True, check=True,
                ).stdout.strip()  # fmt: skip
                with open(f"/proc/{pid}/stat") as stat_file:
                    shims.add(int(stat_file.read().rsplit(")", 1)[1].split()[1]))
            docker_kib = sum(pss_kib(pid) for pid in shims) / args.idle
            print(f"  docker (containerd-shim PSS)                    {docker_kib / 1024:6.2f} MiB")
            subprocess.run(["docker", "rm", "-f", *names], capture_output=True, check=False)

        print("Ratios (target):")
        api = results["api_exit"][0] / results["runc"][0]
        same_ratio = results["api_exit"][0] / results["runc_same"][0]
        # The target is the agent's own cost: runc running the same container alone.
        # runc's default spec has no seccomp filter and fewer mounts, which Berth's
        # containers must have (Docker's profile alone costs runc 2-4 ms here).
        print(f"  API run-to-exit / bare runc run of the same config.json, p50  "
              f"{same_ratio:5.2f}x   (<= 1.5x)")  # fmt: skip
        print(f"  API run-to-exit / bare runc run of a default runc spec, p50   "
              f"{api:5.2f}x   (reference)")  # fmt: skip
        if docker:
            cli = results["cli"][0] / results["docker"][0]
            cli_none = results["cli_none"][0] / results["docker"][0]
            cold = results["cold"][0] / results["docker"][0]
            cold_none = results["cold_none"][0] / results["docker"][0]
            print(f"  berth-agent run --rm / docker run --rm, p50  {cli:5.2f}    (<= 0.20)")
            print(f"  same with --network none, p50                {cli_none:5.2f}    (<= 0.20)")
            print(f"  cold (no server) / docker, p50               {cold:5.2f}")
            print(f"  cold with --network none / docker, p50       {cold_none:5.2f}")
            if steady:
                ratio = results["steady_cli"][0] / results["steady_docker"][0]
                ratio_none = results["steady_cli_none"][0] / results["steady_docker"][0]
                print(f"  steady state: run --rm / docker, p50         {ratio:5.2f}    (<= 0.20)")
                print(f"  steady state, --network none, p50            {ratio_none:5.2f}")
            floor = results["imports"][0] / results["docker"][0]
            print(f"  interpreter + imports alone / docker, p50    {floor:5.2f}")
        print(f"  host memory per idle container               {berth_kib / 1024:5.2f} MiB (<= 2)")
        if docker_kib:
            print(f"  berth / docker idle memory                   {berth_kib / docker_kib:5.2f}")
    finally:
        server.terminate()
        server.wait(timeout=10)
        from runtime_agent.network.manager import NetworkManager
        from tests.agent.test_runtime_fixtures import cleanup_agent

        cleanup_agent(agent)
        NetworkManager(config).teardown()  # the CLI runs' default network, its daemon and rules
        shutil.rmtree(scratch, ignore_errors=True)
        if docker:
            subprocess.run(["docker", "rmi", DOCKER_IMAGE], capture_output=True, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
