"""Image store: tenant namespaces over the shared library, commit, tag, remove, GC."""

from __future__ import annotations

import io
import tarfile

import pytest

from runtime_agent.agent import Agent
from runtime_agent.errors import FailedPrecondition, InvalidArgument, NotFound
from runtime_agent.images.bootstrap import bootstrap_busybox
from runtime_agent.images.media import OCI_LAYER, chain_ids
from runtime_agent.images.reference import parse_reference


def _layer(agent: Agent, files: dict[str, bytes]) -> dict:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_700_000_000
            tar.addfile(ti, io.BytesIO(data))
    digest = agent.content.write_bytes(buf.getvalue())
    return {"mediaType": OCI_LAYER, "digest": digest, "size": len(buf.getvalue())}


@pytest.mark.parametrize(
    ("text", "name", "tag"),
    [
        ("busybox", "busybox", "latest"),
        ("library/busybox:1.36", "busybox", "1.36"),
        ("docker.io/library/busybox", "busybox", "latest"),
        ("localhost:5000/team/app:v1", "localhost:5000/team/app", "v1"),
        ("acme/app", "acme/app", "latest"),
    ],
)
def test_reference_normalisation(text: str, name: str, tag: str) -> None:
    ref = parse_reference(text)
    assert (ref.name, ref.tag) == (name, tag)


@pytest.mark.parametrize("bad", ["UPPER", "a b", "app:", "app:-x", ":tag", "a//b", ""])
def test_bad_references(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(bad)


def test_bootstrap_busybox_image(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    assert image.tenant == "library"
    assert image.reference == "busybox:latest"
    assert image.config["config"]["Cmd"] == ["sh"]
    assert any(e.startswith("PATH=") for e in image.config["config"]["Env"])
    assert len(image.layers) == len(image.diff_ids) == len(image.chain_ids) == 1
    assert image.chain_ids == chain_ids(image.diff_ids)
    assert image.size > 1_000_000
    with tarfile.open(fileobj=agent.content.open(image.layers[0]["digest"])) as tar:
        names = set(tar.getnames())
        assert {"bin/busybox", "bin/sh", "etc/passwd", "etc/group", "tmp"} <= names
        assert tar.getmember("tmp").mode == 0o1777
        assert tar.getmember("bin/sh").islnk()
    # Same binary, same image.
    assert bootstrap_busybox(agent).manifest_digest == image.manifest_digest


def test_resolve_prefers_tenant_namespace_then_library(agent: Agent) -> None:
    shared = bootstrap_busybox(agent)
    assert agent.images.resolve("acme", "busybox").manifest_digest == shared.manifest_digest
    assert agent.images.resolve("acme", "busybox").tenant == "library"
    own = agent.images.commit(
        "acme", "busybox", {"config": {"Cmd": ["own"]}}, [_layer(agent, {"own": b"1"})]
    )
    got = agent.images.resolve("acme", "busybox:latest")
    assert got.manifest_digest == own.manifest_digest
    assert got.tenant == "acme"
    # Another tenant still sees the shared one, never acme's.
    assert agent.images.resolve("other", "busybox").manifest_digest == shared.manifest_digest


def test_tenant_images_are_invisible_to_other_tenants(agent: Agent) -> None:
    agent.images.commit("acme", "secret/app:v1", {}, [_layer(agent, {"a": b"1"})])
    with pytest.raises(NotFound):
        agent.images.resolve("other", "secret/app:v1")
    assert agent.images.list("other") == []
    assert [i.reference for i in agent.images.list("acme")] == ["secret/app:v1"]


def test_resolve_by_id_and_digest(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    assert agent.images.resolve("acme", image.short_id).config_digest == image.config_digest
    assert agent.images.resolve("acme", image.config_digest).manifest_digest == (
        image.manifest_digest
    )
    assert agent.images.resolve("acme", f"busybox@{image.manifest_digest}").config_digest == (
        image.config_digest
    )
    with pytest.raises(NotFound):
        agent.images.resolve("acme", "sha256:" + "0" * 64)


def test_commit_builds_consistent_config_and_manifest(agent: Agent) -> None:
    l1 = _layer(agent, {"a": b"1"})
    l2 = _layer(agent, {"b": b"2"})
    image = agent.images.commit(
        "acme", "app:v1", {"config": {"Cmd": ["/a"], "Env": ["X=1"]}}, [l1, l2]
    )
    assert image.diff_ids == [l1["digest"], l2["digest"]]
    assert image.config["rootfs"] == {"type": "layers", "diff_ids": image.diff_ids}
    assert image.config["os"] == "linux"
    assert image.manifest["layers"][1]["digest"] == l2["digest"]
    assert image.size == l1["size"] + l2["size"]
    assert agent.images.resolve("acme", "app:v1").config_digest == image.config_digest


def test_commit_with_missing_blob_is_not_found_and_sets_no_ref(agent: Agent) -> None:
    with pytest.raises(NotFound):
        agent.images.commit("acme", "app", {}, [{"digest": "sha256:" + "1" * 64}])
    assert agent.images.list("acme") == []


def test_tag_and_remove(agent: Agent) -> None:
    bootstrap_busybox(agent)
    tagged = agent.images.tag("acme", "busybox", "mybox:1")
    assert tagged.tenant == "acme"
    assert agent.images.remove("acme", "mybox:1") == ["mybox:1"]
    with pytest.raises(NotFound):
        agent.images.resolve("acme", "mybox:1")
    with pytest.raises(NotFound):
        agent.images.remove("acme", "mybox:1")
    # The shared image is not the tenant's to remove.
    with pytest.raises(FailedPrecondition):
        agent.images.remove("acme", "busybox")
    assert agent.images.resolve("acme", "busybox")


def test_remove_image_in_use_needs_force(agent: Agent) -> None:
    image = agent.images.commit("acme", "app", {}, [_layer(agent, {"a": b"1"})])
    with pytest.raises(FailedPrecondition):
        agent.images.remove("acme", "app", in_use={image.config_digest})
    assert agent.images.remove("acme", "app", force=True, in_use={image.config_digest})


def test_gc_removes_only_unreferenced_blobs(agent: Agent) -> None:
    keep = bootstrap_busybox(agent)
    gone = agent.images.commit("acme", "tmp", {}, [_layer(agent, {"big": b"x" * 4096})])
    agent.images.remove("acme", "tmp")
    # Young blobs survive the default grace period (an import may be under way).
    assert agent.images.gc()[0] == []
    deleted, freed = agent.images.gc(grace_seconds=0)
    assert set(deleted) == {gone.manifest_digest, gone.config_digest, gone.layers[0]["digest"]}
    assert freed > 4096
    for digest in (keep.manifest_digest, keep.config_digest, keep.layers[0]["digest"]):
        assert agent.content.has(digest)
    assert agent.images.resolve("acme", "busybox")


def test_other_tenants_images_cannot_be_reached_by_id_or_digest(agent: Agent) -> None:
    image = agent.images.commit("acme", "private", {}, [_layer(agent, {"s": b"secret"})])
    for ref in (image.config_digest, image.short_id, f"private@{image.manifest_digest}"):
        with pytest.raises(NotFound):
            agent.images.resolve("other", ref)
    with pytest.raises(NotFound):
        agent.images.tag("other", image.config_digest, "stolen")
    with pytest.raises(NotFound):
        agent.images.remove("other", image.config_digest)
    assert agent.images.resolve("acme", image.short_id).reference == "private:latest"
