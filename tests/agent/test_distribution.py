"""The agent's OCI distribution client against a real docker-registry (no auth here;
token auth is exercised in tests/control/test_registry_e2e.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime_agent.agent import Agent
from runtime_agent.distribution import parse_reference, pull, push
from runtime_agent.distribution.errors import ManifestNotFound
from runtime_agent.distribution.media import Platform
from runtime_agent.errors import DigestMismatch, InvalidArgument, NotFound
from tests.registry_process import (
    RegistryProcess,
    busybox_layers,
    make_layer,
    needs_registry,
    skopeo,
    start_registry,
    write_oci_layout,
)

pytestmark = needs_registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    process = start_registry(tmp_path_factory.mktemp("registry"), auth=False)
    yield process
    process.stop()


def skopeo_push(layout: Path, dest: str, *extra: str) -> None:
    result = skopeo("copy", *extra, "--dest-tls-verify=false", f"oci:{layout}", f"docker://{dest}")
    assert result.returncode == 0, result.stderr


def test_pull_by_tag_lands_verified_in_the_tenant_namespace(
    agent: Agent, registry: RegistryProcess, tmp_path: Path
) -> None:
    layers = busybox_layers()
    manifest_digest = write_oci_layout(tmp_path / "img", layers)
    skopeo_push(tmp_path / "img", f"{registry.host}/acme/web:1")

    result = pull(agent, "acme", f"{registry.host}/acme/web:1")

    assert result.digest == manifest_digest
    assert len(result.fetched) == 3  # config + 2 layers
    image = agent.images.resolve("acme", f"{registry.host}/acme/web:1")
    assert image.manifest_digest == manifest_digest
    assert image.container_config["Cmd"] == ["/bin/sh"]
    for descriptor in image.layers:
        assert agent.content.verify(descriptor["digest"])
    # Another tenant does not see it.
    with pytest.raises(NotFound):
        agent.images.resolve("other", f"{registry.host}/acme/web:1")

    again = pull(agent, "acme", f"{registry.host}/acme/web:1")
    assert again.fetched == [] and len(again.skipped) == 3


def test_pull_by_digest_and_shared_layers_skipped(
    agent: Agent, registry: RegistryProcess, tmp_path: Path
) -> None:
    base = busybox_layers()
    write_oci_layout(tmp_path / "a", base)
    skopeo_push(tmp_path / "a", f"{registry.host}/acme/a:1")
    extra = make_layer({"app/data": os.urandom(4096)})
    digest_b = write_oci_layout(tmp_path / "b", [*base, extra])
    skopeo_push(tmp_path / "b", f"{registry.host}/acme/b:1")

    pull(agent, "acme", f"{registry.host}/acme/a:1")
    result = pull(agent, "acme", f"{registry.host}/acme/b@{digest_b}")

    assert result.digest == digest_b
    # Only the new config and the new layer travel; both base layers were present.
    assert len(result.fetched) == 2 and len(result.skipped) == 2
    image = agent.images.resolve("acme", f"{registry.host}/acme/b@{digest_b}")
    assert image.manifest_digest == digest_b


def test_pull_docker_schema2(agent: Agent, registry: RegistryProcess, tmp_path: Path) -> None:
    write_oci_layout(tmp_path / "img", busybox_layers())
    skopeo_push(tmp_path / "img", f"{registry.host}/acme/docker:1", "--format", "v2s2")

    result = pull(agent, "acme", f"{registry.host}/acme/docker:1")

    assert result.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    image = agent.images.resolve("acme", f"{registry.host}/acme/docker:1")
    assert image.manifest["mediaType"] == result.media_type
    assert len(image.layers) == 2


def _write_index(layout: Path, entries: list[tuple[str, str, Path]]) -> None:
    """Merge single-platform layouts into one layout whose index lists each platform."""
    manifests = []
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    for os_name, arch, source in entries:
        for blob in (source / "blobs" / "sha256").iterdir():
            (layout / "blobs" / "sha256" / blob.name).write_bytes(blob.read_bytes())
        desc = json.loads((source / "index.json").read_text())["manifests"][0]
        desc.pop("annotations", None)
        desc["platform"] = {"os": os_name, "architecture": arch}
        manifests.append(desc)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }
    ).encode()
    digest = hashlib.sha256(index).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(index)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": f"sha256:{digest}",
                "size": len(index),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(top))


def test_pull_index_chooses_the_node_platform(
    agent: Agent, registry: RegistryProcess, tmp_path: Path
) -> None:
    amd = write_oci_layout(tmp_path / "amd", busybox_layers({"arch": b"amd64"}))
    arm = write_oci_layout(tmp_path / "arm", busybox_layers({"arch": b"arm64"}))
    _write_index(
        tmp_path / "multi",
        [("linux", "arm64", tmp_path / "arm"), ("linux", "amd64", tmp_path / "amd")],
    )
    skopeo_push(tmp_path / "multi", f"{registry.host}/acme/multi:1", "--all")

    result = pull(
        agent, "acme", f"{registry.host}/acme/multi:1", platform=Platform("linux", "amd64")
    )
    assert result.digest == amd and result.index_digest is not None
    arm_result = pull(
        agent, "arm-tenant", f"{registry.host}/acme/multi:1", platform=Platform("linux", "arm64")
    )
    assert arm_result.digest == arm
    with pytest.raises(NotFound, match="no image for linux/s390x"):
        pull(agent, "acme", f"{registry.host}/acme/multi:1", platform=Platform("linux", "s390x"))


def test_push_then_skopeo_copies_back_byte_equal(
    agent: Agent, registry: RegistryProcess, tmp_path: Path
) -> None:
    blobs = {}
    descriptors = []
    for blob, _ in busybox_layers({"app/payload": os.urandom(200_000)}):
        digest = agent.content.write_bytes(blob)
        blobs[digest] = blob
        descriptors.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest}
        )
    image = agent.images.commit("acme", "app:v1", {"config": {"Cmd": ["/bin/sh"]}}, descriptors)
    agent.images.tag("acme", "app:v1", f"{registry.host}/acme/app:v1")

    result = push(agent, "acme", f"{registry.host}/acme/app:v1")
    assert result.digest == image.manifest_digest
    assert len(result.uploaded) == 3

    out = tmp_path / "out"
    copied = skopeo(
        "copy", "--src-tls-verify=false", f"docker://{registry.host}/acme/app:v1", f"oci:{out}"
    )
    assert copied.returncode == 0, copied.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    for digest, data in blobs.items():
        assert (out / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() == data
    manifest_hex = image.manifest_digest.split(":")[1]
    assert (out / "blobs/sha256" / manifest_hex).read_bytes() == agent.content.read_bytes(
        image.manifest_digest
    )

    # Pushing again uploads nothing.
    again = push(agent, "acme", f"{registry.host}/acme/app:v1")
    assert again.uploaded == [] and len(again.existing) == 3


def test_corrupted_blob_is_refused_and_never_stored(
    agent: Agent, registry: RegistryProcess, tmp_path: Path
) -> None:
    layers = busybox_layers({"app/x": os.urandom(1000)})
    write_oci_layout(tmp_path / "img", layers)
    skopeo_push(tmp_path / "img", f"{registry.host}/acme/bad:1")
    victim = hashlib.sha256(layers[1][0]).hexdigest()
    data = (
        registry.directory
        / "storage/docker/registry/v2/blobs/sha256"
        / victim[:2]
        / victim
        / "data"
    )
    original = data.read_bytes()
    data.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(DigestMismatch):
            pull(agent, "acme", f"{registry.host}/acme/bad:1")
        assert not agent.content.has(f"sha256:{victim}")
        with pytest.raises(NotFound):
            agent.images.resolve("acme", f"{registry.host}/acme/bad:1")
    finally:
        data.write_bytes(original)
    # Rerun after the registry is repaired: completes, reusing blobs already verified.
    result = pull(agent, "acme", f"{registry.host}/acme/bad:1")
    assert f"sha256:{victim}" in result.fetched


def test_unknown_tag_and_bad_references(agent: Agent, registry: RegistryProcess) -> None:
    with pytest.raises(ManifestNotFound) as info:
        pull(agent, "acme", f"{registry.host}/acme/nothing:1")
    assert info.value.registry_code in {"NAME_UNKNOWN", "MANIFEST_UNKNOWN"}
    for bad in ("acme/web:1", f"{registry.host}/Acme/web", f"{registry.host}/acme/web@sha256:zz"):
        with pytest.raises(InvalidArgument):
            pull(agent, "acme", bad)
    assert parse_reference(f"{registry.host}/acme/web").tag == "latest"


class CuttingProxy:
    """A TCP proxy to the registry that drops the first download of one blob after
    ``cut_after`` bytes, as a flaky network would."""

    def __init__(self, upstream: str, blob: str, cut_after: int) -> None:
        self.upstream = upstream.split(":")
        self.blob, self.cut_after = blob, cut_after
        self.cuts = 0
        self.ranges: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.upstream[0], int(self.upstream[1])))
            threading.Thread(target=self._pipe_up, args=(client, upstream), daemon=True).start()

    def _pipe_up(self, client: Any, upstream: Any) -> None:
        state = {"cut": False}
        threading.Thread(
            target=self._pipe_down, args=(upstream, client, state), daemon=True
        ).start()
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                break
            if not data:
                break
            text = data.decode("latin-1")
            if f"/blobs/{self.blob}" in text:
                for line in text.split("\r\n"):
                    if line.lower().startswith("range:"):
                        self.ranges.append(line.split(":", 1)[1].strip())
                if self.cuts == 0 and "range:" not in text.lower():
                    state["cut"] = True
                    self.cuts += 1
            try:
                upstream.sendall(data)
            except OSError:
                break

    def _pipe_down(self, upstream: Any, client: Any, state: dict[str, bool]) -> None:
        sent = 0
        while True:
            try:
                data = upstream.recv(65536)
            except OSError:
                break
            if not data:
                break
            if state["cut"] and sent + len(data) > self.cut_after:
                client.sendall(data[: self.cut_after - sent])
                for sock in (client, upstream):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return
            client.sendall(data)
            sent += len(data)
        client.close()

    def close(self) -> None:
        self.server.close()


def test_dropped_connection_resumes_with_range(
    agent: Agent, registry: RegistryProcess, tmp_path: Path
) -> None:
    big = os.urandom(3_000_000)
    layers = busybox_layers({"app/big": big})
    write_oci_layout(tmp_path / "img", layers)
    skopeo_push(tmp_path / "img", f"{registry.host}/acme/flaky:1")
    victim = "sha256:" + hashlib.sha256(layers[1][0]).hexdigest()
    proxy = CuttingProxy(registry.host, victim, cut_after=1_000_000)
    try:
        # The proxy listens on another loopback port: same registry, same repositories.
        result = pull(agent, "acme", f"{proxy.host}/acme/flaky:1")
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert proxy.ranges and proxy.ranges[0].startswith("bytes=") and proxy.ranges[0] != "bytes=0-"
    assert victim in result.fetched
    assert agent.content.verify(victim)


def test_ensure_image_uses_the_local_image_or_pulls_it(
    agent: Agent, registry: RegistryProcess, tmp_path: Path
) -> None:
    import dataclasses

    from runtime_agent.distribution import ensure_image

    # ensure_image pulls for tenants: only from registries the operator allows.
    agent = Agent(dataclasses.replace(agent.config, allowed_registries=(registry.host,)))
    digest = write_oci_layout(tmp_path / "img", busybox_layers())
    skopeo_push(tmp_path / "img", f"{registry.host}/acme/ensure:1")
    ref = f"{registry.host}/acme/ensure:1"

    assert ensure_image(agent, "acme", ref).manifest_digest == digest  # pulled
    registry_log_size = registry.log.stat().st_size
    assert ensure_image(agent, "acme", ref).manifest_digest == digest  # local, no request
    assert registry.log.stat().st_size == registry_log_size
    with pytest.raises(NotFound):
        ensure_image(agent, "acme", "not-pulled-anywhere:1")
