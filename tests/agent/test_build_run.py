"""RUN steps in real runc containers: layers, whiteouts, users, failures, limits, cache.

Privileged: overlay mounts, cgroups and runc. Every test checks that nothing is left
behind (no snapshot, no mount, no runc container) on success and on failure.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.build.events import BuildEvent, BuildFailed
from runtime_agent.build.steps import BuildLimits
from runtime_agent.errors import NotFound
from tests.agent.dockerfiles.support import (
    build,
    build_cgroups_removed,  # noqa: F401 - fixture
    image_tree,
    make_base,
    write_context,
)

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("build_cgroups_removed")]

T = "acme"
NO_NET = BuildLimits(network=None, step_timeout=60)


def _assert_clean(agent: Agent) -> None:
    active = agent.config.snapshots_dir / "active"
    assert not active.exists() or list(active.iterdir()) == []
    root = str(agent.config.root)
    # The tenant's writable-layer filesystem stays mounted for its next step or container
    # (as its parent cgroup stays), holding nothing of the build.
    tenant_fs = f"{agent.config.snapshots_dir}/tenants/"
    mounts = [m.split()[1] for m in Path("/proc/self/mounts").read_text().splitlines()]
    assert [m for m in mounts if root in m and not m.startswith(tenant_fs)] == []
    assert [p for m in mounts if m.startswith(tenant_fs) for p in Path(m).iterdir()] == []
    listed = subprocess.run(
        ["runc", "--root", str(agent.config.runc_root), "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(listed.stdout or "null") in (None, [])
    bundles = agent.config.run_root / "build"
    assert not bundles.exists() or list(bundles.iterdir()) == []


def _layer_names(agent: Agent, ref: str) -> list[list[str]]:
    out = []
    for layer in agent.images.resolve(T, ref).layers:
        with tarfile.open(agent.content.path(layer["digest"])) as tar:
            out.append(sorted(m.name for m in tar.getmembers()))
    return out


def _ran(events: list[BuildEvent]) -> list[str]:
    """RUN instructions that actually executed (not satisfied from the cache)."""
    cached = {e.step for e in events if e.kind == "cached"}
    return [
        e.message
        for e in events
        if e.kind == "step" and e.message.startswith("RUN") and e.step not in cached
    ]


def test_run_layers_whiteouts_users_and_output(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM busybox\n"
                "RUN mkdir -p /data && echo one > /data/one && echo two > /data/two "
                "&& chmod 640 /data/two && chown 1000:50 /data/two\n"
                "RUN rm /data/one && rm -r /tmp && echo removed\n"
                "ARG FLAVOUR=plain\n"
                "RUN echo flavour=$FLAVOUR > /flavour\n"
                "RUN mkdir -p /home/app && chown app /home/app\n"
                "USER app\nWORKDIR /home/app\n"
                'RUN ["sh", "-c", "id -u > uid; pwd > cwd"]\n'
                "RUN true\n"
            )
        },
    )
    events = build(agent, T, ctx, tag="r", limits=NO_NET)
    output = "".join(e.message for e in events if e.kind == "output")
    assert "removed" in output
    tree = image_tree(agent, T, "r")
    assert "/data/one" not in tree and "/tmp" not in tree
    assert tree["/data/two"] == ("file", 0o640, 1000, 50, "two\n")
    assert tree["/flavour"][4] == "flavour=plain\n"
    assert tree["/home/app/uid"][4] == "1000\n" and tree["/home/app/uid"][2] == 1000
    assert tree["/home/app/cwd"][4] == "/home/app\n"
    names = _layer_names(agent, "r")
    assert "data/.wh.one" in names[2] and ".wh.tmp" in names[2]
    assert not any(n in ("proc", "sys", "dev") for layer in names[1:] for n in layer)
    history = agent.images.resolve(T, "r").config["history"]
    assert history[-1]["empty_layer"] is True  # RUN true changed nothing
    assert history[5]["created_by"].startswith("|1 FLAVOUR=plain /bin/sh -c")
    _assert_clean(agent)


def test_fully_cached_rebuild_runs_no_step(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM busybox AS a\nRUN echo a > /a\n"
                "FROM busybox AS b\nRUN echo b > /b\n"
                "FROM busybox\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n"
                "ARG X=1\nRUN echo $X > /x\n"
            )
        },
    )
    first = build(agent, T, ctx, tag="m", limits=NO_NET)
    assert len(_ran(first)) == 3
    again = build(agent, T, ctx, tag="m", limits=NO_NET)
    assert _ran(again) == []
    assert not any(e.kind == "output" for e in again)
    assert again[-1].digest == first[-1].digest
    changed_arg = build(agent, T, ctx, tag="m", limits=NO_NET, build_args={"X": "2"})
    assert _ran(changed_arg) == ["RUN echo $X > /x"]
    assert image_tree(agent, T, "m")["/x"][4] == "2\n"
    assert len(_ran(build(agent, T, ctx, limits=NO_NET, no_cache=True))) == 3
    _assert_clean(agent)


def test_failing_step_reports_and_leaves_nothing(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM busybox\nRUN echo before\nRUN echo oops >&2; exit 3\nRUN echo never\n"
            )
        },
    )
    events: list[BuildEvent] = []
    with pytest.raises(BuildFailed) as info:
        for event in agent.builder.build(T, ctx, tag="broken", limits=NO_NET):
            events.append(event)
    err = info.value
    assert err.exit_code == 3
    assert "RUN echo oops >&2; exit 3" in err.instruction
    assert "oops" in err.output
    assert "returned a non-zero code: 3" in str(err) and "Dockerfile:3" in str(err)
    assert events[-1].kind == "error"
    assert "RUN echo never" not in [e.message for e in events]
    with pytest.raises(NotFound):
        agent.images.resolve(T, "broken")
    _assert_clean(agent)


def test_missing_command_fails_cleanly(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(tmp_path / "c", {"Dockerfile": 'FROM busybox\nRUN ["/no/such/binary"]\n'})
    with pytest.raises(BuildFailed) as info:
        build(agent, T, ctx, tag="nobin", limits=NO_NET)
    assert info.value.exit_code not in (0, None)
    _assert_clean(agent)


def test_step_time_limit(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(tmp_path / "c", {"Dockerfile": "FROM busybox\nRUN sleep 30\n"})
    limits = BuildLimits(network=None, step_timeout=1.5)
    with pytest.raises(BuildFailed, match="time limit"):
        build(agent, T, ctx, tag="slow", limits=limits)
    with pytest.raises(NotFound):
        agent.images.resolve(T, "slow")
    _assert_clean(agent)


def test_memory_limit(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    # 64 MiB of memory in a shell variable, under a 32 MiB limit
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM busybox\nRUN x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}\n"
            )
        },
    )
    limits = BuildLimits(network=None, memory_bytes=32 * 1024 * 1024, step_timeout=60)
    with pytest.raises(BuildFailed, match="out of memory") as info:
        build(agent, T, ctx, tag="fat", limits=limits)
    assert info.value.exit_code == 137
    _assert_clean(agent)


def test_user_not_in_image_fails(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(tmp_path / "c", {"Dockerfile": "FROM busybox\nUSER ghost\nRUN true\n"})
    with pytest.raises(NotFound, match="ghost"):
        build(agent, T, ctx, tag="ghost", limits=NO_NET)
    _assert_clean(agent)


def test_independent_stages_build_in_parallel(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM busybox AS one\nRUN sleep 1; echo 1 > /one\n"
                "FROM busybox AS two\nRUN sleep 1; echo 2 > /two\n"
                "FROM busybox\nCOPY --from=one /one /one\nCOPY --from=two /two /two\n"
            )
        },
    )
    events = build(agent, T, ctx, tag="par", limits=NO_NET)
    order = [(e.kind, e.step) for e in events if e.kind in ("step", "layer")]
    # both RUN steps (2 and 4) start before either of them finishes
    first_done = min(order.index(("layer", 2)), order.index(("layer", 4)))
    assert order.index(("step", 2)) < first_done and order.index(("step", 4)) < first_done
    tree = image_tree(agent, T, "par")
    assert tree["/one"][4] == "1\n" and tree["/two"][4] == "2\n"
    _assert_clean(agent)


def test_run_steps_use_the_tenant_network(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTH_NETWORK_POOL", "10.217.0.0/16")
    monkeypatch.setenv("BERTH_DNS_UPSTREAMS", "")
    make_base(agent, T, tmp_path)
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM busybox\n"
                "RUN ip -4 -o addr show eth0 > /addr && nslookup buildkitsandbox > /dns\n"
            )
        },
    )
    try:
        build(agent, T, ctx, tag="net", limits=BuildLimits(network="default", step_timeout=60))
        tree = image_tree(agent, T, "net")
        assert "inet 10.217." in tree["/addr"][4]
        # the tenant network's DNS (on its gateway) answered for the step's own name
        assert "Server:\t\t10.217.0.1" in tree["/dns"][4]
        assert "Address: 10.217." in tree["/dns"][4]
        assert "/etc/resolv.conf" not in tree and "/etc/hosts" not in tree
        assert agent.networks.endpoints(T) == []
        _assert_clean(agent)
    finally:
        agent.networks.teardown()


def test_run_in_a_user_namespace_keeps_container_owners(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM busybox\n"
                "RUN cat /proc/self/uid_map > /uidmap && touch /by-root "
                "&& touch /by-app && chown 1000:1000 /by-app && id -u > /whoami\n"
            )
        },
    )
    limits = BuildLimits(network=None, step_timeout=60, user_namespace=True)
    build(agent, T, ctx, tag="userns", limits=limits)
    tree = image_tree(agent, T, "userns")
    inside, outside, length = tree["/uidmap"][4].split()
    assert inside == "0" and int(outside) > 0 and int(length) >= 65536
    assert tree["/whoami"][4] == "0\n"
    assert tree["/by-root"][2:4] == (0, 0)
    assert tree["/by-app"][2:4] == (1000, 1000)
    _assert_clean(agent)


def test_recover_removes_what_a_crashed_build_left(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    image = agent.images.resolve(T, "busybox:latest")
    agent.snapshots.prepare("build-crashed0001", image)
    (agent.config.run_root / "build" / "build-crashed0001").mkdir(parents=True)
    (agent.config.build_cache_dir / ".contexts" / "berth-ctx-old").mkdir(parents=True)
    agent.snapshots.prepare("unrelated", image)  # a container's snapshot stays
    removed = agent.builder.recover()
    assert "snapshot build-crashed0001" in removed
    assert [s.key for s in agent.snapshots.list()] == ["unrelated"]
    assert list((agent.config.run_root / "build").iterdir()) == []
    assert list((agent.config.build_cache_dir / ".contexts").iterdir()) == []
    agent.snapshots.remove("unrelated")
    _assert_clean(agent)
