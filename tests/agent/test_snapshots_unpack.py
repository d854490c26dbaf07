"""Layer unpacking: hostile tarballs are refused or neutralised; metadata is kept.

These run the unpacker on plain directories (root needed for chown, mknod and trusted
xattrs), then check what a container would see through a real overlay mount.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.archive import ArchiveLimits
from runtime_agent.errors import InvalidArchive, ResourceExhausted
from runtime_agent.images.media import OCI_LAYER
from runtime_agent.snapshots.unpack import remove_tree, unpack_layer

pytestmark = pytest.mark.privileged


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object) -> tuple:
    return (name, kind, data, attrs)


def make_tar(*entries: tuple) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, attrs in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = int(attrs.get("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644))
            info.mtime = int(attrs.get("mtime", 1_600_000_000))
            info.uid = int(attrs.get("uid", 0))
            info.gid = int(attrs.get("gid", 0))
            info.linkname = str(attrs.get("linkname", ""))
            info.devmajor = int(attrs.get("devmajor", 0))
            info.devminor = int(attrs.get("devminor", 0))
            info.pax_headers = dict(attrs.get("pax", {}))
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def unpack(tmp_path: Path, data: bytes) -> Path:
    n = len(list(tmp_path.glob("layer*")))
    dest = tmp_path / f"layer{n}"
    dest.mkdir()
    unpack_layer(io.BytesIO(data), dest)
    return dest


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "file").write_text("original")
    return victim


def test_dotdot_escape_is_refused(tmp_path: Path, outside: Path) -> None:
    data = make_tar(entry("a/../../outside/file", data=b"pwned"))
    with pytest.raises(InvalidArchive, match="outside the layer"):
        unpack(tmp_path, data)
    assert (outside / "file").read_text() == "original"


def test_inner_dotdot_is_cleaned(tmp_path: Path) -> None:
    dest = unpack(tmp_path, make_tar(entry("a/b/../c", data=b"ok")))
    assert (dest / "a" / "c").read_text() == "ok"


def test_absolute_paths_stay_inside(tmp_path: Path) -> None:
    target = tmp_path / "abs-target"
    dest = unpack(tmp_path, make_tar(entry(str(target), data=b"inside")))
    assert not target.exists()
    assert (dest / str(target).lstrip("/")).read_text() == "inside"


def test_write_through_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    data = make_tar(
        entry("evil", tarfile.SYMTYPE, linkname=str(outside)),
        entry("evil/file", data=b"pwned"),
    )
    with pytest.raises(InvalidArchive, match="symlink"):
        unpack(tmp_path, data)
    assert (outside / "file").read_text() == "original"


def test_relative_symlink_escape_is_refused(tmp_path: Path, outside: Path) -> None:
    data = make_tar(
        entry("d", tarfile.DIRTYPE),
        entry("d/up", tarfile.SYMTYPE, linkname="../../outside"),
        entry("d/up/file", data=b"pwned"),
    )
    with pytest.raises(InvalidArchive):
        unpack(tmp_path, data)
    assert (outside / "file").read_text() == "original"


def test_symlink_then_overwrite_does_not_follow(tmp_path: Path, outside: Path) -> None:
    """A file entry replacing a symlink replaces the link, never writes its target."""
    dest = unpack(
        tmp_path,
        make_tar(
            entry("link", tarfile.SYMTYPE, linkname=str(outside / "file")),
            entry("link", data=b"replaced"),
        ),
    )
    assert (outside / "file").read_text() == "original"
    assert not (dest / "link").is_symlink()
    assert (dest / "link").read_text() == "replaced"


def test_symlinks_are_kept_as_links(tmp_path: Path) -> None:
    dest = unpack(tmp_path, make_tar(entry("etc-link", tarfile.SYMTYPE, linkname="/etc/shadow")))
    assert os.readlink(dest / "etc-link") == "/etc/shadow"


def test_hardlink_escape_is_refused(tmp_path: Path, outside: Path) -> None:
    data = make_tar(entry("h", tarfile.LNKTYPE, linkname="../outside/file"))
    with pytest.raises(InvalidArchive):
        unpack(tmp_path, data)
    data = make_tar(entry("h", tarfile.LNKTYPE, linkname=str(outside / "file")))
    with pytest.raises(InvalidArchive):
        unpack(tmp_path, data)
    assert os.stat(outside / "file").st_nlink == 1


def test_hardlink_through_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    data = make_tar(
        entry("s", tarfile.SYMTYPE, linkname=str(outside)),
        entry("h", tarfile.LNKTYPE, linkname="s/file"),
    )
    with pytest.raises(InvalidArchive):
        unpack(tmp_path, data)
    assert os.stat(outside / "file").st_nlink == 1


def test_hardlinks_inside_layer_work(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path, make_tar(entry("a", data=b"x"), entry("b", tarfile.LNKTYPE, linkname="a"))
    )
    assert os.stat(dest / "a").st_ino == os.stat(dest / "b").st_ino


def test_device_nodes_are_skipped(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        make_tar(
            entry("dev", tarfile.DIRTYPE),
            entry("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
            entry("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1),
            entry("fifo", tarfile.FIFOTYPE),
        ),
    )
    assert not (dest / "dev" / "sda").exists()
    assert not (dest / "dev" / "mem").exists()
    assert stat.S_ISFIFO(os.lstat(dest / "fifo").st_mode)


def test_modes_owners_times_xattrs_kept(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        make_tar(
            entry("bin", tarfile.DIRTYPE, mtime=1_500_000_000, mode=0o711),
            entry("bin/su", data=b"#!", mode=0o4755, uid=0, gid=0),
            entry("home", tarfile.DIRTYPE),
            entry("home/u", data=b"mine", mode=0o600, uid=1000, gid=1001, mtime=1_400_000_000),
            entry("cap", data=b"c", pax={"SCHILY.xattr.user.note": "hello"}),
            entry("forged", data=b"f", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        ),
    )
    su = os.stat(dest / "bin" / "su")
    assert stat.S_IMODE(su.st_mode) == 0o4755  # kept, as docker does
    u = os.stat(dest / "home" / "u")
    assert (u.st_uid, u.st_gid, stat.S_IMODE(u.st_mode)) == (1000, 1001, 0o600)
    assert int(u.st_mtime) == 1_400_000_000
    b = os.stat(dest / "bin")
    assert stat.S_IMODE(b.st_mode) == 0o711
    assert int(b.st_mtime) == 1_500_000_000  # set after its children were written
    assert os.getxattr(dest / "cap", "user.note") == b"hello"
    assert "trusted.overlay.opaque" not in os.listxattr(dest / "forged")


def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        make_tar(
            entry("etc", tarfile.DIRTYPE),
            entry("etc/.wh.passwd"),
            entry("opt", tarfile.DIRTYPE),
            entry("opt/.wh..wh..opq"),
            entry("opt/new", data=b"n"),
        ),
    )
    st = os.lstat(dest / "etc" / "passwd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not (dest / "etc" / ".wh.passwd").exists()
    assert os.getxattr(dest / "opt", "trusted.overlay.opaque") == b"y"
    assert (dest / "opt" / "new").read_text() == "n"


@pytest.mark.parametrize(
    "data",
    [b"\x00" * 100 + b"garbage" * 200, make_tar(entry("big", data=b"x" * 5000))[:1200]],
    ids=["garbage", "truncated"],
)
def test_corrupt_tar_is_invalid_archive(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InvalidArchive):
        unpack(tmp_path, data)


def _image(agent: Agent, *layers: bytes, ref: str = "img"):
    descs = []
    for data in layers:
        digest = agent.content.write_bytes(data)
        descs.append({"mediaType": OCI_LAYER, "digest": digest, "size": len(data)})
    return agent.images.commit("acme", ref, {}, descs)


def test_hostile_layer_leaves_no_snapshot_state(agent: Agent, outside: Path) -> None:
    image = _image(agent, make_tar(entry("x/../../../outside/file", data=b"pwned")))
    with pytest.raises(InvalidArchive):
        agent.snapshots.prepare("c", image)
    assert (outside / "file").read_text() == "original"
    assert agent.snapshots.list() == []
    assert [p.name for p in agent.snapshots.layers_dir.iterdir()] == []


def test_whiteouts_hide_lower_files_in_the_mount(agent: Agent) -> None:
    base = make_tar(
        entry("etc", tarfile.DIRTYPE),
        entry("etc/passwd", data=b"root"),
        entry("etc/hosts", data=b"h"),
        entry("opt", tarfile.DIRTYPE),
        entry("opt/old", data=b"o"),
    )
    top = make_tar(
        entry("etc", tarfile.DIRTYPE),
        entry("etc/.wh.passwd"),
        entry("opt", tarfile.DIRTYPE),
        entry("opt/.wh..wh..opq"),
        entry("opt/new", data=b"n"),
    )
    image = _image(agent, base, top)
    try:
        root = agent.snapshots.prepare("c", image)
        assert sorted(os.listdir(root / "etc")) == ["hosts"]
        assert sorted(os.listdir(root / "opt")) == ["new"]
    finally:
        agent.snapshots.remove("c")


def test_layer_not_matching_its_diff_id_is_refused(agent: Agent) -> None:
    image = _image(agent, make_tar(entry("a", data=b"1")))
    # Tamper with the blob on disk behind the store's back.
    path = agent.content.path(image.layers[0]["digest"])
    os.chmod(path, 0o644)
    path.write_bytes(make_tar(entry("a", data=b"2")))
    with pytest.raises(Exception, match="unpacks to"):
        agent.snapshots.prepare("c", image)
    assert agent.snapshots.list() == []


def test_impossible_names_are_invalid_archive(tmp_path: Path) -> None:
    with pytest.raises(InvalidArchive, match="cannot be unpacked"):
        unpack(tmp_path, make_tar(entry("x" * 300, data=b"long name")))
    with pytest.raises(InvalidArchive, match="levels deep"):
        unpack(tmp_path, make_tar(entry("/".join(["d"] * 3000) + "/f", data=b"deep")))
    # Within the cap, deeper than PATH_MAX is fine: the walk is fd-relative.
    deep = "/".join(["dd"] * 1023) + "/f"
    assert len(deep) > 3000
    dest = unpack(tmp_path, make_tar(entry(deep, data=b"deep")))
    fd = os.open(dest, os.O_RDONLY)
    try:
        for _ in range(1023):
            nfd = os.open("dd", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert os.stat("f", dir_fd=fd).st_size == 4
    finally:
        os.close(fd)
    # The refused archive's partial tree is deeper than pytest's own (recursive) clean-up
    # of old temp dirs can remove: take everything out here.
    for child in tmp_path.iterdir():
        remove_tree(child)
    assert not dest.exists()


def test_deep_directory_replaced_by_a_file(tmp_path: Path) -> None:
    """Replacing a hostile, very deep directory neither recurses nor leaves trash."""
    deep = "/".join(["d"] * 1000) + "/f"
    dest = unpack(tmp_path, make_tar(entry(deep, data=b"deep"), entry("d", data=b"file now")))
    assert (dest / "d").read_bytes() == b"file now"
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


def test_many_directories_do_not_exhaust_descriptors(tmp_path: Path) -> None:
    import resource

    count = 1500
    data = make_tar(*[entry(f"d{i}/f", data=b"x") for i in range(count)])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # fewer fds than directories
    try:
        dest = unpack(tmp_path, data)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(os.listdir(dest)) == count
    assert (dest / f"d{count - 1}" / "f").read_bytes() == b"x"


def test_a_later_member_replaces_a_link_and_never_writes_through_it(tmp_path: Path) -> None:
    """A regular file (or directory) named like an earlier hard link or symlink replaces
    the link; the file it pointed at keeps its content and its metadata, and a link
    member's own owner/mode/mtime is never applied to its target."""
    dest = unpack(
        tmp_path,
        make_tar(
            entry("a", data=b"original", mode=0o640, uid=7, mtime=1_000_000_000),
            entry("h", tarfile.LNKTYPE, linkname="a", mode=0o6777, uid=4242, mtime=5),
            entry("h", data=b"replaced"),
            entry("k", tarfile.LNKTYPE, linkname="/a", mode=0o6777, uid=4242, mtime=5),
            entry("s", tarfile.SYMTYPE, linkname="a"),
            entry("s", data=b"replaced too"),
        ),
    )
    assert (dest / "a").read_bytes() == b"original"
    assert (dest / "h").read_bytes() == b"replaced"
    assert (dest / "s").read_bytes() == b"replaced too" and not (dest / "s").is_symlink()
    st = os.stat(dest / "a")
    assert (st.st_mode & 0o7777, st.st_uid, int(st.st_mtime)) == (0o640, 7, 1_000_000_000)
    assert os.stat(dest / "k").st_ino == st.st_ino and st.st_nlink == 2


@pytest.mark.parametrize("cap", ["bytes", "entries", "stream", "header"])
def test_layer_caps_refuse_bombs(tmp_path: Path, cap: str) -> None:
    """A layer stops at the node's caps (here tiny) with the limit named."""
    limits = ArchiveLimits("layer", 1000, 10, "BERTH_LAYER_MAX_BYTES", "BERTH_LAYER_MAX_ENTRIES")
    if cap == "bytes":
        data, error = make_tar(entry("big", data=b"x" * 1001)), "larger than the limit of 1000"
    elif cap == "entries":
        data, error = make_tar(*(entry(f"f{i}") for i in range(11))), "more than the limit of 10"
    elif cap == "stream":  # zeros after the end: padding counts too
        data, error = make_tar(entry("f", data=b"x")) + bytes(1 << 21), "larger than the limit"
    else:
        data = make_tar(entry("f", pax={"comment": "x" * (2 << 20)}))
        error = "extended header"
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises((ResourceExhausted, InvalidArchive), match=error):
        unpack_layer(io.BytesIO(data), dest, limits)
    assert not (dest / "big").exists()
