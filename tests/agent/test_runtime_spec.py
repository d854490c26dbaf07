"""OCI config generation: docker's merge of image defaults, user lookup inside the
image (hostile symlinks included), command lookup, resources, rlimits, state table."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from runtime_agent.errors import (
    CommandNotFound,
    CommandNotRunnable,
    FailedPrecondition,
    InvalidArgument,
)
from runtime_agent.protocol import ContainerSpec, Limits
from runtime_agent.runtime import spec as oci
from runtime_agent.runtime.state import TRANSITIONS, transition

IMAGE = {
    "Entrypoint": ["/entry.sh"],
    "Cmd": ["serve", "--port", "80"],
    "Env": ["PATH=/app/bin:/bin", "MODE=prod"],
    "WorkingDir": "/app",
    "User": "app",
    "StopSignal": "SIGQUIT",
}


def _spec(**kwargs: object) -> ContainerSpec:
    return ContainerSpec(tenant="t", image="img", **kwargs)  # type: ignore[arg-type]


def test_image_defaults_apply_when_nothing_is_overridden() -> None:
    p = oci.merge_image_config(_spec(), IMAGE, "h1")
    assert p.args == ["/entry.sh", "serve", "--port", "80"]
    assert p.env == ["PATH=/app/bin:/bin", "MODE=prod", "HOSTNAME=h1"]
    assert (p.cwd, p.user, p.stop_signal) == ("/app", "app", 3)


def test_overrides_follow_docker_rules() -> None:
    p = oci.merge_image_config(_spec(command=("debug",)), IMAGE, "h")
    assert p.args == ["/entry.sh", "debug"]
    p = oci.merge_image_config(_spec(entrypoint=("sh",)), IMAGE, "h")
    assert p.args == ["sh"]  # --entrypoint drops the image's Cmd
    p = oci.merge_image_config(_spec(entrypoint=(), command=("ls", "-l")), IMAGE, "h")
    assert p.args == ["ls", "-l"]
    p = oci.merge_image_config(
        _spec(env={"MODE": "dev", "X": "1"}, workdir="/w", user="0:0", stop_signal="9"), IMAGE, "h"
    )
    assert "MODE=dev" in p.env and "X=1" in p.env and "MODE=prod" not in p.env
    assert (p.cwd, p.user, p.stop_signal) == ("/w", "0:0", 9)
    with pytest.raises(InvalidArgument, match="no command"):
        oci.merge_image_config(_spec(), {}, "h")
    with pytest.raises(InvalidArgument, match="absolute"):
        oci.merge_image_config(_spec(workdir="rel"), IMAGE, "h")
    with pytest.raises(InvalidArgument, match="signal"):
        oci.merge_image_config(_spec(stop_signal="SIGNOPE"), IMAGE, "h")


def _rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1001:\nstaff:x:50:app,other\n")
    tool = root / "bin" / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (root / "bin" / "data").write_text("not a program")
    (root / "bin" / "link").symlink_to("/bin/tool")
    return root


def test_user_lookup_in_the_image(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    assert oci.lookup_user(root, "app") == oci.ResolvedUser(1000, 1001, (50,), "/home/app")
    assert oci.lookup_user(root, "app:staff") == oci.ResolvedUser(1000, 50, (), "/home/app")
    assert oci.lookup_user(root, "") == oci.ResolvedUser(0, 0, (), "/root")
    assert oci.lookup_user(root, "4242:7") == oci.ResolvedUser(4242, 7, (), "/")
    with pytest.raises(InvalidArgument, match="unable to find user ghost"):
        oci.lookup_user(root, "ghost")
    with pytest.raises(InvalidArgument, match="unable to find group"):
        oci.lookup_user(root, "app:ghosts")


def test_hostile_symlinks_never_reach_host_files(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    secret = tmp_path / "host-passwd"
    secret.write_text("ghost:x:0:0:::\n")
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to(f"../../../../../..{secret}")
    # The link is resolved inside the rootfs, where that path doesn't exist.
    with pytest.raises(InvalidArgument, match="unable to find user ghost"):
        oci.lookup_user(root, "ghost")
    assert oci.resolve_in_root(root, "/etc/passwd") == root / secret.relative_to("/")
    assert oci.resolve_in_root(root, "/bin/link") == root / "bin" / "tool"


def test_command_lookup_gives_docker_exit_code_errors(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    env = ["PATH=/usr/bin:/bin"]
    oci.find_command(root, "tool", env, "/")
    oci.find_command(root, "/bin/link", env, "/")
    oci.find_command(root, "../bin/tool", env, "/etc")
    with pytest.raises(CommandNotFound, match="not found in \\$PATH"):
        oci.find_command(root, "missing", env, "/")
    with pytest.raises(CommandNotFound):
        oci.find_command(root, "/bin/missing", env, "/")
    with pytest.raises(CommandNotRunnable, match="permission denied"):
        oci.find_command(root, "/bin/data", env, "/")
    with pytest.raises(CommandNotRunnable, match="directory"):
        oci.find_command(root, "/etc", env, "/")


def test_resources_and_limit_validation() -> None:
    limits = Limits(
        cpus=0.5, cpu_shares=512, memory_bytes=32 << 20, pids=64, device_write_bps=1 << 20
    )
    res = oci.linux_resources(limits, "254:0")
    assert res["memory"] == {"limit": 32 << 20, "swap": 32 << 20, "disableOOMKiller": False}
    assert res["cpu"] == {"quota": 50000, "period": 100000, "shares": 512}
    assert res["pids"] == {"limit": 64}
    assert res["blockIO"] == {
        "throttleWriteBpsDevice": [{"major": 254, "minor": 0, "rate": 1 << 20}]
    }
    with pytest.raises(InvalidArgument, match="no block device"):
        oci.linux_resources(Limits(device_read_bps=1), None)
    for bad, flag in (
        (Limits(cpus=-1), "--cpus"),
        (Limits(cpus=(os.cpu_count() or 1) + 1), "--cpus"),
        (Limits(memory_bytes=1024), "--memory"),
        (Limits(pids=0), "--pids-limit"),
        (Limits(cpu_shares=1), "--cpu-shares"),
        (Limits(device_write_bps=0), "--device-write-bps"),
    ):
        with pytest.raises(InvalidArgument, match=flag):
            oci.validate_limits(bad)


def test_rlimits_stay_within_the_hosts_hard_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    (nofile,) = oci.rlimits()
    assert nofile["type"] == "RLIMIT_NOFILE"
    assert nofile["soft"] == nofile["hard"]
    assert hard == resource.RLIM_INFINITY or nofile["hard"] <= hard


def test_config_has_the_standard_mounts_and_namespaces(tmp_path: Path) -> None:
    p = oci.merge_image_config(_spec(command=("true",)), {}, "h")
    config = oci.build_config(
        rootfs=tmp_path,
        process=p,
        user=oci.ResolvedUser(0, 0, (), "/root"),
        hostname="h",
        cgroups_path="/b/t/c",
        resources={},
        netns_path="/run/netns/x",
        network_mode="bridge",
        extra_mounts=[],
        cgroup_namespace=False,
    )
    destinations = [m["destination"] for m in config["mounts"]]
    for target in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"):
        assert target in destinations
    sys_mount = next(m for m in config["mounts"] if m["destination"] == "/sys")
    assert "ro" in sys_mount["options"]
    assert {"type": "network", "path": "/run/netns/x"} in config["linux"]["namespaces"]
    assert "HOME=/root" in config["process"]["env"]
    assert config["linux"]["cgroupsPath"] == "/b/t/c"
    assert "oomScoreAdj" not in config["process"]
    assert "CAP_SYS_RESOURCE" not in str(config)


def test_state_table_refuses_illegal_moves() -> None:
    assert transition("created", "start") == "running"
    assert transition("running", "pause") == "paused"
    assert transition("paused", "unpause") == "running"
    assert transition("running", "exit") == "stopped"
    assert transition("stopped", "start") == "running"
    for state, action in (
        ("created", "pause"),
        ("stopped", "stop"),
        ("paused", "pause"),
        ("running", "remove"),
        ("running", "start"),
    ):
        assert (state, action) not in TRANSITIONS
        with pytest.raises(FailedPrecondition):
            transition(state, action, name="x")
