"""Network benchmark: what Berth's networking adds to a container start, and throughput.

    sudo .venv/bin/python benchmarks/bench_network.py [--starts 40] [--bytes 2000000000]
    sudo chrt -f 10 .venv/bin/python benchmarks/bench_network.py --attach-only

On a machine busy with other work, wall times measure the scheduler more than Berth: the
CPU time column and ``--attach-only`` under ``chrt`` (as if the machine were idle) show
what attach itself costs.

Start cost (target: networking adds <= 10 ms at p50):
  * a whole container start through the agent (``agent.containers.run``, runc + conmon)
    with ``--network none`` versus a Berth network;
  * ``attach`` alone: netns + veth into the tenant bridge + address/route + DNS record,
    then ``detach`` (timed separately, it is not on the start path);
  * ``runc run /bin/true`` in a busybox bundle, with runc making an empty netns
    (``--network none``) versus joining the netns Berth attached (``attach`` included);
  * the same pair under Docker (``docker run --network none`` / ``--network bridge``) on
    a busybox image imported with ``docker import``, when dockerd runs.
Throughput, one TCP stream of --bytes with a small static C sender/receiver (compiled
here, so every side runs the same code): host loopback, container to container on one
Berth network, container to container on Docker's default bridge.

Everything it makes (networks, bundles, docker image and containers) is removed at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime_agent.agent import Agent
from runtime_agent.config import AgentConfig
from runtime_agent.network import NetworkManager
from runtime_agent.protocol import ContainerSpec, NetworkAttachment

BLAST_C = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int c, char **v) {
  static char buf[1 << 20];
  if (c == 3 && !strcmp(v[1], "server")) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(v[2]))};
    if (bind(s, (void *)&a, sizeof a) || listen(s, 1)) { perror("bind"); return 1; }
    int f = accept(s, 0, 0); long long n = 0; ssize_t r;
    while ((r = read(f, buf, sizeof buf)) > 0) n += r;
    printf("%lld\n", n); return 0;
  }
  if (c == 5 && !strcmp(v[1], "client")) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(v[3]))};
    inet_pton(AF_INET, v[2], &a.sin_addr);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    for (int i = 0; connect(s, (void *)&a, sizeof a); i++) {
      if (i > 300) { perror("connect"); return 1; }
      usleep(10000); close(s); s = socket(AF_INET, SOCK_STREAM, 0);
    }
    long long left = atoll(v[4]);
    while (left > 0) {
      ssize_t w = write(s, buf, left < (long long)sizeof buf ? left : (long long)sizeof buf);
      if (w <= 0) return 1;
      left -= w;
    }
    return 0;
  }
  fprintf(stderr, "usage: blast server PORT | blast client IP PORT BYTES\n"); return 2;
}
"""

PORT = 5201


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def fmt(values: list[float]) -> str:
    return f"p50 {pct(values, 50):7.2f} ms   p95 {pct(values, 95):7.2f} ms   (n={len(values)})"


def make_rootfs(root: Path, blast: Path) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    shutil.copy(blast, root / "bin" / "blast")
    for applet in ("sh", "true", "sleep", "cat"):
        os.symlink("busybox", root / "bin" / applet)
    for d in ("proc", "dev", "sys", "tmp", "etc"):
        (root / d).mkdir()


def runc_bundle(bundle: Path, rootfs: Path) -> dict:
    bundle.mkdir(parents=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/true"]
    spec["root"] = {"path": str(rootfs), "readonly": True}
    return spec


def time_runc(bundle: Path, spec: dict, runc_root: Path, netns: str | None) -> float:
    namespaces = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    namespaces.append({"type": "network", "path": netns} if netns else {"type": "network"})
    spec = {**spec, "linux": {**spec["linux"], "namespaces": namespaces}}
    (bundle / "config.json").write_text(json.dumps(spec))
    name = f"bnb-{secrets.token_hex(6)}"
    start = time.perf_counter()
    subprocess.run(
        ["runc", "--root", str(runc_root), "run", "--bundle", str(bundle), name],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return (time.perf_counter() - start) * 1000


def throughput(server: list[str], client: Callable[[], list[str]], nbytes: int) -> float:
    """GB/s of one stream; server argv prints the byte count when the client is done."""
    srv = subprocess.Popen(server, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        start = time.perf_counter()
        subprocess.run(client(), check=True)
        out, _ = srv.communicate(timeout=60)
        elapsed = time.perf_counter() - start
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    if int(out.strip() or 0) != nbytes:
        raise RuntimeError(f"receiver counted {out.strip()} bytes, expected {nbytes}")
    return nbytes / elapsed / 1e9


def docker_ok() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=40)
    parser.add_argument("--docker-starts", type=int, default=10)
    parser.add_argument("--bytes", type=int, default=2_000_000_000)
    parser.add_argument(
        "--attach-only",
        action="store_true",
        help="only time attach/detach (e.g. under `chrt -f 10` on a busy machine: runc "
        "can't join cgroups as a real-time task)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, runc)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="berth-bench-net-"))
    token = secrets.token_hex(3)
    config = AgentConfig(root=work / "state", run_root=work / "run", name=f"bn{token}")
    net = NetworkManager(config, pool="10.214.0.0/16", dns_upstreams=[])
    image = f"berth-bench-busybox:{token}"
    docker_containers: list[str] = []
    have_docker = docker_ok()
    try:
        blast = work / "blast"
        (work / "blast.c").write_text(BLAST_C)
        subprocess.run(
            ["gcc", "-static", "-O2", "-o", str(blast), str(work / "blast.c")], check=True
        )
        rootfs = work / "rootfs"
        make_rootfs(rootfs, blast)
        net.create("bench", "bench")

        # -- attach / detach alone
        attach_ms, attach_cpu_ms, detach_ms = [], [], []
        for n in range(args.starts):
            container = secrets.token_hex(32)
            t0, c0 = time.perf_counter(), time.process_time()
            net.attach("bench", container, f"c{n}", [NetworkAttachment("bench")], name=f"c{n}")
            t1 = time.perf_counter()
            attach_cpu_ms.append((time.process_time() - c0) * 1000)
            net.detach("bench", container)
            t2 = time.perf_counter()
            attach_ms.append((t1 - t0) * 1000)
            detach_ms.append((t2 - t1) * 1000)

        if args.attach_only:
            print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
            print(f"  berth attach (netns+veth+addr+route+DNS) {fmt(attach_ms)}")
            print(f"  berth attach, CPU time of the agent      {fmt(attach_cpu_ms)}")
            print(f"  berth detach                              {fmt(detach_ms)}")
            return 0

        # -- runc start, empty netns vs Berth network
        spec = runc_bundle(work / "bundle", rootfs)
        runc_root = work / "runc"
        none_ms, berth_ms = [], []
        for n in range(args.starts):
            none_ms.append(time_runc(work / "bundle", spec, runc_root, None))
            container = secrets.token_hex(32)
            t0 = time.perf_counter()
            setup = net.attach(
                "bench", container, f"r{n}", [NetworkAttachment("bench")], name=f"r{n}"
            )
            attach = (time.perf_counter() - t0) * 1000
            berth_ms.append(attach + time_runc(work / "bundle", spec, runc_root, setup.netns_path))
            net.detach("bench", container)

        # -- full container start through the agent (ContainerManager), none vs bridge
        agent_none: list[float] = []
        agent_bridge: list[float] = []
        agent = Agent(config)
        agent.__dict__["networks"] = net  # the benchmark's pool and DNS settings
        try:
            from runtime_agent.images.bootstrap import bootstrap_busybox

            bootstrap_busybox(agent)
            for _ in range(args.starts // 2):
                for mode, bucket in (("none", agent_none), ("bridge", agent_bridge)):
                    container_spec = ContainerSpec(
                        tenant="bench",
                        image="busybox",
                        command=("sleep", "30"),
                        network_mode=mode,  # type: ignore[arg-type]
                        networks=(NetworkAttachment("bench"),) if mode == "bridge" else (),
                    )
                    t0 = time.perf_counter()
                    info = agent.containers.run(container_spec)
                    bucket.append((time.perf_counter() - t0) * 1000)
                    agent.containers.remove("bench", info.id, force=True)
        finally:
            for info in agent.containers.list_all():
                agent.containers.remove(info.tenant, info.id, force=True)
            agent.snapshots.remove_all_mounts()
            agent.containers.cgroups.remove_all()

        # -- docker start, none vs bridge
        docker_none: list[float] = []
        docker_bridge: list[float] = []
        if have_docker:
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(
                ["docker", "import", "-", image], stdin=tar.stdout, check=True, capture_output=True
            )
            tar.wait()
            for _ in range(args.docker_starts):
                for mode, bucket in (("none", docker_none), ("bridge", docker_bridge)):
                    t0 = time.perf_counter()
                    subprocess.run(
                        ["docker", "run", "--rm", "--network", mode, image, "/bin/true"],
                        check=True,
                        capture_output=True,
                    )
                    bucket.append((time.perf_counter() - t0) * 1000)

        # -- throughput
        loopback = throughput(
            [str(blast), "server", str(PORT)],
            lambda: [str(blast), "client", "127.0.0.1", str(PORT), str(args.bytes)],
            args.bytes,
        )
        a = net.attach("bench", secrets.token_hex(32), "a", [NetworkAttachment("bench")])
        b = net.attach("bench", secrets.token_hex(32), "b", [NetworkAttachment("bench")])
        a_ip = a.addresses["bench"].split("/")[0]
        berth = throughput(
            ["nsenter", f"--net={a.netns_path}", str(blast), "server", str(PORT)],
            lambda: [
                "nsenter",
                f"--net={b.netns_path}",
                str(blast),
                "client",
                a_ip,
                str(PORT),
                str(args.bytes),
            ],
            args.bytes,
        )
        docker_bw = None
        if have_docker:
            name = f"berth-bench-srv-{token}"
            docker_containers.append(name)
            srv_argv = [
                "docker",
                "run",
                "--rm",
                "--name",
                name,
                image,
                "/bin/blast",
                "server",
                str(PORT),
            ]

            def docker_client() -> list[str]:
                ip = ""
                for _ in range(100):
                    ip = subprocess.run(
                        ["docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", name],
                        capture_output=True,
                        text=True,
                    ).stdout.strip()
                    if ip:
                        break
                    time.sleep(0.05)
                return [
                    "docker",
                    "run",
                    "--rm",
                    image,
                    "/bin/blast",
                    "client",
                    ip,
                    str(PORT),
                    str(args.bytes),
                ]

            docker_bw = throughput(srv_argv, docker_client, args.bytes)

        load = os.getloadavg()[0]
        print(
            f"networking cost on container start (target: <= 10 ms p50), "
            f"{os.cpu_count()} CPUs, load average {load:.1f}"
        )
        print(f"  berth attach (netns+veth+addr+route+DNS) {fmt(attach_ms)}")
        print(f"  berth attach, CPU time of the agent      {fmt(attach_cpu_ms)}")
        print(f"  berth detach                              {fmt(detach_ms)}")
        print(f"  runc run true, runc's empty netns         {fmt(none_ms)}")
        print(f"  runc run true, berth network (attach+run) {fmt(berth_ms)}")
        added = pct(berth_ms, 50) - pct(none_ms, 50)
        print(f"  => berth networking adds {added:6.2f} ms at p50 over an empty netns")
        print(f"  agent run (create+start), --network none  {fmt(agent_none)}")
        print(f"  agent run (create+start), berth network   {fmt(agent_bridge)}")
        aadded = pct(agent_bridge, 50) - pct(agent_none, 50)
        print(f"  => through the agent, berth networking adds {aadded:6.2f} ms at p50")
        if have_docker:
            print(f"  docker run --network none                 {fmt(docker_none)}")
            print(f"  docker run --network bridge               {fmt(docker_bridge)}")
            dadded = pct(docker_bridge, 50) - pct(docker_none, 50)
            print(f"  => docker bridge networking adds {dadded:6.2f} ms at p50")
        print(f"throughput, one TCP stream of {args.bytes / 1e9:.1f} GB")
        print(f"  host loopback                   {loopback:6.2f} GB/s  (1.00)")
        print(f"  berth, container to container   {berth:6.2f} GB/s  ({berth / loopback:.2f})")
        if docker_bw is not None:
            print(
                f"  docker bridge, container to container {docker_bw:6.2f} GB/s  "
                f"({docker_bw / loopback:.2f}); berth/docker {berth / docker_bw:.2f}"
            )
        return 0
    finally:
        net.teardown()
        for name in docker_containers:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        if have_docker:
            subprocess.run(["docker", "rmi", "-f", image], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
