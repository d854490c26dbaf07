"""docker-style -v and --tmpfs flags parsed into MountSpecs."""

from __future__ import annotations

import pytest

from runtime_agent.errors import InvalidArgument
from runtime_agent.protocol import MountSpec
from runtime_agent.volumes.flags import parse_tmpfs_flag, parse_volume_flag


def test_volume_flags() -> None:
    assert parse_volume_flag("data:/var/lib/db") == MountSpec("volume", "/var/lib/db", "data")
    assert parse_volume_flag("data:/db:ro") == MountSpec("volume", "/db", "data", read_only=True)
    assert parse_volume_flag("data:/db:rw,z") == MountSpec("volume", "/db", "data")
    assert parse_volume_flag("/srv/www:/www:ro") == MountSpec(
        "bind", "/www", "/srv/www", read_only=True
    )
    anonymous = parse_volume_flag("/cache")
    assert anonymous.kind == "volume" and anonymous.target == "/cache"
    assert len(anonymous.source) == 64


@pytest.mark.parametrize(
    "bad", ["", "data", "data:", ":/x", "data:relative", "data:/x:rx", "a:/b:ro:extra"]
)
def test_bad_volume_flags(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_volume_flag(bad)


def test_tmpfs_flags() -> None:
    assert parse_tmpfs_flag("/run") == MountSpec("tmpfs", "/run")
    assert parse_tmpfs_flag("/run:size=64m,mode=1777,noexec") == MountSpec(
        "tmpfs", "/run", size_bytes=64 * 1024 * 1024
    )
    assert parse_tmpfs_flag("/x:ro,size=512k") == MountSpec(
        "tmpfs", "/x", read_only=True, size_bytes=512 * 1024
    )


@pytest.mark.parametrize("bad", ["run", "/run:size=10q", "/run:size=0", "/run:bogus"])
def test_bad_tmpfs_flags(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_tmpfs_flag(bad)
