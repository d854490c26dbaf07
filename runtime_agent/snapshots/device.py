"""Which block device holds a path, for blkio throttling (--device-write-bps).

cgroup v1 blkio throttles and cgroup v2 io.max accept whole disks, not partitions, so a
partition is mapped to the disk it is on. Filesystems with no block device behind them
(tmpfs, overlay on anonymous devices) have no device to throttle.
"""

from __future__ import annotations

import os
from pathlib import Path


def block_device_of(path: Path) -> str | None:
    """``major:minor`` of the whole disk under ``path``'s filesystem, or None."""
    st_dev = os.stat(path).st_dev
    major, minor = os.major(st_dev), os.minor(st_dev)
    if major == 0:
        return _device_from_mountinfo(path)
    return whole_disk(f"{major}:{minor}")


def whole_disk(dev: str) -> str | None:
    sysdir = Path("/sys/dev/block") / dev
    if not sysdir.exists():
        return None
    if (sysdir / "partition").exists():
        parent = sysdir.resolve().parent
        try:
            return (parent / "dev").read_text().strip()
        except OSError:
            return None
    return dev


def _device_from_mountinfo(path: Path) -> str | None:
    """btrfs and some others report an anonymous st_dev; ask mountinfo for the source."""
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            mount_point = fields[4]
            if target == mount_point or target.startswith(mount_point.rstrip("/") + "/"):
                sep = fields.index("-")
                source = fields[sep + 2]
                if source.startswith("/dev/") and (best is None or len(mount_point) > best[0]):
                    best = (len(mount_point), source)
    if best is None:
        return None
    try:
        st = os.stat(best[1])
    except OSError:
        return None
    return whole_disk(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
