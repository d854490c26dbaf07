"""A real docker-registry process for tests, and OCI image layouts to push into it.

``start_registry`` renders the config with ``infra/registry/registry.sh setup`` (the same
script production uses) on a free 127.0.0.1 port and runs ``docker-registry serve``;
``auth=False`` drops the token auth and notification sections for tests of the agent's
client alone.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

PROJECT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT / "infra" / "registry" / "registry.sh"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


needs_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None or shutil.which("skopeo") is None,
    reason="needs docker-registry and skopeo (infra/setup.sh installs them)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RegistryProcess:
    host: str  # "127.0.0.1:<port>"
    directory: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def gc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-registry", "garbage-collect", *args, str(self.directory / "config.yml")],
            capture_output=True,
            text=True,
            check=True,
        )


def _strip_sections(config: str, names: tuple[str, ...]) -> str:
    out, skipping = [], False
    for line in config.splitlines():
        if line and not line.startswith((" ", "#")):
            skipping = line.split(":", 1)[0] in names
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def start_registry(
    directory: Path, *, auth: bool = True, realm: str = "", notify_url: str = ""
) -> RegistryProcess:
    port = free_port()
    env = dict(
        os.environ,
        BERTH_REGISTRY_DIR=str(directory),
        BERTH_REGISTRY_ADDR=f"127.0.0.1:{port}",
        BERTH_REGISTRY_REALM=realm or "http://127.0.0.1:1/registry/token",
        BERTH_REGISTRY_NOTIFY_URL=notify_url or "http://127.0.0.1:1/registry/events/",
        BERTH_REGISTRY_LOG_LEVEL="info",
    )
    subprocess.run(["bash", str(SCRIPT), "setup"], env=env, check=True)
    config = directory / "config.yml"
    if not auth:
        config.write_text(_strip_sections(config.read_text(), ("auth", "notifications")))
    log = directory / "registry.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    registry = RegistryProcess(f"127.0.0.1:{port}", directory, process, log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
        try:
            requests.get(f"{registry.url}/v2/", timeout=1)
            return registry
        except requests.ConnectionError:
            time.sleep(0.05)
    registry.stop()
    raise RuntimeError("docker-registry did not start listening")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(files: dict[str, bytes], *, mode: int = 0o644) -> tuple[bytes, str]:
    """A gzipped tar layer holding ``files``; returns (blob, diff id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = mode
            tar.addfile(info, io.BytesIO(files[name]))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), _digest(tar_bytes)


def write_oci_layout(
    directory: Path,
    layers: list[tuple[bytes, str]],
    *,
    tag: str = "latest",
    cmd: list[str] | None = None,
) -> str:
    """Write an OCI image layout with ``layers``; return the manifest digest."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = _digest(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    layer_descs = [
        {"mediaType": OCI_LAYER_GZIP, "digest": put(blob), "size": len(blob)} for blob, _ in layers
    ]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": cmd or ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
            "layers": layer_descs,
        },
        sort_keys=True,
    ).encode()
    manifest_digest = put(manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return manifest_digest


def busybox_layers(extra: dict[str, bytes] | None = None) -> list[tuple[bytes, str]]:
    """Two layers: busybox-static with sh/echo/cat links, then ``extra`` files."""
    busybox = Path("/bin/busybox").read_bytes()
    base = make_layer({"bin/busybox": busybox}, mode=0o755)
    files = {"etc/berth-test": b"pulled from the registry\n", **(extra or {})}
    return [base, make_layer(files)]


def skopeo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
