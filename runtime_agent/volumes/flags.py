"""docker's ``-v/--volume`` and ``--tmpfs`` flag syntax, parsed into ``MountSpec``s.

For ``berth-agent run`` (and anything else taking docker-style flags):

  -v NAME:/path[:ro|rw]      the tenant's named volume (created on first use)
  -v /path                   an anonymous volume (random name)
  -v /host/path:/path[:ro]   a host bind mount — allowed only for privileged callers,
                             which ``VolumeManager.oci_mounts`` checks
  --tmpfs /path[:size=64m,ro,...]

Options docker accepts but that change nothing here (``z``, ``Z``, ``nocopy``,
propagation modes for volumes, ``mode=``/``exec``/``noexec`` for tmpfs) are accepted and
ignored; anything else is an error, so a typo never silently becomes a different mount.
"""

from __future__ import annotations

import re
import uuid

from runtime_agent.errors import InvalidArgument
from runtime_agent.protocol import MountSpec

_SIZE_RE = re.compile(r"^(\d+)([bkmgt]?)$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_IGNORED_VOLUME_OPTIONS = frozenset(
    {"z", "Z", "nocopy", "private", "rprivate", "shared", "rshared", "slave", "rslave"}
)
_IGNORED_TMPFS_OPTIONS = (
    "mode=",
    "exec",
    "noexec",
    "nosuid",
    "nodev",
    "suid",
    "dev",
    "uid=",
    "gid=",
)


def _size(text: str) -> int:
    match = _SIZE_RE.match(text)
    if not match or int(match.group(1)) <= 0:
        raise InvalidArgument(f"invalid size {text!r}: use e.g. 64m or 1g")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_volume_flag(value: str) -> MountSpec:
    """One ``-v`` value -> MountSpec (volume, or bind for an absolute host source)."""
    parts = value.split(":")
    if not value or len(parts) > 3 or any(p == "" for p in parts):
        raise InvalidArgument(f"invalid volume specification {value!r}: use NAME:/path[:ro]")
    if len(parts) == 1:
        if not parts[0].startswith("/"):
            raise InvalidArgument(f"invalid volume specification {value!r}: path must be absolute")
        return MountSpec("volume", parts[0], uuid.uuid4().hex + uuid.uuid4().hex)
    source, target = parts[0], parts[1]
    read_only = False
    if len(parts) == 3:
        for option in parts[2].split(","):
            if option == "ro":
                read_only = True
            elif option == "rw":
                read_only = False
            elif option not in _IGNORED_VOLUME_OPTIONS:
                raise InvalidArgument(f"invalid volume option {option!r} in {value!r}")
    if not target.startswith("/"):
        raise InvalidArgument(f"invalid volume specification {value!r}: target must be absolute")
    kind = "bind" if source.startswith("/") else "volume"
    return MountSpec(kind, target, source, read_only=read_only)  # type: ignore[arg-type]


def parse_tmpfs_flag(value: str) -> MountSpec:
    """One ``--tmpfs`` value -> MountSpec(kind="tmpfs")."""
    target, _, options = value.partition(":")
    if not target.startswith("/"):
        raise InvalidArgument(f"invalid tmpfs {value!r}: the path must be absolute")
    size: int | None = None
    read_only = False
    for option in filter(None, options.split(",")):
        if option.startswith("size="):
            size = _size(option[len("size=") :])
        elif option == "ro":
            read_only = True
        elif option == "rw":
            read_only = False
        elif not option.startswith(_IGNORED_TMPFS_OPTIONS):
            raise InvalidArgument(f"invalid tmpfs option {option!r} in {value!r}")
    return MountSpec("tmpfs", target, read_only=read_only, size_bytes=size)
