"""Registry benchmark: push and pull of a ~500 MB multi-layer image over loopback by the
agent's distribution client, side by side with skopeo against the same registry.

    sudo .venv/bin/python benchmarks/bench_registry.py [--mb 500] [--layers 5] [--runs 5]
        [--workdir /var/tmp]

The image has ``--layers`` gzip tar layers of random (incompressible) data.
Each measurement gets a fresh docker-registry process (filesystem storage, no auth) on a
new port, so no side sees blobs the other pushed and skopeo's blob-info cache cannot turn
an upload into a cross-repository mount:
  push  agent: content store → registry     skopeo: OCI layout dir → registry
  pull  agent: registry → a fresh content store (verified, recorded in the image store)
        skopeo: registry → a fresh OCI layout dir
Both read and write the same disk. Target: the agent within 1.2x of skopeo's time.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime_agent.agent import Agent
from runtime_agent.config import AgentConfig
from runtime_agent.distribution import pull, push
from tests.registry_process import skopeo, start_registry, write_oci_layout

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def make_layers(workdir: Path, total_mb: int, count: int) -> list[tuple[Path, str]]:
    """gzip tar layers (as registries hold them), each one file of random bytes.

    Returns (blob path, diff id)."""
    layers = []
    size = total_mb * 1024 * 1024 // count
    for i in range(count):
        path = workdir / f"layer{i}.tar.gz"
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"data/blob{i}")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
        diff_id = "sha256:" + hashlib.sha256(raw.getbuffer()).hexdigest()
        with gzip.open(path, "wb", compresslevel=1) as out:
            out.write(raw.getbuffer())
        layers.append((path, diff_id))
    return layers


def oci_layout(workdir: Path, layers: list[tuple[Path, str]]) -> Path:
    """An OCI layout with the same layer blobs (for skopeo's push)."""
    layout = workdir / "layout"
    write_oci_layout(layout, [(path.read_bytes(), diff_id) for path, diff_id in layers])
    return layout


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def measure(who: str, workdir: Path, source: Agent, layout: Path) -> tuple[float, float, float]:
    """(push s, pull s, pull s until durable) of one side against a fresh registry.

    Between push and pull the page cache is flushed (``sync``, untimed) so the pull never
    pays for writeback the push left behind. The agent's content store fsyncs every blob
    before publishing it; the third figure adds an fsync of every file skopeo wrote, for
    a like-for-like durable pull."""
    registry = start_registry(workdir / "registry", auth=False)
    ref = f"{registry.host}/bench/app:1"
    try:
        if who == "agent":
            source.images.tag("bench", "bench:1", ref)
            dest = Agent(AgentConfig(root=workdir / "dest", run_root=workdir / "run", name="bbreg"))
            start = time.perf_counter()
            push(source, "bench", ref)
            push_s = time.perf_counter() - start
            os.sync()
            start = time.perf_counter()
            pull(dest, "bench", ref)
            pull_s = durable_s = time.perf_counter() - start
        else:
            start = time.perf_counter()
            pushed = skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}", f"docker://{ref}")
            push_s = time.perf_counter() - start
            assert pushed.returncode == 0, pushed.stderr
            os.sync()
            start = time.perf_counter()
            pulled = skopeo(
                "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{workdir / 'dest'}"
            )
            pull_s = time.perf_counter() - start
            assert pulled.returncode == 0, pulled.stderr
            fsync_tree(workdir / "dest")
            durable_s = time.perf_counter() - start
        return push_s, pull_s, durable_s
    finally:
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--workdir",
        default="/var/tmp",
        help="where the registry storage, the agent's stores and skopeo's output live "
        "(e.g. /dev/shm to take the disk out of the comparison)",
    )
    args = parser.parse_args()
    if shutil.which("skopeo") is None or shutil.which("docker-registry") is None:
        print("needs skopeo and docker-registry")
        return 1

    base = Path(tempfile.mkdtemp(prefix="berth-bench-registry-", dir=args.workdir))
    try:
        layers = make_layers(base, args.mb, args.layers)
        layout = oci_layout(base, layers)
        source = Agent(AgentConfig(root=base / "agent-src", run_root=base / "run", name="bbreg"))
        descriptors = []
        for path, _ in layers:
            with open(path, "rb") as fh:
                digest, _ = source.content.ingest(fh)
            descriptors.append({"mediaType": LAYER_GZIP, "digest": digest})
        source.images.commit("bench", "bench:1", {"config": {"Cmd": ["/bin/true"]}}, descriptors)
        total = sum(p.stat().st_size for p, _ in layers)
        print(f"image: {args.layers} layers, {total / 1e6:.0f} MB, {args.runs} runs each")

        results: dict[str, list[float]] = {
            f"{who} {op}": []
            for who in ("agent", "skopeo")
            for op in ("push", "pull", "durable pull")
        }
        for run in range(args.runs):
            for who in ("agent", "skopeo") if run % 2 == 0 else ("skopeo", "agent"):
                push_s, pull_s, durable_s = measure(who, base / f"run-{run}-{who}", source, layout)
                results[f"{who} push"].append(push_s)
                results[f"{who} pull"].append(pull_s)
                results[f"{who} durable pull"].append(durable_s)

        print(
            f"{'':13}{'agent s':>9}{'skopeo s':>10}{'ratio':>8}{'agent MB/s':>12}"
            "   runs (agent | skopeo)"
        )
        for op in ("push", "pull", "durable pull"):
            agent_runs, skopeo_runs = results[f"agent {op}"], results[f"skopeo {op}"]
            agent_s, skopeo_s = statistics.median(agent_runs), statistics.median(skopeo_runs)
            spread = " ".join(f"{t:.2f}" for t in agent_runs) + " | "
            spread += " ".join(f"{t:.2f}" for t in skopeo_runs)
            print(
                f"{op:13}{agent_s:9.2f}{skopeo_s:10.2f}{agent_s / skopeo_s:7.2f}x"
                f"{total / 1e6 / agent_s:12.0f}   {spread}"
            )
        print("target: ratio <= 1.20 (agent time / skopeo time, medians); the agent's pull is")
        print('always durable (fsync per blob), so "durable pull" compares like with like')
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
