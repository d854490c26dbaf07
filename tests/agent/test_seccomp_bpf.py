"""The seccomp filter runc builds from Berth's profile, compiled with the host's libseccomp.

Berth leaves out of config.json the names that are system calls of other ABIs only
(``_llseek``, ``chown32``, ... on amd64), which runc would otherwise look up and skip at
every container start. These tests compile the profile the way runc 1.1 does (the same
libseccomp calls, in the same order) with and without those names and compare the BPF
programs byte for byte, for the native ABI alone and with the compat ABI of a 32-bit image.
"""

from __future__ import annotations

import ctypes
import tempfile
from typing import Any

import pytest

from runtime_agent.runtime import seccomp
from runtime_agent.runtime.security import DEFAULT_CAPABILITIES

LIB: ctypes.CDLL | None
try:
    LIB = ctypes.CDLL("libseccomp.so.2")
except OSError:  # pragma: no cover - runc needs it, the test command installs runc
    LIB = None

pytestmark = pytest.mark.skipif(LIB is None, reason="libseccomp.so.2 is not installed")

OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _action(name: str, errno_ret: int | None) -> int:
    if name == "SCMP_ACT_ALLOW":
        return 0x7FFF0000
    assert name == "SCMP_ACT_ERRNO", name
    return 0x00050000 | (errno_ret or 0) & 0xFFFF


def compile_bpf(profile: dict[str, Any]) -> bytes:
    """runc's libcontainer/seccomp InitSeccomp up to the load, exporting instead."""
    assert LIB is not None
    LIB.seccomp_init.restype = ctypes.c_void_p
    LIB.seccomp_init.argtypes = [ctypes.c_uint32]
    LIB.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    LIB.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    LIB.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    LIB.seccomp_syscall_resolve_name.restype = ctypes.c_int
    LIB.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    LIB.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    LIB.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    LIB.seccomp_release.argtypes = [ctypes.c_void_p]
    default = _action(profile["defaultAction"], profile.get("defaultErrnoRet"))
    ctx = LIB.seccomp_init(default)
    assert ctx
    try:
        for arch in profile["architectures"]:
            token = LIB.seccomp_arch_resolve_name(arch.removeprefix("SCMP_ARCH_").lower().encode())
            assert token, arch
            rc = LIB.seccomp_arch_add(ctx, token)
            assert rc in (0, -17), (arch, rc)  # -EEXIST: the native arch is there already
        for rule in profile["syscalls"]:
            action = _action(rule["action"], rule.get("errnoRet"))
            args = rule.get("args") or []
            array = (ArgCmp * max(len(args), 1))(
                *(ArgCmp(a["index"], OPS[a["op"]], a["value"], a.get("valueTwo", 0)) for a in args)
            )
            for name in rule["names"]:
                number = LIB.seccomp_syscall_resolve_name(name.encode())
                if number == -1:
                    continue  # runc: "unknown seccomp syscall ignored"
                rc = LIB.seccomp_rule_add_array(ctx, action, number, len(args), array)
                assert rc == 0, (name, rc)
        with tempfile.TemporaryFile() as out:
            assert LIB.seccomp_export_bpf(ctx, out.fileno()) == 0
            out.seek(0)
            return out.read()
    finally:
        LIB.seccomp_release(ctx)


def _full(image_arch: str | None) -> dict[str, Any]:
    """The profile with every name of the tables, as Docker writes it."""
    keep_all = pytest.MonkeyPatch()
    keep_all.setattr(seccomp, "_foreign_names", lambda architectures: frozenset())
    try:
        return seccomp.default_profile(DEFAULT_CAPABILITIES, image_arch=image_arch)
    finally:
        keep_all.undo()


@pytest.mark.parametrize("image_arch", [None, "386"])
def test_leaving_out_other_abis_names_builds_the_same_filter(image_arch: str | None) -> None:
    if seccomp.host_arch() != "amd64":
        pytest.skip("the names checked are amd64's")
    profile = seccomp.default_profile(DEFAULT_CAPABILITIES, image_arch=image_arch)
    names = {name for rule in profile["syscalls"] for name in rule["names"]}
    full = _full(image_arch)
    full_names = {name for rule in full["syscalls"] for name in rule["names"]}
    if image_arch is None:
        # i386-only calls are gone from an amd64 container's profile...
        assert {"_llseek", "chown32", "socketcall", "mmap2", "waitpid"} <= full_names - names
    else:
        # ...and kept for a 386 image, whose programs make them.
        assert {"_llseek", "chown32", "socketcall", "mmap2", "waitpid"} <= names
    assert {"read", "openat", "clone", "arch_prctl", "recvmmsg"} <= names
    bpf = compile_bpf(profile)
    assert len(bpf) > 8 * 100  # a real filter: hundreds of instructions
    assert bpf == compile_bpf(full)


def test_without_libseccomp_nothing_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    seccomp._foreign_names.cache_clear()
    monkeypatch.setattr(seccomp, "_libseccomp_resolver", lambda: None)
    try:
        profile = seccomp.default_profile(DEFAULT_CAPABILITIES, arch="amd64", kernel=(6, 1))
        assert profile["syscalls"][0]["names"] == sorted(seccomp.ALWAYS_ALLOWED)
    finally:
        seccomp._foreign_names.cache_clear()


def test_a_profile_without_architectures_keeps_every_name() -> None:
    assert seccomp._foreign_names(()) == frozenset()
