"""Network namespaces made cheaply: unshare in a thread, keep them with a bind mount.

pyroute2's own netns helpers fork a process per call (7-8 ms each on this kind of host).
A thread can instead ``unshare(CLONE_NEWNET)`` itself, bind-mount its
``/proc/thread-self/ns/net`` onto a file (which keeps the namespace alive with no process
in it, exactly what ``ip netns add`` does), open a netlink socket that stays bound to the
new namespace, and go back to the host namespace with ``setns``. The thread is
short-lived, so the rest of the process never runs inside a container's namespace even
if something goes wrong half-way.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, flags: int) -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), None, ctypes.c_ulong(flags), None),
        f"mount {source} on {target}",
    )


def _umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def _in_thread(fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread and return its result (or raise its exception)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="berth-netns")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _netlink_socket() -> socket.socket:
    """A route netlink socket; it stays bound to the namespace of the thread making it."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)


def ensure_netns_dir(directory: Path) -> None:
    """Make the directory holding netns bind mounts a shared mount point, as iproute2 does.

    Mount namespaces cloned from ours later (runc's, for instance) then see unmounts
    propagate, so a copy of a netns mount can't keep a deleted namespace alive.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if not _is_mountpoint(directory):
        _mount(str(directory), str(directory), MS_BIND | MS_REC)
        _mount("none", str(directory), MS_SHARED | MS_REC)


def release_netns_dir(directory: Path) -> None:
    """Undo ``ensure_netns_dir`` once no namespace is mounted in it; idempotent.

    A plain (not lazy) unmount: while another thread or process has just mounted a new
    namespace in the directory it fails with EBUSY and the directory stays as it is,
    rather than detaching that namespace's mount along with it.
    """
    if _is_mountpoint(directory):
        _libc.umount2(str(directory).encode(), 0)


def _is_mountpoint(path: Path) -> bool:
    target = str(path)
    return any(
        line.split()[4] == target for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


def _unshare_in_userns(path: Path, userns: Path) -> None:
    """Make a network namespace owned by the user namespace bound at ``userns`` and bind
    it at ``path`` (an existing empty file).

    A thread can't enter a user namespace (only a single-threaded process can), so a
    forked child does: it joins ``userns``, unshares its netns and waits while the
    parent binds that netns; then it exits.
    """
    from runtime_agent.namespaces import held_namespaces

    user_fd = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with held_namespaces(
            lambda: _libc.setns(user_fd, CLONE_NEWUSER) == 0 and _libc.unshare(CLONE_NEWNET) == 0,
            f"making a network namespace in {userns}",
        ) as pid:
            _mount(f"/proc/{pid}/ns/net", str(path), MS_BIND)
    finally:
        os.close(user_fd)


def make_netns_socket(path: Path, userns: Path | None = None) -> socket.socket:
    """Create a namespace bound at ``path`` and return a raw netlink socket inside it.

    With ``userns`` (a bound user namespace, ``security.tenant_userns``) the namespace
    is owned by that user namespace, so containers joining it can also be entered by
    ``runc exec``; without, by the host's.

    Unshares the *calling* thread's network namespace and setns()es back before
    returning, so call it only from a thread of its own (``create_netns`` does).

    Interfaces made in the namespace later (a container's eth0) have IPv6 disabled:
    Berth's networks are IPv4 only, and an IPv6-enabled eth0 would accept router
    advertisements another container on the bridge forges (CAP_NET_RAW is in Docker's
    default set), and keep the addresses and routes they give, also into the next
    container of a recycled namespace. Loopback keeps ::1.
    """
    host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        os.close(fd)
        try:
            if userns is None:
                _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            else:
                _unshare_in_userns(path, userns)
            try:
                if userns is None:
                    _mount("/proc/thread-self/ns/net", str(path), MS_BIND)
                else:
                    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        _check(_libc.setns(target, CLONE_NEWNET), f"setns into {path}")
                    finally:
                        os.close(target)
                with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
                    # /proc/sys/net is this thread's namespace's
                    Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").write_text("1\n")
                sock = _netlink_socket()
            finally:
                _check(_libc.setns(host, CLONE_NEWNET), "setns back to the host")
        except BaseException:
            with contextlib.suppress(OSError):
                _umount(str(path))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
    finally:
        os.close(host)
    return sock


def netns_iproute(path: Path, sock: socket.socket) -> IPRoute:
    """Wrap a socket from ``make_netns_socket`` for this thread and bring loopback up.

    pyroute2 keeps per-thread state, so the IPRoute must be built in the thread that
    uses it. On failure the namespace is deleted.
    """
    ipr = IPRoute(fileno=sock.detach())
    try:
        ipr.link("set", index=1, state="up")  # lo is always ifindex 1 in a new netns
    except BaseException:
        ipr.close()
        delete_netns(path)
        raise
    return ipr


def create_netns(path: Path, userns: Path | None = None) -> IPRoute:
    """Create a network namespace bound at ``path`` (owned by ``userns`` if given); return
    a netlink socket inside it.

    The caller owns the socket (close it). Loopback is brought up here already.
    """
    return netns_iproute(path, _in_thread(lambda: make_netns_socket(path, userns)))


def open_netns(path: Path) -> IPRoute:
    """A netlink socket bound to the namespace mounted at ``path``."""

    return IPRoute(fileno=run_in_netns(path, _netlink_socket).detach())


def run_in_netns(path: Path, fn: Callable[[], T]) -> T:
    """Run fn in a thread that sits in the namespace at ``path`` (e.g. to open a socket)."""

    def work() -> T:
        host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(target, CLONE_NEWNET), f"setns into {path}")
            try:
                return fn()
            finally:
                _check(_libc.setns(host, CLONE_NEWNET), "setns back to the host")
        finally:
            os.close(target)
            os.close(host)

    return _in_thread(work)


def _socket_counts() -> dict[str, int]:
    """This thread's namespace's socket counters ("TCP.inuse", "TCP.tw", "sockets.used", ...).

    Read from /proc/thread-self/net: /proc/net would show the process's namespace, not
    the one this thread sits in.
    """
    counts: dict[str, int] = {}
    for name in ("sockstat", "sockstat6"):
        try:
            text = Path(f"/proc/thread-self/net/{name}").read_text()
        except FileNotFoundError:  # sockstat6 without IPv6
            continue
        for line in text.splitlines():
            proto, _, fields = line.partition(":")
            words = fields.split()
            for key, value in zip(words[::2], words[1::2], strict=False):
                counts[f"{proto}.{key}"] = int(value)
    return counts


# Per-namespace counters that must all be 0 for a namespace to be reused: the sockets
# the kernel keeps after a container's processes are gone (TCP still closing counts in
# TCP inuse, TIME_WAIT in tw) and any other IP socket. TCP "orphan", "alloc" and "mem"
# are host-wide counters, so they say nothing about this namespace. "sockets: used"
# would also count the agent's own netlink socket, which pyroute2 leaves open until the
# next garbage collection; packet, unix and netlink sockets die with their process.
_MUST_BE_ZERO = (
    "TCP.inuse",
    "TCP.tw",
    "UDP.inuse",
    "UDPLITE.inuse",
    "RAW.inuse",
    "FRAG.inuse",
    "TCP6.inuse",
    "UDP6.inuse",
    "UDPLITE6.inuse",
    "RAW6.inuse",
    "FRAG6.inuse",
)


def scrub_if_clean(path: Path) -> bool:
    """Whether the namespace at ``path`` holds no IP socket; if so, scrub it for reuse.

    A leftover TIME_WAIT socket would make the next container's bind() of that port
    fail (EADDRINUSE), so any socket means "not clean". Scrubbing flushes the IPv4 route
    cache and its exceptions (PMTU values, redirects learnt from traffic of the previous
    container). Everything else a container could change needs CAP_NET_ADMIN over the
    namespace (addresses, routes, rules, qdiscs, neighbour entries, netfilter) or a
    writable /proc/sys, which containers don't get; neighbour entries learnt from
    traffic stay right because a container's MAC follows its address
    (``manager.mac_for``).
    """

    def check() -> bool:
        counts = _socket_counts()
        if any(counts.get(key, 0) for key in _MUST_BE_ZERO):
            return False
        Path("/proc/sys/net/ipv4/route/flush").write_text("1\n")
        return True

    return run_in_netns(path, check)


def delete_netns(path: Path) -> None:
    """Unmount and remove a netns file; idempotent.

    The kernel frees the namespace once nothing holds it; interfaces inside (and the
    host ends of their veth pairs) go with it, asynchronously: see
    ``NetworkManager._teardown_endpoint``.
    """
    try:
        _umount(str(path))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def is_netns(path: Path) -> bool:
    """True when ``path`` is a live netns bind mount (not just a leftover empty file)."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except FileNotFoundError:
        return False
