"""overlayfs mounts through the kernel's mount API.

The classic ``mount(2)`` passes all options in one page (4 KiB), which a deep image's
``lowerdir=a:b:c...`` overflows at a few dozen layers. The new API (``fsopen`` /
``fsconfig`` / ``fsmount`` / ``move_mount``, Linux 5.2+; overlayfs ``lowerdir+`` since
6.8) passes each lower directory separately, so depth is bounded only by overlayfs
itself (500 layers). Each fsconfig string is limited to 256 bytes, so a long path is
passed as ``/proc/self/fd/<dirfd>/<name>`` relative to an open directory instead.
When the new API is unavailable we fall back to ``mount(2)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from runtime_agent.errors import AgentError, ResourceExhausted

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Syscall numbers of the mount API are the same on every architecture (asm-generic).
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100
_MNT_DETACH = 2
_FSCONFIG_MAX_STRING = 255
_PAGE_LIMIT = 4095

# redirect_dir/metacopy off keep the upper dir a plain diff of the lowers (what
# Snapshotter.diff turns back into a layer); index off lets lowers be shared by mounts.
OVERLAY_OPTIONS = (("index", "off"), ("redirect_dir", "off"), ("metacopy", "off"))


class MountError(AgentError):
    code = "mount_failed"


def _fs_log(fs_fd: int) -> str:
    messages = []
    while True:
        try:
            data = os.read(fs_fd, 4096)
        except OSError:
            break
        if not data:
            break
        messages.append(data.decode(errors="replace").strip())
    return "; ".join(messages)


def _check(result: int, what: str, fs_fd: int | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        detail = _fs_log(fs_fd) if fs_fd is not None else ""
        raise MountError(
            f"{what} failed: {os.strerror(err)}" + (f" ({detail})" if detail else ""),
            errno=err,
        )
    return result


def _fsconfig_string(fs_fd: int, key: str, value: str) -> None:
    res = _libc.syscall(
        _SYS_FSCONFIG,
        ctypes.c_int(fs_fd),
        ctypes.c_uint(_FSCONFIG_SET_STRING),
        key.encode(),
        value.encode(),
        ctypes.c_int(0),
    )
    _check(res, f"overlay option {key}={value}", fs_fd)


def _fsconfig_flag(fs_fd: int, key: str) -> None:
    res = _libc.syscall(
        _SYS_FSCONFIG,
        ctypes.c_int(fs_fd),
        ctypes.c_uint(_FSCONFIG_SET_FLAG),
        key.encode(),
        None,
        ctypes.c_int(0),
    )
    _check(res, f"overlay option {key}", fs_fd)


@contextlib.contextmanager
def _short_paths(paths: Sequence[Path]) -> Iterator[list[str]]:
    """Paths each under 256 bytes: long ones go through an open fd of their parent."""
    fds: dict[Path, int] = {}
    short: list[str] = []
    try:
        for path in paths:
            text = str(path)
            if len(text.encode()) <= _FSCONFIG_MAX_STRING:
                short.append(text)
                continue
            parent = path.parent
            if parent not in fds:
                fds[parent] = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            short.append(f"/proc/self/fd/{fds[parent]}/{path.name}")
        yield short
    finally:
        for fd in fds.values():
            os.close(fd)


def mount_overlay(
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    target: Path,
    *,
    volatile: bool = False,
) -> None:
    """Mount overlayfs at ``target``; ``lowers`` top-most first. Read-only without upper.

    ``volatile`` (writable mounts only): overlayfs never syncs the upper filesystem, in
    particular not at unmount, which otherwise syncs the whole disk under the state
    directory (85-270 ms on a node where other jobs write). Writes may be lost in a
    crash, so only for disposable root filesystems (``--rm`` containers; podman does
    the same for them).
    """
    if not lowers:
        raise ValueError("overlayfs needs at least one lower directory")
    volatile = volatile and upper is not None
    try:
        _mount_new_api(lowers, upper, work, target, volatile)
    except MountError as exc:
        if exc.details.get("errno") != errno.ENOSYS:
            raise
        _mount_legacy(lowers, upper, work, target, volatile)


def volatile_marker(work: Path) -> Path:
    """What a volatile mount leaves in its work dir; overlayfs refuses to mount the
    same upper again while it exists (the upper may be inconsistent after a crash)."""
    return work / "work" / "incompat" / "volatile"


def _mount_new_api(
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    target: Path,
    volatile: bool = False,
) -> None:
    fs_fd = _check(_libc.syscall(_SYS_FSOPEN, b"overlay", ctypes.c_uint(_FSOPEN_CLOEXEC)), "fsopen")
    try:
        writable = [upper, work] if upper is not None and work is not None else []
        with _short_paths([*lowers, *writable]) as short:
            for lower in short[: len(lowers)]:
                _fsconfig_string(fs_fd, "lowerdir+", lower)
            if writable:
                _fsconfig_string(fs_fd, "upperdir", short[len(lowers)])
                _fsconfig_string(fs_fd, "workdir", short[len(lowers) + 1])
            for key, value in OVERLAY_OPTIONS:
                _fsconfig_string(fs_fd, key, value)
            if volatile:
                _fsconfig_flag(fs_fd, "volatile")
            _check(
                _libc.syscall(
                    _SYS_FSCONFIG,
                    ctypes.c_int(fs_fd),
                    ctypes.c_uint(_FSCONFIG_CMD_CREATE),
                    None,
                    None,
                    ctypes.c_int(0),
                ),
                "creating the overlay superblock",
                fs_fd,
            )
        mnt_fd = _check(
            _libc.syscall(
                _SYS_FSMOUNT, ctypes.c_int(fs_fd), ctypes.c_uint(_FSMOUNT_CLOEXEC), ctypes.c_uint(0)
            ),
            "fsmount",
            fs_fd,
        )
        try:
            _check(
                _libc.syscall(
                    _SYS_MOVE_MOUNT,
                    ctypes.c_int(mnt_fd),
                    b"",
                    ctypes.c_int(_AT_FDCWD),
                    str(target).encode(),
                    ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
                ),
                f"attaching the overlay at {target}",
            )
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)


def _mount_legacy(
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    target: Path,
    volatile: bool = False,
) -> None:
    options = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None and work is not None:
        options += f",upperdir={upper},workdir={work}"
    options += "".join(f",{k}={v}" for k, v in OVERLAY_OPTIONS)
    if volatile:
        options += ",volatile"
    if len(options.encode()) > _PAGE_LIMIT:
        raise ResourceExhausted(
            f"image has too many layers ({len(lowers)}) for this kernel's mount options"
        )
    res = _libc.mount(
        b"overlay", str(target).encode(), b"overlay", ctypes.c_ulong(0), options.encode()
    )
    _check(res, f"mounting overlay at {target}")


def unmount(target: Path) -> None:
    """Unmount ``target`` if it is a mount point; lazily if it is busy. Idempotent."""
    if _libc.umount2(str(target).encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return  # not mounted / gone
    if err == errno.EBUSY:
        _check(_libc.umount2(str(target).encode(), _MNT_DETACH), f"unmounting {target}")
        return
    raise MountError(f"unmounting {target} failed: {os.strerror(err)}", errno=err)


def is_mounted(target: Path) -> bool:
    # mountinfo writes space, tab, newline and backslash as octal escapes: compare in
    # that form rather than decoding every line.
    escaped = (
        str(target)
        .replace("\\", "\\134")
        .replace(" ", "\\040")
        .replace("\t", "\\011")
        .replace("\n", "\\012")
    )
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            if line.split(" ", 5)[4] == escaped:
                return True
    return False


def mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if mount_point.startswith(prefix) or mount_point == str(root):
                found.append(mount_point)
    return found


def mount_source_device(target: Path) -> str | None:
    """``major:minor`` of the device mounted at ``target`` (from mountinfo)."""
    text = str(target)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == text:
                return fields[2]
    return None
