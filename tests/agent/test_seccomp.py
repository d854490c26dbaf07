"""The generated seccomp profile against the semantics of moby's default.json.

The expectations below were read off moby's profiles/seccomp/default.json (vendored in
moby/moby, generated from default_linux.go): 361 unconditionally allowed syscalls, EPERM
by default, and the conditional rules checked one by one here.
"""

from __future__ import annotations

import errno

from runtime_agent.runtime.seccomp import (
    ALWAYS_ALLOWED,
    CLONE_NAMESPACE_FLAGS,
    allowed_syscalls,
    default_profile,
)
from runtime_agent.runtime.security import DEFAULT_CAPABILITIES

KERNEL = (6, 18)


def rules_for(profile: dict, name: str) -> list[dict]:
    return [entry for entry in profile["syscalls"] if name in entry["names"]]


def test_default_action_and_architectures_on_amd64() -> None:
    profile = default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=KERNEL)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == errno.EPERM
    # The native ABI only: no i386 or x32 copy of the filter for an amd64 image.
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]
    assert (
        default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=KERNEL, image_arch="amd64")
        == profile
    )
    # An image built for i386 runs on the compat ABI: one more arch, and the same rules
    # plus the names that are i386's own calls (left out for amd64 alone: runc would skip
    # them, see test_seccomp_bpf.py).
    i386 = default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=KERNEL, image_arch="386")
    assert i386["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
    assert [rule["action"] for rule in i386["syscalls"]] == [
        rule["action"] for rule in profile["syscalls"]
    ]
    assert set(profile["syscalls"][0]["names"]) < set(i386["syscalls"][0]["names"])
    assert set(i386["syscalls"][0]["names"]) - set(profile["syscalls"][0]["names"]) >= {
        "_llseek",
        "chown32",
        "socketcall",
    }
    arm = default_profile(DEFAULT_CAPABILITIES, arch="arm64", kernel=KERNEL)
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64"]
    arm32 = default_profile(DEFAULT_CAPABILITIES, arch="arm64", kernel=KERNEL, image_arch="arm")
    assert arm32["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    # An architecture that is no compat ABI of the host adds nothing.
    other = default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=KERNEL, image_arch="arm")
    assert other["architectures"] == ["SCMP_ARCH_X86_64"]


def test_unconditional_allow_list_matches_reference() -> None:
    assert len(ALWAYS_ALLOWED) == 361
    for name in ("read", "write", "openat", "execve", "futex", "io_uring_setup"):
        assert (name in ALWAYS_ALLOWED) == (name != "io_uring_setup")
    # Never allowed for a default container, whatever the arch.
    profile = default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=KERNEL)
    allowed = allowed_syscalls(profile)
    for name in (
        "keyctl",
        "add_key",
        "request_key",
        "mount",
        "umount2",
        "unshare",
        "setns",
        "bpf",
        "perf_event_open",
        "reboot",
        "kexec_load",
        "init_module",
        "userfaultfd",
        "io_uring_setup",
        "open_by_handle_at",
        "clock_settime",
        "swapon",
        "pivot_root",
    ):
        assert name not in allowed, name
    assert {"chroot", "arch_prctl", "modify_ldt", "ptrace", "process_vm_readv"} <= allowed


def test_capability_conditional_rules() -> None:
    base = default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=KERNEL)
    with_admin = default_profile(
        [*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"], arch="amd64", kernel=KERNEL
    )
    assert "mount" not in allowed_syscalls(base)
    assert {"mount", "unshare", "setns", "clone", "clone3", "umount2"} <= allowed_syscalls(
        with_admin
    )
    # Without CAP_SYS_CHROOT there is no chroot.
    no_chroot = [c for c in DEFAULT_CAPABILITIES if c != "CAP_SYS_CHROOT"]
    assert "chroot" not in allowed_syscalls(default_profile(no_chroot, arch="amd64"))
    for cap, call in (
        ("CAP_SYS_TIME", "clock_settime"),
        ("CAP_SYS_MODULE", "finit_module"),
        ("CAP_SYS_BOOT", "reboot"),
        ("CAP_SYS_NICE", "mbind"),
        ("CAP_SYSLOG", "syslog"),
        ("CAP_BPF", "bpf"),
        ("CAP_PERFMON", "perf_event_open"),
        ("CAP_DAC_READ_SEARCH", "open_by_handle_at"),
        ("CAP_SYS_PTRACE", "kcmp"),
        ("CAP_SYS_RAWIO", "iopl"),
    ):
        assert call not in allowed_syscalls(base)
        granted = default_profile([*DEFAULT_CAPABILITIES, cap], arch="amd64", kernel=KERNEL)
        assert call in allowed_syscalls(granted), (cap, call)


def test_clone_flags_masked_and_clone3_enosys_without_sys_admin() -> None:
    profile = default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=KERNEL)
    (clone,) = rules_for(profile, "clone")
    assert clone["args"] == [
        {"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]
    assert CLONE_NAMESPACE_FLAGS == 2114060288
    (clone3,) = rules_for(profile, "clone3")
    assert clone3["action"] == "SCMP_ACT_ERRNO"
    assert clone3["errnoRet"] == errno.ENOSYS
    # s390 passes the flags in the second argument.
    s390 = default_profile(DEFAULT_CAPABILITIES, arch="s390x", kernel=KERNEL)
    (clone_s390,) = rules_for(s390, "clone")
    assert clone_s390["args"][0]["index"] == 1
    # With CAP_SYS_ADMIN both are plainly allowed and no ENOSYS rule remains.
    admin = default_profile([*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"], arch="amd64")
    assert all(
        r["action"] == "SCMP_ACT_ALLOW" and "args" not in r for r in rules_for(admin, "clone3")
    )


def test_personality_and_socket_argument_rules() -> None:
    profile = default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=KERNEL)
    personas = sorted(r["args"][0]["value"] for r in rules_for(profile, "personality"))
    assert personas == [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF]
    assert all(r["args"][0]["op"] == "SCMP_CMP_EQ" for r in rules_for(profile, "personality"))
    sockets = [(r["args"][0]["op"], r["args"][0]["value"]) for r in rules_for(profile, "socket")]
    assert sockets == [("SCMP_CMP_LT", 38), ("SCMP_CMP_EQ", 39), ("SCMP_CMP_GT", 40)]


def test_arch_specific_rules() -> None:
    amd64 = allowed_syscalls(default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=KERNEL))
    arm64 = allowed_syscalls(default_profile(DEFAULT_CAPABILITIES, arch="arm64", kernel=KERNEL))
    assert "arch_prctl" in amd64 and "arch_prctl" not in arm64
    assert "modify_ldt" in amd64 and "modify_ldt" not in arm64
    # Docker's arm rule (set_tls, cacheflush, ...) names 32-bit arm calls: they are in the
    # filter of an arm image on arm64, not in a native arm64 or an amd64 one.
    arm32 = allowed_syscalls(
        default_profile(DEFAULT_CAPABILITIES, arch="arm64", kernel=KERNEL, image_arch="arm")
    )
    assert "set_tls" in arm32 and "set_tls" not in arm64 and "set_tls" not in amd64
    riscv = allowed_syscalls(default_profile(DEFAULT_CAPABILITIES, arch="riscv64", kernel=KERNEL))
    assert "riscv_flush_icache" in riscv


def test_old_kernel_gets_no_ptrace() -> None:
    old = allowed_syscalls(default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=(4, 4)))
    assert "ptrace" not in old
    assert "process_vm_readv" not in old
