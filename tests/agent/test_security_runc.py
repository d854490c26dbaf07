"""Security defaults measured inside real containers started with bare ``runc run``.

Each test builds a bundle from busybox-static (plus the host's /usr mounted read-only, so
a real Python can issue raw system calls inside the container), applies
``apply_security_defaults`` and looks at what the containerised process actually gets.
These check the spec pieces on their own, independently of the runtime's
ContainerManager.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime_agent.config import AgentConfig
from runtime_agent.runtime.security import (
    DEFAULT_CAPABILITIES,
    DEFAULT_DEVICE_NODES,
    IdRange,
    apply_security_defaults,
    apply_user_namespace,
    capability_mask,
    ensure_traversable,
    shift_ownership,
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
]

HOST_PYTHON = Path("/usr/bin/python3")
RunFn = Callable[..., subprocess.CompletedProcess[str]]


def build_rootfs(rootfs: Path) -> None:
    """busybox plus mount points for the host's /usr (read-only, for python3)."""
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "touch", "mount", "mknod", "id", "stat", "grep"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    for d in ("usr", "proc", "sys", "dev", "tmp", "etc", "mnt"):
        (rootfs / d).mkdir()
    (rootfs / "lib").symlink_to("usr/lib")
    (rootfs / "lib64").symlink_to("usr/lib64")
    (rootfs / "tmp").chmod(0o1777)


@pytest.fixture
def run_container(agent_config: AgentConfig) -> Iterator[RunFn]:
    """Run one command in a fresh hardened container; returns the completed process.

    Bundles live under the agent's state root (bundle<N>/rootfs), not under pytest's
    0700 tmp dir, so a user-namespaced container root can traverse to its rootfs.
    """
    counter = iter(range(1000))
    runc = shutil.which("runc") or "runc"
    started: list[str] = []

    def run(
        script: str,
        *,
        python: bool = False,
        read_only: bool = False,
        user_namespace: IdRange | None = None,
        mutate: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        n = next(counter)
        bundle = agent_config.root / f"bundle{n}"
        rootfs = bundle / "rootfs"
        build_rootfs(rootfs)
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        if python:
            args = [str(HOST_PYTHON), "-c", textwrap.dedent(script)]
        else:
            args = ["/bin/sh", "-c", script]
        spec["process"].update(terminal=False, args=args)
        spec["root"]["path"] = str(rootfs)
        spec["mounts"].append(
            {
                "destination": "/usr",
                "type": "bind",
                "source": "/usr",
                "options": ["rbind", "ro", "nosuid", "nodev"],
            }
        )
        runc_id = f"{agent_config.name}-sec{n}"
        spec["linux"]["cgroupsPath"] = f"/{runc_id}"
        apply_security_defaults(spec, read_only_rootfs=read_only, user_namespace=user_namespace)
        if user_namespace is not None:
            shift_ownership(rootfs, user_namespace)
            ensure_traversable(rootfs)
        if mutate is not None:
            mutate(spec)
        (bundle / "config.json").write_text(json.dumps(spec))
        started.append(runc_id)
        return subprocess.run(
            [
                "runc",
                "--root",
                str(agent_config.runc_root),
                "run",
                "--bundle",
                str(bundle),
                runc_id,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    try:
        yield run
    finally:
        for runc_id in started:
            subprocess.run(
                [runc, "--root", str(agent_config.runc_root), "delete", "--force", runc_id],
                capture_output=True,
                check=False,
            )
        for runc_id in started:
            for controller in Path("/sys/fs/cgroup").iterdir():
                leftover = controller / runc_id
                if leftover.is_dir():
                    leftover.rmdir()


def status_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def test_container_gets_exactly_the_default_capabilities(run_container: RunFn) -> None:
    result = run_container("cat /proc/self/status")
    assert result.returncode == 0, result.stderr
    status = status_fields(result.stdout)
    expected = capability_mask(DEFAULT_CAPABILITIES)
    assert expected == 0xA80425FB  # Docker's well-known default set
    assert int(status["CapEff"], 16) == expected
    assert int(status["CapPrm"], 16) == expected
    assert int(status["CapBnd"], 16) == expected
    assert int(status["CapInh"], 16) == 0
    assert int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def test_container_cannot_mount_or_write_proc_sys(run_container: RunFn) -> None:
    result = run_container(
        "mount -t tmpfs none /mnt; echo mount=$?;"
        " echo 1 > /proc/sys/kernel/panic_on_oops; echo sysctl=$?;"
        " echo h > /proc/sysrq-trigger; echo sysrq=$?"
    )
    out = result.stdout
    assert "mount=0" not in out and "mount=" in out
    assert "sysctl=0" not in out and "sysctl=" in out
    assert "sysrq=0" not in out and "sysrq=" in out
    assert "Read-only file system" in result.stderr


def test_masked_paths_show_nothing(run_container: RunFn) -> None:
    host_timer_list = Path("/proc/timer_list").read_text()
    assert host_timer_list  # the host has content there; the container must not
    result = run_container(
        "wc -c < /proc/timer_list; ls -A /sys/firmware | wc -l;"
        " if [ -e /proc/kcore ]; then wc -c < /proc/kcore; else echo nokcore; fi"
    )
    assert result.returncode == 0, result.stderr
    timer_bytes, firmware_entries, kcore = result.stdout.split()
    assert timer_bytes == "0"
    assert firmware_entries == "0"
    assert kcore in ("0", "nokcore")  # this kernel has no /proc/kcore at all
    if Path("/proc/kcore").exists():
        assert kcore == "0"


def test_only_default_device_nodes_and_cgroup_denies_others(run_container: RunFn) -> None:
    result = run_container(
        "ls /dev; mknod /tmp/sda b 8 0 && echo mknod-ok;"
        " cat /tmp/sda > /dev/null; echo read=$?;"
        " echo x > /dev/null; echo null=$?"
    )
    lines = result.stdout.split()
    char_nodes = {
        f"/dev/{name}" for name in lines if not name.startswith(("mknod", "read", "null"))
    }
    # Directories and symlinks runc adds (fd, pts, shm, mqueue, stdio links) aside, the
    # only device nodes are the default ones.
    extra = (
        char_nodes
        - set(DEFAULT_DEVICE_NODES)
        - {
            "/dev/fd",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/dev/stdin",
            "/dev/stdout",
            "/dev/stderr",
            "/dev/core",
        }
    )
    assert not extra
    assert "mknod-ok" in lines  # CAP_MKNOD is in the default set...
    assert "read=0" not in lines  # ...but the device cgroup refuses to open the disk
    assert "null=0" in lines
    assert "Operation not permitted" in result.stderr


SECCOMP_PROBE = """
    import ctypes, errno, json, os, socket
    libc = ctypes.CDLL(None, use_errno=True)
    NR = {"unshare": 272, "keyctl": 250, "add_key": 248, "clone3": 435, "clone": 56,
          "personality": 135, "ptrace": 101, "mount": 165, "bpf": 321, "reboot": 169,
          "open_by_handle_at": 304}
    def call(name, *args):
        ctypes.set_errno(0)
        rc = libc.syscall(NR[name], *[ctypes.c_ulong(a) for a in args])
        return 0 if rc >= 0 else errno.errorcode[ctypes.get_errno()]
    out = {
        "unshare_user": call("unshare", 0x10000000),
        "unshare_ns": call("unshare", 0x00020000),
        "keyctl": call("keyctl", 0, 0),
        "add_key": call("add_key", 0, 0, 0, 0, 0),
        "clone3": call("clone3", 0, 0),
        "clone_newuser": call("clone", 0x10000000 | 17, 0, 0, 0, 0),
        "personality_query": call("personality", 0xffffffff),
        "personality_addr_no_randomize": call("personality", 0x0040000),
        "mount": call("mount", 0, 0, 0, 0, 0),
        "bpf": call("bpf", 0, 0, 0),
        "reboot": call("reboot", 0, 0, 0, 0),
        "open_by_handle_at": call("open_by_handle_at", 0, 0, 0),
    }
    for fam_name, family in (("inet", socket.AF_INET), ("unix", socket.AF_UNIX),
                             ("alg", 38), ("vsock", 40)):
        try:
            socket.socket(family, socket.SOCK_STREAM if family != 38 else 5).close()
            out["socket_" + fam_name] = 0
        except OSError as exc:
            out["socket_" + fam_name] = errno.errorcode[exc.errno]
    pid = os.fork()  # plain clone without namespace flags must keep working
    if pid == 0:
        os._exit(7)
    out["fork_exit"] = os.waitpid(pid, 0)[1] >> 8
    print(json.dumps(out))
"""


@pytest.mark.skipif(not HOST_PYTHON.exists(), reason="needs /usr/bin/python3 on the host")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
def test_seccomp_profile_denies_namespace_and_kernel_calls(run_container: RunFn) -> None:
    result = run_container(SECCOMP_PROBE, python=True)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["unshare_user"] == "EPERM"
    assert seen["unshare_ns"] == "EPERM"
    assert seen["keyctl"] == "EPERM"
    assert seen["add_key"] == "EPERM"
    assert seen["clone3"] == "ENOSYS"  # so glibc falls back to clone
    assert seen["clone_newuser"] == "EPERM"
    assert seen["personality_query"] == 0
    assert seen["personality_addr_no_randomize"] == "EPERM"
    assert seen["mount"] == "EPERM"
    assert seen["bpf"] == "EPERM"
    assert seen["reboot"] == "EPERM"
    assert seen["open_by_handle_at"] == "EPERM"
    assert seen["socket_inet"] == 0
    assert seen["socket_unix"] == 0
    assert seen["socket_alg"] == "EPERM"
    assert seen["socket_vsock"] == "EPERM"
    assert seen["fork_exit"] == 7


def test_read_only_rootfs(run_container: RunFn) -> None:
    rw = run_container("touch /made-here && echo wrote")
    assert "wrote" in rw.stdout
    ro = run_container("touch /made-here && echo wrote; touch /tmp/x && echo tmp", read_only=True)
    assert "wrote" not in ro.stdout
    assert "Read-only file system" in ro.stderr


def test_user_namespace_maps_root_to_unprivileged_range(
    run_container: RunFn, agent_config: AgentConfig
) -> None:
    ids = IdRange(start=3_000_000, size=65536)
    result = run_container(
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; touch /owned && stat -c %u /owned;"
        " cat /proc/self/status | grep CapEff",
        user_namespace=ids,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["0", "3000000", "65536"]
    assert lines[1].split() == ["0", "3000000", "65536"]
    assert lines[2] == "0"  # root inside...
    assert lines[3] == "0"
    assert int(lines[4].split()[1], 16) == capability_mask(DEFAULT_CAPABILITIES)
    # ...but on the host the file belongs to the tenant's unprivileged id.
    owned = agent_config.root / "bundle0" / "rootfs" / "owned"
    assert owned.stat().st_uid == 3_000_000
    assert owned.stat().st_gid == 3_000_000


def test_user_namespace_joining_a_prepared_netns(
    run_container: RunFn, agent_config: AgentConfig
) -> None:
    # The network subsystem prepares a container's netns before runc runs; a user
    # namespace can't mount a fresh sysfs for a netns it doesn't own, so /sys becomes the
    # host's, recursively read-only (and still masked).
    netns = f"{agent_config.name}-userns"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    ids = IdRange(start=3_100_000, size=65536)

    def join_netns(spec: dict[str, Any]) -> None:
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = f"/run/netns/{netns}"
        apply_user_namespace(spec, ids)

    try:
        result = run_container(
            "cat /proc/self/uid_map; ls -A /sys/firmware | wc -l;"
            " echo 1 > /sys/kernel/mm/ksm/run && echo wrote-sys;"
            " ls /sys/kernel >/dev/null && echo ok",
            user_namespace=ids,
            mutate=join_netns,
        )
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0].split() == ["0", "3100000", "65536"]
    assert lines[1] == "0"
    assert "wrote-sys" not in result.stdout and "ok" in lines
    assert "Read-only file system" in result.stderr


X32_PROBE = """
    import ctypes, errno, json, os, signal, sys
    libc = ctypes.CDLL(None, use_errno=True)
    X32 = 0x40000000
    out = {}
    for name, nr in (("getpid", 39), ("x32_getpid", X32 | 39), ("x32_read", X32 | 0),
                     ("x32_mount", X32 | 165), ("x32_unshare", X32 | 272)):
        pid = os.fork()  # each probe in a child: a filter may kill the caller
        if pid == 0:
            ctypes.set_errno(0)
            rc = libc.syscall(nr, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
            os._exit(0 if rc >= 0 else min(ctypes.get_errno(), 200))
        status = os.waitpid(pid, 0)[1]
        if os.WIFSIGNALED(status):
            out[name] = signal.Signals(os.WTERMSIG(status)).name
        else:
            code = os.WEXITSTATUS(status)
            out[name] = 0 if code == 0 else errno.errorcode[code]
    print(json.dumps(out))
"""


@pytest.mark.skipif(not HOST_PYTHON.exists(), reason="needs /usr/bin/python3 on the host")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x32 is an x86_64 ABI")
def test_x32_system_calls_never_run(run_container: RunFn) -> None:
    """The profile lists only the native ABI: an x32 system call kills the calling
    process (SIGSYS, libseccomp's bad-arch action). Native calls are unaffected."""
    result = run_container(X32_PROBE, python=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "getpid": 0,
        "x32_getpid": "SIGSYS",
        "x32_read": "SIGSYS",
        "x32_mount": "SIGSYS",
        "x32_unshare": "SIGSYS",
    }


# getpid through the i386 entry point (int 0x80, eax=20), as a 32-bit program makes it:
# "mov eax, 20; int 0x80; ret", run from an executable page.
INT80_PROBE = """
    import ctypes, mmap, os, signal
    code = bytes.fromhex("b814000000cd80c3")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    call = ctypes.CFUNCTYPE(ctypes.c_long)(address)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if call() == os.getpid() else 1)
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        print(signal.Signals(os.WTERMSIG(status)).name)
    else:
        print("ran" if os.WEXITSTATUS(status) == 0 else "failed")
"""


@pytest.mark.skipif(not HOST_PYTHON.exists(), reason="needs /usr/bin/python3 on the host")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="int 0x80 is the i386 entry")
def test_i386_system_calls_run_only_for_i386_images(run_container: RunFn) -> None:
    """An amd64 container's 32-bit system calls are refused (the process is killed);
    an image built for 386 gets the i386 ABI in its filter and its calls run."""
    from runtime_agent.runtime.seccomp import default_profile

    native = run_container(INT80_PROBE, python=True)
    assert native.returncode == 0, native.stderr
    assert native.stdout.strip() == "SIGSYS"

    def i386_image(spec: dict[str, Any]) -> None:
        caps = spec["process"]["capabilities"]["bounding"]
        spec["linux"]["seccomp"] = default_profile(caps, image_arch="386")

    compat = run_container(INT80_PROBE, python=True, mutate=i386_image)
    assert compat.returncode == 0, compat.stderr
    assert compat.stdout.strip() == "ran"
