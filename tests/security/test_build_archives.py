"""Hostile archives a tenant makes the node unpack (issue #17 items 1 and 8).

A tenant controls every byte of its build context, of the archives its Dockerfile ADDs
and of the layers of the images it pushes or imports. The node unpacks them as root, so
each test here is an attack through the real builder (real agent, busybox bootstrap,
runc for RUN steps) or the control plane's build API: hard links, symlinks, ``..`` and
absolute names, device nodes and duplicate names must never name or touch anything
outside the directory being filled, and bombs (a small archive that unpacks to a lot)
stop at the node's caps with a clear error and nothing left behind.

The host file the attacks aim at is a 0600 secret in a directory the test owns; every
attack checks its content, owner, mode, mtime, inode and link count are unchanged.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
import lzma
import os
import secrets
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from runtime_agent.agent import Agent
from runtime_agent.build.events import BuildEvent
from runtime_agent.build.steps import BuildLimits
from runtime_agent.config import AgentConfig
from runtime_agent.errors import AgentError, InvalidArchive, InvalidArgument, ResourceExhausted
from tests.agent.dockerfiles.support import (
    build_cgroups_removed,  # noqa: F401 - fixture
    image_tree,
    make_base,
)

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("build_cgroups_removed")]

T = "mallory"
CAP = 8 << 20  # the caps this module's node runs with (small, so bombs are cheap)
BOMB = 64 << 20  # what a bomb unpacks to: 8x the cap, a few hundred KiB compressed
NO_NET = BuildLimits(network=None, step_timeout=60, context_bytes=CAP)


@pytest.fixture
def agent_config(agent_config: AgentConfig) -> AgentConfig:
    """The test node with small archive caps (the defaults are GiBs)."""
    return dataclasses.replace(
        agent_config,
        context_max_entries=2000,
        add_archive_max_bytes=CAP,
        add_archive_max_entries=2000,
        layer_max_bytes=CAP,
        layer_max_entries=2000,
        build_layers_max_bytes=3 * CAP,
    )


# ------------------------------------------------------------------ the host file
@dataclass(frozen=True)
class HostFile:
    path: Path
    content: bytes

    def snapshot(self) -> tuple[int, ...]:
        st = os.lstat(self.path)
        return (st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns)

    def assert_untouched(self, before: tuple[int, ...]) -> None:
        assert self.path.read_bytes() == self.content
        assert self.snapshot() == before


@pytest.fixture
def secret(tmp_path: Path) -> Iterator[HostFile]:
    """A 0600 root-owned file on the node, outside anything the builder owns."""
    home = tmp_path / "host"
    home.mkdir(mode=0o700)
    path = home / "secret"
    content = f"TOP-SECRET-{secrets.token_hex(8)}\n".encode()
    path.write_bytes(content)
    path.chmod(0o600)
    os.utime(path, ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
    host = HostFile(path, content)
    before = host.snapshot()
    yield host
    host.assert_untouched(before)  # every test, whatever it asserted itself


# ------------------------------------------------------------------ hostile tars
def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    linkname: str = "",
    *,
    hostile: bool = False,
    mode: int | None = None,
    major: int = 0,
    minor: int = 0,
) -> tuple[tarfile.TarInfo, bytes]:
    """One tar member; ``hostile`` gives it owner 4242, mode 06777 and mtime 1, which
    must never reach anything through a link."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    default_mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mode = 0o6777 if hostile else (default_mode if mode is None else mode)
    info.uid = info.gid = 4242 if hostile else 0
    info.mtime = 1 if hostile else 1_600_000_000
    info.devmajor, info.devminor = major, minor
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def dockerfile(text: str) -> tuple[tarfile.TarInfo, bytes]:
    return member("Dockerfile", data=text.encode())


def tar_of(*members: tuple[tarfile.TarInfo, bytes], compress: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return compressed(buf.getvalue(), compress)


def compressed(data: bytes, how: str) -> bytes:
    if how == "gz":
        return gzip.compress(data, compresslevel=6)
    if how == "bz2":
        return bz2.compress(data)
    if how == "xz":
        return lzma.compress(data, preset=0)
    return data


def zeros_tar_gz(name: str, size: int) -> bytes:
    """A gzip bomb: one file of ``size`` zero bytes, streamed (never all in memory)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w|") as tar:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, _Zeros(size))
    return buf.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


# ------------------------------------------------------------------ driving builds
@dataclass
class Attempt:
    events: list[BuildEvent]
    error: AgentError | None

    @property
    def shown(self) -> str:
        """Everything the tenant gets to see: the build's events and its error."""
        text = "".join(f"{e.kind} {e.message}\n" for e in self.events)
        return text + (str(self.error) if self.error else "")


def attempt(
    agent: Agent, context: bytes, tag: str = "attack", limits: BuildLimits = NO_NET
) -> Attempt:
    events: list[BuildEvent] = []
    try:
        for event in agent.builder.build(T, io.BytesIO(context), tag=tag, limits=limits):
            events.append(event)
    except AgentError as exc:
        return Attempt(events, exc)
    return Attempt(events, None)


def assert_refused(
    agent: Agent, result: Attempt, error: type[AgentError], match: str, secret: HostFile
) -> None:
    """The build failed with ``error`` saying ``match``, showed nothing of the secret,
    tagged nothing and left no context directory behind."""
    assert isinstance(result.error, error), result.shown
    assert match in str(result.error), result.shown
    assert secret.content.strip().decode().lower() not in result.shown.lower()
    assert "attack:latest" not in agent.images.references(T)
    assert_no_scratch_left(agent)


def assert_no_scratch_left(agent: Agent) -> None:
    contexts = agent.config.build_cache_dir / ".contexts"
    assert not contexts.exists() or list(contexts.iterdir()) == []
    ingest = agent.config.content_dir / "ingest"
    assert not ingest.exists() or list(ingest.iterdir()) == []
    layers = agent.config.snapshots_dir / "layers"
    assert not layers.exists() or [p for p in layers.iterdir() if p.name.startswith(".")] == []
    scratch = "tenants/*/fs/.build-scratch-*"  # COPY --from's spools
    assert [*agent.config.snapshots_dir.glob(scratch)] == []
    assert [*agent.config.build_cache_dir.glob(".build-scratch-*")] == []


@pytest.fixture
def busybox(agent: Agent, tmp_path: Path) -> Agent:
    make_base(agent, T, tmp_path)
    return agent


LEAK_DOCKERFILE = "FROM busybox\nCOPY leak /leak\nRUN cat /leak\n"


# ------------------------------------------------------------------ item 1: links
def test_hard_link_to_an_absolute_host_file_is_refused(busybox: Agent, secret: HostFile) -> None:
    """The issue's repro: ``leak`` hard-links a 0600 host file; COPY + RUN cat would print
    it and tarfile would re-own, re-mode and re-date the host file through the link."""
    context = tar_of(
        dockerfile(LEAK_DOCKERFILE),
        member("leak", tarfile.LNKTYPE, linkname=str(secret.path), hostile=True),
    )
    result = attempt(busybox, context)
    assert_refused(busybox, result, InvalidArchive, "hard link 'leak'", secret)
    assert "not a file in this build context" in str(result.error)


def test_regular_file_after_hard_link_to_host_file_never_writes_it(
    busybox: Agent, secret: HostFile
) -> None:
    """``w`` hard-links the host file, then a regular ``w`` would write through it."""
    context = tar_of(
        dockerfile("FROM busybox\nCOPY w /w\n"),
        member("w", tarfile.LNKTYPE, linkname=str(secret.path), hostile=True),
        member("w", data=b"PWNED\n", hostile=True),
    )
    result = attempt(busybox, context)
    assert_refused(busybox, result, InvalidArchive, "hard link 'w'", secret)


@pytest.mark.parametrize(
    "spelling",
    [
        "dotdot",  # ../../../../<host path>
        "dotdot-after-dir",  # sub/../../../<host path>
        "dot-slash-dotdot",  # ./../<...>
        "double-slash",  # //<host path>
        "absolute-dotdot",  # /../../<host path>
    ],
)
def test_hard_link_spellings_out_of_the_context_are_refused(
    busybox: Agent, secret: HostFile, spelling: str
) -> None:
    host = str(secret.path).lstrip("/")
    up = "../" * 40
    linkname = {
        "dotdot": up + host,
        "dotdot-after-dir": "sub/" + up + host,
        "dot-slash-dotdot": "./" + up + host,
        "double-slash": "//" + host,
        "absolute-dotdot": "/../../" + host,
    }[spelling]
    context = tar_of(
        dockerfile(LEAK_DOCKERFILE),
        member("sub/", tarfile.DIRTYPE),
        member("leak", tarfile.LNKTYPE, linkname=linkname, hostile=True),
    )
    result = attempt(busybox, context)
    # Climbing out is refused as such; a rooted name is looked up inside the context,
    # where no such file exists.
    assert isinstance(result.error, InvalidArchive), result.shown
    assert_refused(busybox, result, InvalidArchive, "'leak'", secret)


@pytest.mark.parametrize("symlink", ["absolute", "relative"])
def test_hard_link_through_an_earlier_symlink_is_refused(
    busybox: Agent, secret: HostFile, symlink: str
) -> None:
    """``d`` -> the secret's directory, then ``leak`` hard-links ``d/secret``."""
    target = (
        str(secret.path.parent)
        if symlink == "absolute"
        else "../" * 40 + str(secret.path.parent).lstrip("/")
    )
    context = tar_of(
        dockerfile(LEAK_DOCKERFILE),
        member("d", tarfile.SYMTYPE, linkname=target),
        member("leak", tarfile.LNKTYPE, linkname="d/secret", hostile=True),
    )
    result = attempt(busybox, context)
    assert_refused(busybox, result, InvalidArchive, "symlink 'd' points outside", secret)


@pytest.mark.parametrize("through", ["dir-symlink", "same-name-symlink"])
def test_file_written_through_an_earlier_symlink_is_refused(
    busybox: Agent, secret: HostFile, through: str
) -> None:
    """A symlink out (to the directory, or to the file itself), then a regular member
    written through it."""
    if through == "dir-symlink":
        link, name = member("d", tarfile.SYMTYPE, linkname=str(secret.path.parent)), "d/secret"
    else:
        link, name = member("s", tarfile.SYMTYPE, linkname=str(secret.path)), "s"
    context = tar_of(
        dockerfile("FROM busybox\nRUN true\n"), link, member(name, data=b"PWNED\n", hostile=True)
    )
    result = attempt(busybox, context)
    assert_refused(busybox, result, InvalidArchive, "points outside the build context", secret)


def test_symlink_chain_that_resolves_out_of_the_context_is_refused(
    busybox: Agent, secret: HostFile
) -> None:
    """Each link stays inside on paper, yet ``Dockerfile`` resolves to the host file:
    ``a/../l -> ../..`` is the context root, and ``..`` after it climbs above. The
    builder reads the Dockerfile, and a parse error would quote the secret."""
    depth = 40
    dirs = "/".join(f"d{i}" for i in range(depth))
    chain = f"{dirs}/l/" + "../" * depth + str(secret.path).lstrip("/")
    context = tar_of(
        member(f"{dirs}/l", tarfile.SYMTYPE, linkname="../" * depth),
        member("Dockerfile", tarfile.SYMTYPE, linkname=chain),
    )
    result = attempt(busybox, context)
    assert_refused(
        busybox, result, InvalidArchive, "'Dockerfile' resolves outside the build context", secret
    )


def test_long_symlink_chains_are_refused_at_the_kernels_bound(
    busybox: Agent, secret: HostFile
) -> None:
    """1500 links each pointing at the previous one: every one is inside on paper, and
    resolving them one by one in Python cost seconds per hundreds of links, with a
    ``RecursionError`` (no agent error) past ~1000. The kernel stops at 40."""
    links = [member("l0", tarfile.SYMTYPE, linkname="Dockerfile.real")]
    links += [member(f"l{i}", tarfile.SYMTYPE, linkname=f"l{i - 1}") for i in range(1, 1500)]
    context = tar_of(dockerfile("FROM busybox\n"), *links)
    result = attempt(busybox, context)
    assert_refused(busybox, result, InvalidArchive, "loops or chains too deep", secret)


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("mtime", "1e400", "impossible time"),  # tarfile reads infinity
        ("mtime", "-1e400", "impossible time"),
        ("uid", str(1 << 70), "impossible owner"),
        ("gid", str(1 << 40), "impossible owner"),
    ],
)
def test_pax_numbers_no_file_can_have_are_refused(
    busybox: Agent, secret: HostFile, field: str, value: str, said: str
) -> None:
    """PAX headers carry numbers as text of any size: they raised a bare
    ``OverflowError`` in ``os.utime``/``os.chown`` instead of a clear refusal."""
    info, data = member("x", data=b"x")
    info.pax_headers = {field: value}
    result = attempt(busybox, tar_of(dockerfile("FROM busybox\nCOPY x /x\n"), (info, data)))
    assert_refused(busybox, result, InvalidArchive, said, secret)


def test_same_names_replace_and_never_write_through(agent: Agent, secret: HostFile) -> None:
    """Duplicate names: a later member replaces an earlier one (file, hard link, symlink
    or directory) and never writes into what it pointed at; links inside the context
    keep working."""
    context = tar_of(
        dockerfile("FROM scratch\nCOPY . /ctx/\n"),
        member("inner", data=b"original"),
        member("w", tarfile.LNKTYPE, linkname="inner", hostile=True),
        member("w", data=b"replaced-w"),
        member("s", tarfile.SYMTYPE, linkname="inner"),
        member("s", data=b"replaced-s"),
        member("f", data=b"one"),
        member("f", data=b"two"),
        member("d", data=b"a file first"),
        member("d/", tarfile.DIRTYPE),
        member("d/f", data=b"in-dir"),
        member("kept", tarfile.LNKTYPE, linkname="/inner", hostile=True),  # rooted: in the context
    )
    result = attempt(agent, context, tag="dups")
    assert result.error is None, result.shown
    tree = image_tree(agent, T, "dups")
    assert tree["/ctx/inner"][4] == "original"
    assert tree["/ctx/w"][4] == "replaced-w"
    assert tree["/ctx/s"][:1] == ("file",) and tree["/ctx/s"][4] == "replaced-s"
    assert tree["/ctx/f"][4] == "two"
    assert tree["/ctx/d"][0] == "dir" and tree["/ctx/d/f"][4] == "in-dir"
    assert tree["/ctx/kept"][4] == "original"
    assert tree["/ctx/kept"][1] == 0o644  # the link member's 06777 was not applied
    assert_no_scratch_left(agent)


def test_absolute_member_names_land_inside_the_context(
    agent: Agent, secret: HostFile, tmp_path: Path
) -> None:
    planted = tmp_path / "planted"
    context = tar_of(
        dockerfile("FROM scratch\nCOPY . /ctx/\n"),
        member(str(planted), data=b"abs"),
        member("//" + str(planted) + "2", data=b"abs2"),
        member(str(secret.path), data=b"PWNED\n", hostile=True),
    )
    result = attempt(agent, context, tag="abs")
    assert result.error is None, result.shown
    assert not planted.exists() and not Path(str(planted) + "2").exists()
    tree = image_tree(agent, T, "abs")
    assert tree[f"/ctx{planted}"][4] == "abs"
    assert tree[f"/ctx{secret.path}"][4] == "PWNED\n"  # the tenant's own copy, inside
    assert_no_scratch_left(agent)


@pytest.mark.parametrize("name", ["../planted", "a/../../planted", "./../planted", "/../planted"])
def test_dotdot_member_names_are_refused(agent: Agent, secret: HostFile, name: str) -> None:
    context = tar_of(dockerfile("FROM scratch\nCOPY . /ctx/\n"), member(name, data=b"x"))
    result = attempt(agent, context)
    assert_refused(agent, result, InvalidArchive, "points outside the build context", secret)
    assert not (agent.config.build_cache_dir / "planted").exists()


def test_device_nodes_and_fifos_are_never_made(agent: Agent, secret: HostFile) -> None:
    """A block device of the node's disk, /dev/mem's numbers and a FIFO: skipped, so
    nothing in the context opens a device of the node; a hard link to a skipped node
    has nothing to link to."""
    context = tar_of(
        dockerfile("FROM scratch\nCOPY . /ctx/\n"),
        member("disk", tarfile.BLKTYPE, major=8, minor=0, mode=0o666),
        member("mem", tarfile.CHRTYPE, major=1, minor=1, mode=0o666),
        member("pipe", tarfile.FIFOTYPE),
        member("f", data=b"ok"),
    )
    result = attempt(agent, context, tag="dev")
    assert result.error is None, result.shown
    tree = image_tree(agent, T, "dev")
    assert "/ctx/f" in tree
    assert not {"/ctx/disk", "/ctx/mem", "/ctx/pipe"} & set(tree)
    linked = tar_of(
        dockerfile("FROM scratch\nCOPY . /ctx/\n"),
        member("disk", tarfile.BLKTYPE, major=8, minor=0, mode=0o666),
        member("hl", tarfile.LNKTYPE, linkname="disk"),
    )
    assert_refused(agent, attempt(agent, linked), InvalidArchive, "hard link 'hl'", secret)


# ------------------------------------------------------------------ ADD archives
def test_add_archive_links_stay_in_the_image(busybox: Agent, secret: HostFile) -> None:
    """ADD writes a layer, not the node: a hard link must name a file of the archive,
    and a regular file after a hard link of its name replaces the link. RUN unpacks the
    layer for real (snapshotter), so the link must also hold there."""
    archive = tar_of(
        member("inner", data=b"original\n"),
        member("w", tarfile.LNKTYPE, linkname="inner", hostile=True),
        member("w", data=b"replaced\n"),
        member("h", tarfile.LNKTYPE, linkname="./inner", hostile=True),
        compress="gz",
    )
    context = tar_of(
        dockerfile("FROM busybox\nADD a.tar.gz /x/\nRUN cat /x/inner /x/w /x/h\n"),
        member("a.tar.gz", data=archive),
    )
    result = attempt(busybox, context, tag="add-links")
    assert result.error is None, result.shown
    output = "".join(e.message for e in result.events if e.kind == "output")
    assert output == "original\nreplaced\noriginal\n"

    replaced = [  # the link's target, written as a file, then made a directory by an alias
        member("s", tarfile.SYMTYPE, linkname="t"),
        member("t/f", data=b"was a file"),
        member("s/f/", tarfile.DIRTYPE),
    ]
    for linkname in (str(secret.path), "../" * 40 + str(secret.path).lstrip("/"), "missing", "t/f"):
        hostile = tar_of(
            *(replaced if linkname == "t/f" else []),
            member("leak", tarfile.LNKTYPE, linkname=linkname, hostile=True),
            compress="gz",
        )
        context = tar_of(
            dockerfile("FROM busybox\nADD a.tar.gz /x/\nRUN cat /x/leak\n"),
            member("a.tar.gz", data=hostile),
        )
        result = attempt(busybox, context)
        assert_refused(busybox, result, InvalidArgument, "leak", secret)


# ------------------------------------------------------------------ item 8: bombs
@pytest.mark.parametrize("how", ["gz", "bz2", "xz"])
def test_context_bomb_stops_at_the_cap(agent: Agent, secret: HostFile, how: str) -> None:
    bomb = tar_of(dockerfile("FROM scratch\n"), member("big", data=bytes(BOMB)), compress=how)
    assert len(bomb) < BOMB // 100
    result = attempt(agent, bomb)
    assert_refused(
        agent,
        result,
        ResourceExhausted,
        f"build context is larger than the limit of {CAP} bytes unpacked",
        secret,
    )


def test_context_member_count_and_header_bombs(agent: Agent, secret: HostFile) -> None:
    many = tar_of(
        dockerfile("FROM scratch\n"), *(member(f"f{i}") for i in range(2001)), compress="gz"
    )
    result = attempt(agent, many)
    assert_refused(agent, result, ResourceExhausted, "more than the limit of 2000 entries", secret)
    assert "BERTH_CONTEXT_MAX_ENTRIES" in str(result.error)

    # A PAX header tarfile would read whole into memory.
    info, data = member("big-header", data=b"x")
    info.pax_headers = {"comment": "x" * (4 << 20)}
    result = attempt(agent, tar_of(dockerfile("FROM scratch\n"), (info, data), compress="gz"))
    assert_refused(agent, result, InvalidArchive, "extended header", secret)

    # Zeros after the end of the archive still have to be read: they count too.
    trailing = gzip.compress(tar_of(dockerfile("FROM scratch\n")) + bytes(BOMB))
    result = attempt(agent, trailing)
    assert_refused(agent, result, ResourceExhausted, "build context is larger", secret)


def test_add_archive_bomb_stops_at_the_cap(agent: Agent, secret: HostFile) -> None:
    context = tar_of(
        dockerfile("FROM scratch\nADD bomb.tar.gz /\n"),
        member("bomb.tar.gz", data=zeros_tar_gz("big", BOMB)),
    )
    result = attempt(agent, context)
    assert_refused(
        agent,
        result,
        ResourceExhausted,
        f"ADD archive is larger than the limit of {CAP} bytes unpacked "
        "(set by BERTH_ADD_ARCHIVE_MAX_BYTES)",
        secret,
    )
    many = tar_of(*(member(f"f{i}") for i in range(2001)), compress="xz")
    context = tar_of(
        dockerfile("FROM scratch\nADD many.tar.xz /\n"), member("many.tar.xz", data=many)
    )
    result = attempt(agent, context)
    assert_refused(agent, result, ResourceExhausted, "ADD archive has more than", secret)


def test_layer_bomb_stops_at_the_cap(busybox: Agent, secret: HostFile) -> None:
    """An image whose layer is a gzip bomb (planted as a pull would leave it; an import
    is refused outright, see below): running a step on it, and COPY --from it, stop at
    the node's layer cap."""
    _plant_image(busybox, "bomb:latest", zeros_tar_gz("big", BOMB))
    result = attempt(busybox, tar_of(dockerfile("FROM bomb\nRUN true\n")))
    assert_refused(
        busybox,
        result,
        ResourceExhausted,
        f"layer is larger than the limit of {CAP} bytes unpacked (set by BERTH_LAYER_MAX_BYTES)",
        secret,
    )
    result = attempt(busybox, tar_of(dockerfile("FROM scratch\nCOPY --from=bomb /big /big\n")))
    assert_refused(busybox, result, ResourceExhausted, "layer is larger than the limit", secret)


# ------------------------------------------------------------------ through the API
@pytest.mark.timeout(600)
def test_hard_link_attack_through_the_build_api(
    cluster: object, secret: HostFile, tmp_path: Path, settings: object
) -> None:
    """The issue's repro as a tenant sends it: POST the context to the build API; the
    build fails on the node, its log says why and never shows the file."""
    from tests.e2e.test_builds import _follow, _post_build
    from tests.e2e.test_dispatch import _client

    settings.BERTH_BUILD_CONTEXT_DIR = tmp_path / "ctx"  # type: ignore[attr-defined]
    client = _client("mallory")
    context = tar_of(
        dockerfile(LEAK_DOCKERFILE),
        member("leak", tarfile.LNKTYPE, linkname=str(secret.path), hostile=True),
    )
    build_id = _post_build(client, "mallory", "tag=leak:v1", context)
    lines = _follow(client, "mallory", build_id)
    log = json.dumps(lines)
    assert lines[-1]["state"] == "failed", lines
    assert "hard link 'leak'" in lines[-1]["reason"], lines[-1]
    assert secret.content.strip().decode() not in log


# ------------------------------------------------------------------ the control plane
def _bomb_contexts() -> dict[str, tuple[bytes, int, str]]:
    """Uploads the control plane must refuse: (context, status, what the error says)."""
    info, data = member("big-header", data=b"x")
    info.pax_headers = {"comment": "x" * (4 << 20)}
    df = dockerfile("FROM scratch\n")
    return {
        "gz bomb": (tar_of(df, member("big", data=bytes(BOMB)), compress="gz"), 413, "unpacked"),
        "bz2 bomb": (tar_of(df, member("big", data=bytes(BOMB)), compress="bz2"), 413, "unpacked"),
        "xz bomb": (tar_of(df, member("big", data=bytes(BOMB)), compress="xz"), 413, "unpacked"),
        "trailing zeros": (gzip.compress(tar_of(df) + bytes(BOMB)), 413, "unpacked"),
        "member count": (
            tar_of(df, *(member(f"f{i}") for i in range(2001)), compress="gz"),
            413,
            "more than the limit of 2000 entries (set by BERTH_CONTEXT_MAX_ENTRIES)",
        ),
        "pax header": (tar_of(df, (info, data), compress="gz"), 400, "extended header"),
        "dotdot name": (tar_of(df, member("a/../../x", data=b"x")), 400, "points outside"),
    }


@pytest.mark.parametrize("case", sorted(_bomb_contexts()))
def test_context_bombs_are_refused_at_upload_by_the_control_plane(
    case: str,
    make_tenant: object,
    make_token: object,
    client_for: object,
    tmp_path: Path,
    settings: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /builds/ with a context that is small compressed and huge unpacked (or holds
    too many members, a header tarfile would buffer, a name that climbs out): the control
    plane reads it through the node's capped reader, answers 413/400 in the API error
    format naming the limit, keeps no file and creates no build. The byte cap is the
    node's own unpacked context cap (lowered here to keep the test cheap)."""
    from tenants.choices import Scope
    from workloads.models import Build

    context, status, says = _bomb_contexts()[case]
    settings.BERTH_BUILD_CONTEXT_DIR = tmp_path / "ctx"  # type: ignore[attr-defined]
    settings.BERTH_BUILD_CONTEXT_MAX_UNPACKED_BYTES = CAP  # type: ignore[attr-defined]
    monkeypatch.setenv("BERTH_CONTEXT_MAX_ENTRIES", "2000")
    tenant, owner = make_tenant("mallory")  # type: ignore[operator]
    client = client_for(make_token(tenant, owner, Scope.WRITE))  # type: ignore[operator]
    response = client.generic(
        "POST",
        "/api/v1/tenants/mallory/builds/?tag=bomb",
        context,
        content_type="application/x-tar",
    )
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert says in error["message"], error
    if status == 413:
        assert error["code"] == "context_too_large"
        if "unpacked" in says:
            assert f"limit of {CAP} bytes unpacked" in error["message"]
            assert error["details"]["limit"] == CAP
    assert Build.objects.count() == 0
    assert list((tmp_path / "ctx").iterdir()) == []


@pytest.mark.timeout(180)
def test_terabyte_context_bomb_costs_the_control_plane_seconds(
    make_tenant: object, make_token: object, client_for: object, tmp_path: Path, settings: object
) -> None:
    """At the default caps (the node's 2 GiB unpacked context): a ~1 MB bzip2 upload
    declaring and holding 1 TiB. The old check (tarfile r:*) decompressed all of it to
    skip the member (hours of a request thread); now its header alone is refused."""
    import time

    from tenants.choices import Scope

    info, data = dockerfile("FROM scratch\n")
    big = tarfile.TarInfo("big")
    big.size = 1 << 40
    head = info.tobuf(tarfile.PAX_FORMAT) + data.ljust(512, b"\0") + big.tobuf(tarfile.PAX_FORMAT)
    zeros = bz2.compress(bytes(256 << 20))
    bomb = bz2.compress(head) + zeros * 4096  # concatenated bzip2 streams: 1 TiB of data
    assert len(bomb) < 2 << 20
    settings.BERTH_BUILD_CONTEXT_DIR = tmp_path / "ctx"  # type: ignore[attr-defined]
    tenant, owner = make_tenant("mallory")  # type: ignore[operator]
    client = client_for(make_token(tenant, owner, Scope.WRITE))  # type: ignore[operator]
    started = time.monotonic()
    response = client.generic(
        "POST", "/api/v1/tenants/mallory/builds/?tag=bomb", bomb, content_type="application/x-tar"
    )
    assert time.monotonic() - started < 30
    assert response.status_code == 413, response.content
    assert f"limit of {2 << 30} bytes unpacked" in response.json()["error"]["message"]
    assert list((tmp_path / "ctx").iterdir()) == []


def test_context_check_keeps_no_headers_in_memory() -> None:
    """A streaming tarfile keeps every header it read; thousands of members with long
    PAX names would pile up in the checker's memory. The reader drops each one."""
    import tracemalloc

    from runtime_agent.archive import ArchiveLimits, scan

    names = [member(f"{i:05d}-" + "n" * 16_000) for i in range(1200)]
    context = tar_of(*names, compress="gz")
    limits = ArchiveLimits("build context", CAP, 5000)
    tracemalloc.start()
    try:
        result = scan(io.BytesIO(context), limits)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.entries == 1200
    assert peak < 8 << 20, peak  # the names alone are 19 MB (kept twice without the fix)


# ------------------------------------------------------------------ image trees
def _multi_member_gzip(tar_head: bytes, zeros: int, tail: bytes) -> bytes:
    """``tar_head`` + ``zeros`` zero bytes + ``tail``, gzip-compressed as concatenated
    members: a 2 GiB layer in a few MB, made without compressing 2 GiB."""
    mib = gzip.compress(bytes(1 << 20), compresslevel=9)
    parts = [gzip.compress(tar_head)]
    parts += [mib] * (zeros >> 20)
    parts.append(gzip.compress(bytes(zeros & ((1 << 20) - 1)) + tail))
    return b"".join(parts)


def _huge_passwd_layer(size: int) -> bytes:
    """A layer whose etc/passwd is ``size`` bytes (zeros after a root line)."""
    info = tarfile.TarInfo("etc/passwd")
    info.size = size
    head = info.tobuf(tarfile.PAX_FORMAT) + b"root:x:0:0:root:/root:/bin/sh\n"
    rest = size - len(b"root:x:0:0:root:/root:/bin/sh\n")
    pad = (512 - size % 512) % 512
    return _multi_member_gzip(head, rest, bytes(pad) + bytes(1024))


def _plant_image(agent: Agent, ref: str, layer: bytes) -> None:
    """An image as a pull would leave it: the layer blob in the content store and its diff
    id known from the registry's config (never computed by decompressing the bomb)."""
    writer = agent.content.writer()
    writer.write(layer)
    digest, _size = writer.commit()
    cache = agent.images._diff_id_dir
    cache.mkdir(parents=True, exist_ok=True)
    (cache / digest.split(":", 1)[1]).write_text("sha256:" + "0" * 64)
    image = agent.images.commit(T, None, {}, [{"mediaType": LAYER_GZIP, "digest": digest}])
    agent.images.set_reference(T, ref, image.manifest_digest)


LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.mark.timeout(120)
def test_two_gib_passwd_layer_fails_fast(busybox: Agent, secret: HostFile) -> None:
    """An image whose /etc/passwd is 2 GiB: COPY --chown=user and USER lookups read the
    image's tree and stop at the layer's header (the node's layer cap), without
    decompressing or loading 2 GiB."""
    import time

    _plant_image(busybox, "bigpw:latest", _huge_passwd_layer(2 << 30))
    for text in (
        "FROM bigpw\nCOPY --chown=root f /f\n",
        "FROM bigpw\nUSER root\nRUN true\n",
        "FROM scratch\nCOPY --from=bigpw /etc/passwd /p\n",
    ):
        started = time.monotonic()
        result = attempt(busybox, tar_of(dockerfile(text), member("f", data=b"f")))
        assert time.monotonic() - started < 30
        assert_refused(busybox, result, ResourceExhausted, "layer is larger than the limit", secret)


def test_big_passwd_under_the_layer_cap_is_not_loaded(busybox: Agent, secret: HostFile) -> None:
    """A /etc/passwd under the layer cap but over what a user lookup reads
    (``ID_FILE_MAX_BYTES``): --chown and USER refuse it from its header, with a clear
    error, and the lookup allocates next to nothing."""
    import tracemalloc

    from runtime_agent.build.layers import ID_FILE_MAX_BYTES, index_for, lookup_ids

    big = ID_FILE_MAX_BYTES + (1 << 20)
    assert big < CAP
    lines = b"root:x:0:0:root:/root:/bin/sh\n" + b"#" * (big - 31) + b"\n"
    base = tar_of(
        dockerfile("FROM busybox\nCOPY passwd /etc/passwd\n"), member("passwd", data=lines)
    )
    assert attempt(busybox, base, tag="bigpw").error is None
    says = f"/etc/passwd in the image is {big} bytes; at most {ID_FILE_MAX_BYTES} are read"
    for text in ("FROM bigpw\nCOPY --chown=root f /f\n", "FROM bigpw\nUSER root\nRUN true\n"):
        result = attempt(busybox, tar_of(dockerfile(text), member("f", data=b"f")))
        assert_refused(busybox, result, ResourceExhausted, says, secret)
    image = busybox.images.resolve(T, "bigpw")
    index = index_for(busybox.content, image.layers, busybox.config.layer_limits)
    tracemalloc.start()
    try:
        with pytest.raises(ResourceExhausted, match="at most"):
            lookup_ids(index, busybox.content, "root")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak


def _docker_archive(layer: bytes) -> bytes:
    """A ``docker save`` archive of one image whose one layer is ``layer``."""
    import hashlib

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = hashlib.sha256(layer).hexdigest() + "/layer.tar"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": ["bomb:latest"], "Layers": [layer_name]}]
    ).encode()
    return tar_of(
        member("manifest.json", data=manifest),
        member(config_name, data=config),
        member(layer_name, data=layer),
    )


@pytest.mark.timeout(120)
def test_layer_bomb_in_an_imported_archive_is_refused(agent: Agent, secret: HostFile) -> None:
    """``docker load``/``docker import`` of an image whose layer is a 2 GiB gzip bomb (or
    holds too many members): refused at import by the node's layer caps, before its diff
    id is computed, nothing tagged and no blob kept."""
    import time

    bomb = _huge_passwd_layer(2 << 30)
    many = tar_of(*(member(f"f{i}") for i in range(2001)), compress="gz")
    for layer, says in ((bomb, "layer is larger than the limit"), (many, "more than the limit")):
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match=says):
            agent.images.import_archive(T, io.BytesIO(_docker_archive(layer)))
        with pytest.raises(ResourceExhausted, match=says):
            agent.images.import_rootfs(T, io.BytesIO(layer), "bomb:latest")
        assert time.monotonic() - started < 30
    assert agent.images.references(T) == {}
    assert_no_scratch_left(agent)


# ------------------------------------------------------------------ per-build total
@pytest.mark.parametrize("shape", ["adds", "copy-from stages"])
def test_many_archives_each_under_the_cap_stop_at_the_build_total(
    agent: Agent, secret: HostFile, shape: str
) -> None:
    """Four archives of 7 MiB each, every one under the 8 MiB ADD archive cap, add up to
    more than the build's 24 MiB total (``BERTH_BUILD_LAYERS_MAX_BYTES``): the build stops
    with ResourceExhausted naming the limit, whether the bytes come from ADDs or from
    COPY --from of an earlier stage."""
    part = 7 << 20
    files = [member(f"p{i}.tar.gz", data=zeros_tar_gz("blob", part)) for i in range(4)]
    if shape == "adds":
        text = "FROM scratch\n" + "".join(f"ADD p{i}.tar.gz /p{i}/\n" for i in range(4))
    else:
        text = "FROM scratch AS s\nADD p0.tar.gz /p/\nFROM scratch\n" + "".join(
            f"COPY --from=s /p /c{i}\n" for i in range(3)
        )
    result = attempt(agent, tar_of(dockerfile(text), *files))
    limit = agent.config.build_layers_max_bytes
    assert_refused(
        agent,
        result,
        ResourceExhausted,
        f"more than the limit of {limit} bytes per build (set by BERTH_BUILD_LAYERS_MAX_BYTES)",
        secret,
    )


# ------------------------------------------------------------------ COPY --from scratch
@pytest.mark.parametrize("fails", [False, True])
def test_copy_from_scratch_is_on_the_tenant_filesystem_and_removed(
    busybox: Agent, secret: HostFile, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """COPY --from spools the files it reads out of an image under the tenant's capped
    layer filesystem (never the system's /tmp), and removes them when the step ends,
    whether it succeeded or failed."""
    from runtime_agent.build import builder as builder_module

    made: list[tuple[Path, IO[bytes]]] = []
    real_new = builder_module._Spools.new

    def new(self: builder_module._Spools) -> IO[bytes]:
        spool = real_new(self)
        assert self.dir is not None
        made.append((self.dir, spool))
        return spool

    import tempfile

    monkeypatch.setattr(builder_module._Spools, "SPILL_BYTES", 0)  # every file spills
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/system-tmp")  # using it fails
    monkeypatch.setattr(builder_module._Spools, "new", new)
    chown = " --chown=nobody-here" if fails else ""
    text = f"FROM scratch\nCOPY --from=busybox{chown} /bin /bin\n"
    result = attempt(busybox, tar_of(dockerfile(text)))
    assert (result.error is not None) == fails, result.shown
    assert made
    fs = busybox.snapshots.tenant_fs(T)
    for directory, spool in made:
        assert directory.parent == fs
        assert directory.name.startswith(builder_module.SCRATCH_PREFIX)
        assert spool.closed
        assert not directory.exists()
    assert [p.name for p in fs.iterdir() if p.name.startswith(".build")] == []
