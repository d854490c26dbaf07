"""Docker's default seccomp profile, generated as an OCI ``linux.seccomp`` object.

The policy is the one moby ships (profiles/seccomp/default.json, generated from its
default_linux.go): deny by default with EPERM, allow a long list of ordinary syscalls, and
allow the dangerous ones (mount, unshare, bpf, ptrace, reboot, ...) only when the container
holds the capability that guards them anyway. The tables below are our own grouping of that
policy; ``default_profile`` expands the conditional rules for one container (its bounding
capabilities), this host's architecture and kernel, the same way Docker does when it writes
config.json.

Things worth knowing when reading the tables:

* ``clone`` without CAP_SYS_ADMIN is allowed only when no namespace flag is set (a masked
  compare on the flags argument, which is argument 1 on s390 and 0 elsewhere); ``clone3``
  cannot be filtered by flags (they live in a struct in memory), so it fails with ENOSYS and
  the C library falls back to ``clone``.
* ``personality`` is allowed only for the harmless personas (Linux, Linux32, UNAME26 and
  their combination, and 0xffffffff which just queries the current one).
* ``socket`` is allowed for every address family except AF_ALG (38) and AF_VSOCK (40).
* Syscall names unknown to the host's libseccomp are skipped by runc, so listing new
  syscalls (cachestat, mseal, ...) is harmless on older hosts.
* Names that are system calls of other ABIs only (chown32, _llseek, socketcall, ... on
  amd64: 72 of the tables' names) are left out of config.json. runc would skip them too, but
  only after looking each one up in libseccomp's tables at every container start, which
  cost it ~2 ms of CPU per start here. The filter runc builds is the same either way
  (``tests/agent/test_seccomp_bpf.py`` compiles both with libseccomp and compares).
* Docker lists the host's compat ABIs too (x86_64, x86 and x32 on amd64), so that 32-bit
  programs run. Berth lists only the native ABI, plus the compat ABI of an image built for
  it (a ``386`` image on amd64, an ``arm`` image on arm64). Each listed architecture is a
  whole extra copy of the filter that runc (libseccomp) builds at every container start:
  i386 alone cost runc 4.5 ms of CPU per start here (~2 ms of wall time on an idle node,
  more on a busy one). And the 32-bit entry points (int
  0x80 and the ia32 compat syscalls) are a kernel attack surface that a 64-bit container
  has no use for; hardened hosts switch it off altogether (``ia32_emulation=0``). A
  system call of an ABI the filter doesn't list kills the calling process (SIGSYS,
  libseccomp's bad-arch action), so a 32-bit program in a 64-bit image fails at once.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ACT_ALLOW = "SCMP_ACT_ALLOW"
ACT_ERRNO = "SCMP_ACT_ERRNO"

# Namespace flags of clone(2); a clone asking for any of them needs CAP_SYS_ADMIN.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NAMESPACE_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWCGROUP
)

AF_ALG = 38
AF_VSOCK = 40

# personality(2) personas a container may switch to.
PER_LINUX = 0x0
PER_LINUX32 = 0x0008
UNAME26 = 0x20000
PER_QUERY = 0xFFFFFFFF
ALLOWED_PERSONAS = (PER_LINUX, PER_LINUX32, UNAME26, UNAME26 | PER_LINUX32, PER_QUERY)

# Our arch names (Go/libseccomp style, as used in the rules) -> the native OCI seccomp
# architecture.
NATIVE_ARCH: dict[str, str] = {
    "amd64": "SCMP_ARCH_X86_64",
    "arm64": "SCMP_ARCH_AARCH64",
    "mips64": "SCMP_ARCH_MIPS64",
    "mips64n32": "SCMP_ARCH_MIPS64N32",
    "mipsel64": "SCMP_ARCH_MIPSEL64",
    "mipsel64n32": "SCMP_ARCH_MIPSEL64N32",
    "s390x": "SCMP_ARCH_S390X",
    "riscv64": "SCMP_ARCH_RISCV64",
    "loong64": "SCMP_ARCH_LOONGARCH64",
    "ppc64le": "SCMP_ARCH_PPC64LE",
}

# (host arch, image architecture as OCI names it) -> the compat ABI such an image uses.
COMPAT_IMAGE_ARCH: dict[tuple[str, str], str] = {
    ("amd64", "386"): "SCMP_ARCH_X86",
    ("arm64", "arm"): "SCMP_ARCH_ARM",
}

# uname -m -> our arch name.
MACHINE_ARCH = {
    "x86_64": "amd64",
    "i386": "x86",
    "i686": "x86",
    "aarch64": "arm64",
    "armv7l": "arm",
    "s390x": "s390x",
    "ppc64le": "ppc64le",
    "riscv64": "riscv64",
    "loongarch64": "loong64",
    "mips64": "mips64",
}

# --- the unconditional allow-list, grouped by what the calls do ---------------------------

_FILES = """
access chdir chmod chown chown32 close close_range copy_file_range creat dup dup2 dup3
faccessat faccessat2 fadvise64 fadvise64_64 fallocate fchdir fchmod fchmodat fchmodat2
fchown fchown32 fchownat fcntl fcntl64 fdatasync flock fstat fstat64 fstatat64 fstatfs
fstatfs64 fsync ftruncate ftruncate64 futimesat getcwd getdents getdents64 lchown lchown32
link linkat _llseek lseek lstat lstat64 mkdir mkdirat mknod mknodat name_to_handle_at
newfstatat open openat openat2 pread64 preadv preadv2 pwrite64 pwritev pwritev2 read
readahead readlink readlinkat readv rename renameat renameat2 rmdir sendfile sendfile64
splice stat stat64 statfs statfs64 statx symlink symlinkat sync sync_file_range syncfs tee
truncate truncate64 umask unlink unlinkat utime utimensat utimensat_time64 utimes vmsplice
write writev cachestat listmount statmount
"""

_XATTRS = """
fgetxattr flistxattr fremovexattr fsetxattr getxattr getxattrat lgetxattr listxattr
listxattrat llistxattr lremovexattr lsetxattr removexattr removexattrat setxattr setxattrat
"""

_EVENTS_AND_POLLING = """
epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait
epoll_wait_old eventfd eventfd2 fanotify_mark inotify_add_watch inotify_init inotify_init1
inotify_rm_watch io_cancel io_destroy io_getevents io_pgetevents io_pgetevents_time64
io_setup io_submit ioctl poll ppoll ppoll_time64 pselect6 pselect6_time64 select _newselect
signalfd signalfd4 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
timerfd_settime64
"""

_MEMORY = """
brk madvise map_shadow_stack membarrier memfd_create memfd_secret mincore mlock mlock2
mlockall mmap mmap2 mprotect mremap mseal msync munlock munlockall munmap pkey_alloc
pkey_free pkey_mprotect remap_file_pages
"""

_PROCESSES = """
capget capset execve execveat exit exit_group fork getcpu getegid getegid32 geteuid
geteuid32 getgid getgid32 getgroups getgroups32 getpgid getpgrp getpid getppid getpriority
getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid
get_thread_area gettid getuid getuid32 ioprio_get ioprio_set landlock_add_rule
landlock_create_ruleset landlock_restrict_self pidfd_open prctl prlimit64 process_mrelease
restart_syscall riscv_hwprobe rseq sched_getaffinity sched_getattr sched_getparam
sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam
sched_setscheduler sched_yield seccomp setfsgid setfsgid32 setfsuid setfsuid32 setgid
setgid32 setgroups setgroups32 setpgid setpriority setregid setregid32 setresgid
setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit set_robust_list setsid
set_thread_area set_tid_address setuid setuid32 sysinfo times ugetrlimit uname uretprobe
vfork wait4 waitid waitpid
"""

_SIGNALS = """
alarm kill pause pidfd_send_signal rt_sigaction rt_sigpending rt_sigprocmask
rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64
rt_tgsigqueueinfo sigaltstack sigprocmask sigreturn tgkill tkill
"""

_TIME_AND_FUTEX = """
adjtimex clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
clock_gettime64 clock_nanosleep clock_nanosleep_time64 futex futex_requeue futex_time64
futex_wait futex_waitv futex_wake getitimer gettimeofday getrandom nanosleep setitimer time
timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime
timer_settime64
"""

_NETWORK = """
accept accept4 bind connect getpeername getsockname getsockopt listen recv recvfrom
recvmmsg recvmmsg_time64 recvmsg send sendmmsg sendmsg sendto setsockopt shutdown
socketcall socketpair
"""

_SYSV_AND_POSIX_IPC = """
ipc mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend
mq_timedsend_time64 mq_unlink msgctl msgget msgrcv msgsnd pipe pipe2 semctl semget semop
semtimedop semtimedop_time64 shmat shmctl shmdt shmget
"""

ALWAYS_ALLOWED: frozenset[str] = frozenset(
    " ".join(
        (
            _FILES,
            _XATTRS,
            _EVENTS_AND_POLLING,
            _MEMORY,
            _PROCESSES,
            _SIGNALS,
            _TIME_AND_FUTEX,
            _NETWORK,
            _SYSV_AND_POSIX_IPC,
        )
    ).split()
)


@dataclass(frozen=True)
class Condition:
    """When a rule applies: all listed capabilities held, arch among arches, kernel >= min."""

    caps: tuple[str, ...] = ()
    arches: tuple[str, ...] = ()
    min_kernel: tuple[int, int] | None = None


@dataclass(frozen=True)
class Rule:
    """One conditional syscall rule, before expansion into OCI form.

    ``args`` holds (index, value, op) triples, or (index, value, value_two, op) for
    masked compares. ``only_if`` must hold; ``unless`` must not (any one of its parts
    matching excludes the rule, as in Docker's profile format).
    """

    names: tuple[str, ...]
    action: str = ACT_ALLOW
    args: tuple[tuple[int, int, str] | tuple[int, int, int, str], ...] = ()
    errno_ret: int | None = None
    only_if: Condition = field(default_factory=Condition)
    unless: Condition | None = None


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


CONDITIONAL_RULES: tuple[Rule, ...] = (
    # ptrace and cross-process memory access are safe since 4.8 (seccomp can no longer be
    # bypassed with ptrace there).
    Rule(
        _names("process_vm_readv process_vm_writev ptrace"),
        only_if=Condition(min_kernel=(4, 8)),
    ),
    # socket(2): every family but AF_ALG (kernel crypto API) and AF_VSOCK (host sockets).
    Rule(("socket",), args=((0, AF_ALG, "SCMP_CMP_LT"),)),
    Rule(("socket",), args=((0, AF_ALG + 1, "SCMP_CMP_EQ"),)),
    Rule(("socket",), args=((0, AF_VSOCK, "SCMP_CMP_GT"),)),
    *(Rule(("personality",), args=((0, persona, "SCMP_CMP_EQ"),)) for persona in ALLOWED_PERSONAS),
    # Arch-specific system calls.
    Rule(_names("sync_file_range2 swapcontext"), only_if=Condition(arches=("ppc64le",))),
    Rule(
        _names(
            "arm_fadvise64_64 arm_sync_file_range sync_file_range2 breakpoint cacheflush set_tls"
        ),
        only_if=Condition(arches=("arm", "arm64")),
    ),
    Rule(("arch_prctl",), only_if=Condition(arches=("amd64", "x32"))),
    Rule(("modify_ldt",), only_if=Condition(arches=("amd64", "x32", "x86"))),
    Rule(
        _names("s390_pci_mmio_read s390_pci_mmio_write s390_runtime_instr"),
        only_if=Condition(arches=("s390", "s390x")),
    ),
    Rule(("riscv_flush_icache",), only_if=Condition(arches=("riscv64",))),
    # Calls allowed only with the capability that guards them.
    Rule(("open_by_handle_at",), only_if=Condition(caps=("CAP_DAC_READ_SEARCH",))),
    Rule(
        _names(
            """bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie
            lsm_get_self_attr lsm_list_modules lsm_set_self_attr mount mount_setattr
            move_mount open_tree perf_event_open quotactl quotactl_fd setdomainname
            sethostname setns syslog umount umount2 unshare"""
        ),
        only_if=Condition(caps=("CAP_SYS_ADMIN",)),
    ),
    # Without CAP_SYS_ADMIN: clone only without namespace flags...
    Rule(
        ("clone",),
        args=((0, CLONE_NAMESPACE_FLAGS, 0, "SCMP_CMP_MASKED_EQ"),),
        unless=Condition(caps=("CAP_SYS_ADMIN",), arches=("s390", "s390x")),
    ),
    Rule(
        ("clone",),
        args=((1, CLONE_NAMESPACE_FLAGS, 0, "SCMP_CMP_MASKED_EQ"),),
        only_if=Condition(arches=("s390", "s390x")),
        unless=Condition(caps=("CAP_SYS_ADMIN",)),
    ),
    # ...and clone3, whose flags seccomp cannot see, reports ENOSYS so libc falls back.
    Rule(
        ("clone3",),
        action=ACT_ERRNO,
        errno_ret=errno.ENOSYS,
        unless=Condition(caps=("CAP_SYS_ADMIN",)),
    ),
    Rule(("reboot",), only_if=Condition(caps=("CAP_SYS_BOOT",))),
    Rule(("chroot",), only_if=Condition(caps=("CAP_SYS_CHROOT",))),
    Rule(
        _names("delete_module init_module finit_module"),
        only_if=Condition(caps=("CAP_SYS_MODULE",)),
    ),
    Rule(("acct",), only_if=Condition(caps=("CAP_SYS_PACCT",))),
    Rule(
        _names("kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace"),
        only_if=Condition(caps=("CAP_SYS_PTRACE",)),
    ),
    Rule(_names("iopl ioperm"), only_if=Condition(caps=("CAP_SYS_RAWIO",))),
    Rule(
        _names("settimeofday stime clock_settime clock_settime64"),
        only_if=Condition(caps=("CAP_SYS_TIME",)),
    ),
    Rule(("vhangup",), only_if=Condition(caps=("CAP_SYS_TTY_CONFIG",))),
    Rule(
        _names("get_mempolicy mbind set_mempolicy set_mempolicy_home_node"),
        only_if=Condition(caps=("CAP_SYS_NICE",)),
    ),
    Rule(("syslog",), only_if=Condition(caps=("CAP_SYSLOG",))),
    Rule(("bpf",), only_if=Condition(caps=("CAP_BPF",))),
    Rule(("perf_event_open",), only_if=Condition(caps=("CAP_PERFMON",))),
)


def host_arch() -> str:
    """This machine's architecture in the rules' naming (amd64, arm64, ...)."""
    machine = os.uname().machine  # what platform.machine() returns, without importing it
    return MACHINE_ARCH.get(machine, machine)


def host_kernel() -> tuple[int, int]:
    """(major, minor) of the running kernel; suffixes such as -generic are ignored."""
    release = os.uname().release
    parts = release.split(".")
    major = int(parts[0])
    minor = int("".join(ch for ch in parts[1] if ch.isdigit()) or 0) if len(parts) > 1 else 0
    return major, minor


def _matches(cond: Condition, caps: frozenset[str], arch: str, kernel: tuple[int, int]) -> bool:
    """True when every part of ``cond`` holds (used for a rule's ``only_if``)."""
    if cond.arches and arch not in cond.arches:
        return False
    if cond.caps and not all(cap in caps for cap in cond.caps):
        return False
    return not (cond.min_kernel is not None and kernel < cond.min_kernel)


def _excluded(cond: Condition, caps: frozenset[str], arch: str, kernel: tuple[int, int]) -> bool:
    """True when any part of ``cond`` holds (used for a rule's ``unless``)."""
    if cond.arches and arch in cond.arches:
        return True
    if cond.caps and any(cap in caps for cap in cond.caps):
        return True
    return cond.min_kernel is not None and kernel >= cond.min_kernel


def _oci_args(args: Iterable[tuple[Any, ...]]) -> list[dict[str, Any]]:
    out = []
    for arg in args:
        if len(arg) == 3:
            index, value, op = arg
            out.append({"index": index, "value": value, "op": op})
        else:
            index, value, value_two, op = arg
            out.append({"index": index, "value": value, "valueTwo": value_two, "op": op})
    return out


def default_profile(
    capabilities: Iterable[str],
    *,
    arch: str | None = None,
    kernel: tuple[int, int] | None = None,
    image_arch: str | None = None,
) -> dict[str, Any]:
    """Docker's default profile for a container with these bounding capabilities.

    Returns the OCI ``linux.seccomp`` object: default action EPERM, the unconditional
    allow-list and every conditional rule whose conditions hold on ``arch`` (this host's
    by default). Its architectures are the native one, and the compat ABI that
    ``image_arch`` (the image config's ``architecture``) runs on, if it is one (see the
    module docstring).
    """
    caps = frozenset(capabilities)
    arch = arch or host_arch()
    kernel = kernel or host_kernel()
    architectures = [NATIVE_ARCH[arch]] if arch in NATIVE_ARCH else []
    compat = COMPAT_IMAGE_ARCH.get((arch, image_arch or ""))
    if compat:
        architectures.append(compat)
    foreign = _foreign_names(tuple(architectures))
    syscalls: list[dict[str, Any]] = [
        {"names": sorted(ALWAYS_ALLOWED - foreign), "action": ACT_ALLOW}
    ]
    for rule in CONDITIONAL_RULES:
        if not _matches(rule.only_if, caps, arch, kernel):
            continue
        if rule.unless is not None and _excluded(rule.unless, caps, arch, kernel):
            continue
        names = [name for name in rule.names if name not in foreign]
        if not names:
            continue
        entry: dict[str, Any] = {"names": names, "action": rule.action}
        if rule.args:
            entry["args"] = _oci_args(rule.args)
        if rule.errno_ret is not None:
            entry["errnoRet"] = rule.errno_ret
        syscalls.append(entry)
    return {
        "defaultAction": ACT_ERRNO,
        "defaultErrnoRet": errno.EPERM,
        "architectures": architectures,
        "syscalls": syscalls,
    }


# libseccomp's pseudo syscall numbers at or below this stand for "a call of other
# architectures only" (-10001 and down); those above are the socketcall (-101...) and ipc
# (-201...) sub-calls, which libseccomp turns into rules on the multiplexer on i386, s390
# and ppc, so they must stay.
_PNR_NOT_ON_ARCH = -10000


@functools.lru_cache(maxsize=8)
def _foreign_names(architectures: tuple[str, ...]) -> frozenset[str]:
    """Names of the tables that are no system call of any of ``architectures`` but are
    one of another ABI, as the host's libseccomp (the one runc uses) sees them.

    Names libseccomp doesn't know at all (-1) are kept: a newer libseccomp may know them.
    With no architectures listed, or no libseccomp, nothing is dropped.
    """
    resolve = _libseccomp_resolver()
    if resolve is None or not architectures:
        return frozenset()
    names = set(ALWAYS_ALLOWED).union(*(rule.names for rule in CONDITIONAL_RULES))
    foreign = set()
    for name in names:
        numbers = [resolve(arch, name) for arch in architectures]
        if None in numbers:
            return frozenset()  # an architecture this libseccomp doesn't know: keep all
        if all(number <= _PNR_NOT_ON_ARCH for number in numbers):
            foreign.add(name)
    return frozenset(foreign)


def _libseccomp_resolver() -> Any:
    """``resolve(oci_arch, name) -> int | None`` backed by libseccomp, or None.

    The number is the syscall's number on that architecture, -1 for a name libseccomp
    doesn't know, below -1 for a call that exists only on other architectures; None for
    an architecture libseccomp doesn't know.
    """
    import ctypes

    try:
        lib = ctypes.CDLL("libseccomp.so.2")  # the soname runc links (no find_library: slow)
    except OSError:
        return None
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int

    tokens: dict[str, int] = {}

    def resolve(oci_arch: str, name: str) -> int | None:
        token = tokens.get(oci_arch)
        if token is None:
            arch_name = oci_arch.removeprefix("SCMP_ARCH_").lower()
            token = lib.seccomp_arch_resolve_name(arch_name.encode())
            if token == 0:
                return None
            tokens[oci_arch] = token
        return int(lib.seccomp_syscall_resolve_name_arch(token, name.encode()))

    return resolve


def allowed_syscalls(profile: dict[str, Any]) -> set[str]:
    """Names a profile allows unconditionally (no argument filter)."""
    return {
        name
        for entry in profile["syscalls"]
        if entry["action"] == ACT_ALLOW and not entry.get("args")
        for name in entry["names"]
    }
