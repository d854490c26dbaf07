"""Image archives: docker/OCI archives and rootfs tarballs in, docker/OCI archives out.

Tests marked ``docker`` prove compatibility against the real Docker engine on this
machine (and skopeo for a third-party OCI archive); they skip when it is not running.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.errors import DigestMismatch, InvalidArchive, InvalidArgument, NotFound
from runtime_agent.images.archive import parse_changes
from runtime_agent.images.bootstrap import bootstrap_busybox


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


needs_docker = pytest.mark.skipif(not _docker_available(), reason="no running Docker engine")


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _layer_files(agent: Agent, digest: str) -> dict[str, bytes]:
    """Regular files of a layer blob (compressed or not) as {path: bytes}."""
    with tarfile.open(fileobj=agent.content.open(digest), mode="r:*") as tar:
        return {
            m.name.lstrip("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isreg()
        }


def _state(agent: Agent) -> tuple[set[str], dict[str, dict[str, str]]]:
    return set(agent.content.digests()), {
        t: agent.images.references(t) for t in agent.images.tenants()
    }


def _save(agent: Agent, tenant: str, refs: list[str], fmt: str) -> bytes:
    out = io.BytesIO()
    agent.images.save(tenant, refs, out, fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_save_then_load_round_trip(agent: Agent, fmt: str) -> None:
    base = bootstrap_busybox(agent)
    layer = _tar({"app/hello.txt": b"hello"})
    gz = gzip.compress(layer, mtime=0)
    app = agent.images.commit(
        "acme",
        "team/app:v1",
        {"config": {"Cmd": ["cat", "/app/hello.txt"]}},
        [
            *base.layers,
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": agent.content.write_bytes(gz),
                "size": len(gz),
            },
        ],
    )
    archive = _save(agent, "acme", ["team/app:v1", "busybox"], fmt)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = set(tar.getnames())
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert {"manifest.json", "index.json", "oci-layout"} <= names
    assert [e["RepoTags"] for e in manifest] == [["team/app:v1"], ["busybox:latest"]]
    loaded = agent.images.import_archive("beta", io.BytesIO(archive))
    assert [i.reference for i in loaded] == ["team/app:v1", "busybox:latest"]
    # docker load keeps image ids: the config bytes travel unchanged.
    assert loaded[0].config_digest == app.config_digest
    assert loaded[0].diff_ids == app.diff_ids
    assert loaded[0].tenant == "beta"
    got = agent.images.resolve("beta", "team/app:v1")
    assert _layer_files(agent, got.layers[-1]["digest"]) == {"app/hello.txt": b"hello"}
    if fmt == "docker":
        assert all(d["mediaType"].endswith(".tar") for d in got.layers)
    else:
        assert got.manifest_digest == app.manifest_digest


def test_load_with_explicit_reference_and_gzip_archive(agent: Agent) -> None:
    bootstrap_busybox(agent)
    archive = gzip.compress(_save(agent, "acme", ["busybox"], "docker"))
    [image] = agent.images.import_archive("acme", io.BytesIO(archive), "renamed:1")
    assert image.reference == "renamed:1"
    assert agent.images.resolve("acme", "renamed:1").tenant == "acme"


def test_import_rootfs_plain_and_gzip(agent: Agent) -> None:
    rootfs = _tar({"bin/tool": b"#!/bin/sh\n", "etc/motd": b"hi"})
    changes = parse_changes(['CMD ["/bin/tool"]', "ENV A=1 B=2", "WORKDIR /srv", "USER 1000"])
    plain = agent.images.import_rootfs(
        "acme", io.BytesIO(rootfs), "plain", changes=changes, message="from a tarball"
    )
    assert plain.reference == "plain:latest"
    assert plain.container_config == {
        "Cmd": ["/bin/tool"],
        "Env": ["A=1", "B=2"],
        "WorkingDir": "/srv",
        "User": "1000",
    }
    assert plain.config["history"][0]["comment"] == "from a tarball"
    assert plain.diff_ids == [plain.layers[0]["digest"]]
    zipped = agent.images.import_rootfs("acme", io.BytesIO(gzip.compress(rootfs)), "zipped")
    assert zipped.layers[0]["mediaType"].endswith("+gzip")
    assert zipped.diff_ids == plain.diff_ids  # same content, same diff id
    assert _layer_files(agent, zipped.layers[0]["digest"])["etc/motd"] == b"hi"


@pytest.mark.parametrize(
    "bad",
    [
        "CMD [not json",
        "FROM busybox",
        "ENV NOVALUE",
        "WORKDIR",
    ],
)
def test_bad_changes_are_invalid(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_changes([bad])


def _docker_archive(
    layers: list[bytes],
    config: dict | None = None,
    tags: list[str] | None = None,
    *,
    lie_diff_ids: bool = False,
    drop: str | None = None,
) -> bytes:
    import hashlib

    diff_ids = ["sha256:" + hashlib.sha256(lay).hexdigest() for lay in layers]
    if lie_diff_ids:
        diff_ids = ["sha256:" + "0" * 64 for _ in layers]
    cfg = config or {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cfg_bytes = json.dumps(cfg).encode()
    files = {"cfg.json": cfg_bytes}
    paths = []
    for i, lay in enumerate(layers):
        files[f"l{i}/layer.tar"] = lay
        paths.append(f"l{i}/layer.tar")
    files["manifest.json"] = json.dumps(
        [{"Config": "cfg.json", "RepoTags": tags or ["hostile:latest"], "Layers": paths}]
    ).encode()
    if drop:
        del files[drop]
    return _tar(files)


def _hostile_layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../../../etc/cron.d/evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("archive", "error"),
    [
        (b"definitely not a tar archive" * 50, InvalidArchive),
        (_docker_archive([_tar({"a": b"1"})])[:2000], InvalidArchive),
        (_docker_archive([_tar({"a": b"1"})], drop="l0/layer.tar"), InvalidArchive),
        (_docker_archive([_tar({"a": b"1"})], lie_diff_ids=True), InvalidArchive),
        (_docker_archive([_hostile_layer()]), InvalidArchive),
        (_docker_archive([b"\x1f\x8b\x08\x00garbage-gzip"]), InvalidArchive),
        (_docker_archive([_tar({"a": b"1"})], tags=["BAD TAG"]), InvalidArchive),
        (_docker_archive([_tar({"a": b"1"})], config={"no": "rootfs"}), InvalidArchive),
        (_tar({"etc/passwd": b"root"}), InvalidArchive),
    ],
    ids=[
        "garbage",
        "truncated",
        "missing-layer",
        "diff-id-lie",
        "dotdot-layer",
        "corrupt-gzip",
        "bad-tag",
        "no-rootfs",
        "plain-rootfs",
    ],
)
def test_bad_archives_are_refused_without_leftovers(
    agent: Agent, archive: bytes, error: type[Exception]
) -> None:
    bootstrap_busybox(agent)
    before = _state(agent)
    with pytest.raises(error):
        agent.images.import_archive("acme", io.BytesIO(archive))
    assert _state(agent) == before
    assert list(agent.content.ingest_dir.iterdir()) == []


def test_oci_blob_with_wrong_content_is_refused(agent: Agent) -> None:
    bootstrap_busybox(agent)
    archive = _save(agent, "acme", ["busybox"], "oci")
    # Swap the bytes of the layer blob for others of the same size.
    src = tarfile.open(fileobj=io.BytesIO(archive))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isreg() else None  # type: ignore[union-attr]
            if data is not None and member.size > 1_000_000:
                data = b"\0" * member.size
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    before = _state(agent)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as check:
        has_manifest = "manifest.json" in check.getnames()
    assert has_manifest
    with pytest.raises((InvalidArchive, DigestMismatch)):
        agent.images.import_archive("other", io.BytesIO(out.getvalue()))
    assert _state(agent) == before


def test_rootfs_import_rejects_garbage_and_empty(agent: Agent) -> None:
    before = _state(agent)
    for data in (b"", b"not a tarball at all" * 100, _hostile_layer()):
        with pytest.raises(InvalidArchive):
            agent.images.import_rootfs("acme", io.BytesIO(data), "x")
    assert _state(agent) == before


def test_save_unknown_image_is_not_found(agent: Agent) -> None:
    with pytest.raises(NotFound):
        _save(agent, "acme", ["nope"], "docker")
    with pytest.raises(InvalidArgument):
        _save(agent, "acme", ["nope"], "tarball")


# ------------------------------------------------------------------ with Docker


@pytest.fixture
def docker_tag() -> object:
    tag = f"berth-test-{secrets.token_hex(4)}"
    yield tag
    images = subprocess.run(
        ["docker", "images", "-q", "--filter", f"reference={tag}*"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    for ref in (f"{tag}:latest", f"{tag}/app:v1", f"{tag}-oci:latest", *images):
        subprocess.run(["docker", "rmi", "-f", ref], capture_output=True, check=False)


@pytest.mark.docker
@needs_docker
@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_docker_loads_and_runs_our_busybox(
    agent: Agent, tmp_path: Path, docker_tag: str, fmt: str
) -> None:
    bootstrap_busybox(agent)
    agent.images.tag("acme", "busybox", f"{docker_tag}/app:v1")
    archive = tmp_path / "img.tar"
    with open(archive, "wb") as out:
        agent.images.save("acme", [f"{docker_tag}/app:v1"], out, fmt)
    load = subprocess.run(
        ["docker", "load", "-i", str(archive)], capture_output=True, text=True, check=False
    )
    assert load.returncode == 0, load.stderr
    assert f"{docker_tag}/app:v1" in load.stdout
    run = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            f"{docker_tag}/app:v1",
            "sh",
            "-c",
            "true && id -un && test -d /tmp && ls /bin | grep -c .",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    user, applets = run.stdout.split()
    assert user == "root" and int(applets) > 50
    image_id = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", f"{docker_tag}/app:v1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert image_id == agent.images.resolve("acme", f"{docker_tag}/app:v1").config_digest


@pytest.mark.docker
@needs_docker
def test_docker_import_then_save_loads_into_berth(
    agent: Agent, tmp_path: Path, docker_tag: str
) -> None:
    rootfs = _tar({"srv/data.bin": secrets.token_bytes(4096), "etc/motd": b"from docker"})
    (tmp_path / "rootfs.tar").write_bytes(rootfs)
    subprocess.run(
        [
            "docker",
            "import",
            "-c",
            'CMD ["cat", "/etc/motd"]',
            str(tmp_path / "rootfs.tar"),
            f"{docker_tag}:latest",
        ],
        capture_output=True,
        check=True,
    )
    subprocess.run(
        ["docker", "save", "-o", str(tmp_path / "saved.tar"), f"{docker_tag}:latest"],
        capture_output=True,
        check=True,
    )
    docker_id = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", f"{docker_tag}:latest"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(tmp_path / "saved.tar", "rb") as fh:
        [image] = agent.images.import_archive("acme", fh)
    assert image.reference == f"{docker_tag}:latest"
    assert image.config_digest == docker_id
    assert image.container_config["Cmd"] == ["cat", "/etc/motd"]
    files = _layer_files(agent, image.layers[0]["digest"])
    original = {k: v for k, v in _files_of(rootfs).items()}
    assert files == original


def _files_of(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}  # type: ignore[union-attr]


@pytest.mark.docker
@needs_docker
@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_oci_archive_written_by_skopeo_imports(
    agent: Agent, tmp_path: Path, docker_tag: str
) -> None:
    rootfs = _tar({"hello": b"oci"})
    (tmp_path / "rootfs.tar").write_bytes(rootfs)
    subprocess.run(
        ["docker", "import", str(tmp_path / "rootfs.tar"), f"{docker_tag}:latest"],
        capture_output=True,
        check=True,
    )
    oci = tmp_path / "oci.tar"
    subprocess.run(
        [
            "skopeo",
            "copy",
            f"docker-daemon:{docker_tag}:latest",
            f"oci-archive:{oci}:{docker_tag}-oci:latest",
        ],
        capture_output=True,
        check=True,
    )
    with open(oci, "rb") as fh:
        [image] = agent.images.import_archive("acme", fh)
    assert image.reference == f"{docker_tag}-oci:latest"
    assert image.layers[0]["mediaType"].endswith("tar+gzip")
    assert _layer_files(agent, image.layers[0]["digest"]) == {"hello": b"oci"}


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd not installed")
def test_import_rootfs_zstd(agent: Agent) -> None:
    rootfs = _tar({"z": b"zstd layer"})
    packed = subprocess.run(
        ["zstd", "-q", "-c"], input=rootfs, capture_output=True, check=True
    ).stdout
    image = agent.images.import_rootfs("acme", io.BytesIO(packed), "z")
    assert image.layers[0]["mediaType"].endswith("+zstd")
    import hashlib

    assert image.diff_ids == ["sha256:" + hashlib.sha256(rootfs).hexdigest()]


def test_legacy_archive_with_symlinked_duplicate_layer(agent: Agent) -> None:
    """docker <= 24 writes a repeated layer once and symlinks the second copy."""
    import hashlib

    layer = _tar({"same": b"1"})
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id, diff_id]},
        }
    ).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("aaa/layer.tar", layer), ("cfg.json", cfg)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("bbb/layer.tar")
        link.type = tarfile.SYMTYPE
        link.linkname = "../aaa/layer.tar"
        tar.addfile(link)
        manifest = json.dumps(
            [
                {
                    "Config": "cfg.json",
                    "RepoTags": ["dup:1"],
                    "Layers": ["aaa/layer.tar", "bbb/layer.tar"],
                }
            ]
        ).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    [image] = agent.images.import_archive("acme", io.BytesIO(buf.getvalue()))
    assert image.reference == "dup:1"
    assert [d["digest"] for d in image.layers] == [diff_id, diff_id]
    assert len(set(image.chain_ids)) == 2


def test_archive_symlink_pointing_outside_is_refused(agent: Agent) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("manifest.json")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(InvalidArchive):
        agent.images.import_archive("acme", io.BytesIO(buf.getvalue()))


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_containers_image_tools_read_our_archives(agent: Agent, tmp_path: Path, fmt: str) -> None:
    """skopeo uses containers/image, the library podman loads archives with."""
    image = bootstrap_busybox(agent)
    archive = tmp_path / "img.tar"
    with open(archive, "wb") as out:
        agent.images.save("acme", ["busybox"], out, fmt)
    for transport in ("oci-archive", "docker-archive"):
        target = tmp_path / f"copy-{transport}"
        subprocess.run(
            ["skopeo", "copy", "-q", f"{transport}:{archive}", f"dir:{target}"],
            capture_output=True,
            check=True,
        )
        manifest = json.loads((target / "manifest.json").read_text())
        assert manifest["config"]["digest"] == image.config_digest
        assert len(manifest["layers"]) == 1


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd not installed")
@pytest.mark.parametrize("packing", ["file", "pipe-gzip", "pipe-zstd"])
def test_load_from_files_and_compressed_pipes(agent: Agent, tmp_path: Path, packing: str) -> None:
    bootstrap_busybox(agent)
    archive = _save(agent, "acme", ["busybox"], "docker")
    if packing == "file":
        (tmp_path / "a.tar").write_bytes(archive)
        with open(tmp_path / "a.tar", "rb") as fh:
            [image] = agent.images.import_archive("beta", fh)
    else:
        packed = (
            gzip.compress(archive)
            if packing == "pipe-gzip"
            else subprocess.run(
                ["zstd", "-q", "-c"], input=archive, capture_output=True, check=True
            ).stdout
        )
        read_fd, write_fd = os.pipe()
        writer = threading.Thread(target=_write_all, args=(write_fd, packed))
        writer.start()
        with os.fdopen(read_fd, "rb") as pipe:
            [image] = agent.images.import_archive("beta", pipe)
        writer.join()
    assert image.reference == "busybox:latest"
    assert list(agent.content.ingest_dir.iterdir()) == []


def _write_all(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as out:
        out.write(data)
