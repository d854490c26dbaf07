"""Push an image the agent holds to a registry.

Every blob (config and layers) is checked with HEAD first and uploaded only when the
registry lacks it (POST to open an upload, one PUT streaming the file with its digest,
which the registry verifies); uploads run several at once. The manifest goes last, with
its exact bytes, so the registry records the same digest the node has and a partial
push never leaves a manifest naming missing blobs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from runtime_agent.distribution.auth import BearerToken, Credentials, CredentialStore
from runtime_agent.distribution.client import RegistryClient
from runtime_agent.distribution.errors import RegistryError
from runtime_agent.distribution.media import OCI_MANIFEST
from runtime_agent.distribution.pull import scope_for
from runtime_agent.distribution.reference import Reference, parse_reference
from runtime_agent.errors import AgentError

if TYPE_CHECKING:
    from runtime_agent.agent import Agent

PARALLEL_UPLOADS = 4


@dataclass
class PushResult:
    reference: str
    digest: str
    media_type: str
    size: int
    uploaded: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0


def _blob_exists(client: RegistryClient, ref: Reference, digest: str) -> bool:
    response = client.request(
        "HEAD",
        f"/v2/{ref.repository}/blobs/{digest}",
        scope=scope_for(ref.repository, "pull,push"),
        expected=(200, 404),
        what=f"blob {digest}",
        timeout=60,
    )
    response.close()
    return response.status_code == 200


def upload_blob(
    agent: Agent, client: RegistryClient, ref: Reference, digest: str, mount_from: str | None = None
) -> int:
    """Upload one blob from the content store (monolithic: POST, then PUT with the body).

    With ``mount_from`` (another repository of the same registry known to hold the blob)
    the POST first asks for a cross-repository mount, as docker does; the registry answers
    201 when it linked the blob (nothing to send: returns -2) or 202 with a normal upload.
    """
    scope = scope_for(ref.repository, "pull,push")
    path = f"/v2/{ref.repository}/blobs/uploads/"
    if mount_from and mount_from != ref.repository:
        path += "?" + urlencode({"mount": digest, "from": mount_from})
        scope += f" {scope_for(mount_from, 'pull')}"
    started = client.request(
        "POST", path, scope=scope, expected=(201, 202), what=f"start upload of {digest}", timeout=60
    )
    started.close()
    if started.status_code == 201:
        return -2
    location = started.headers.get("Location")
    if not location:
        raise RegistryError(f"{ref.registry} opened an upload without a Location")
    separator = "&" if "?" in location else "?"
    size = agent.content.size(digest)
    with agent.content.open(digest) as body:
        finished = client.request(
            "PUT",
            f"{location}{separator}{urlencode({'digest': digest})}",
            scope=scope,
            expected=(201,),
            what=f"upload of {digest}",
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            data=body,
            timeout=600,
        )
    finished.close()
    return size


def push(
    agent: Agent,
    tenant: str,
    ref: str,
    auth: Credentials | BearerToken | None = None,
    *,
    source: str | None = None,
    parallel: int = PARALLEL_UPLOADS,
) -> PushResult:
    """Push the tenant's image ``source`` (default: ``ref`` itself) to ``ref``.

    ``ref`` is ``host/repo[:tag]``; ``auth`` defaults to the node's stored login. With a
    pre-issued :class:`BearerToken` (scoped to ``ref``'s repository alone) no blob is
    mounted from another repository: the token could not read it.
    """
    reference = parse_reference(ref)
    if reference.digest:
        raise RegistryError(f"push to {ref}: push to a tag, not a digest")
    image = agent.images.resolve(tenant, source or ref)
    if auth is None:
        auth = CredentialStore(agent.config.root / "registry-auth.json").get(reference.registry)
    client = RegistryClient(reference.registry, auth)
    manifest_bytes = agent.content.read_bytes(image.manifest_digest)
    manifest: dict[str, Any] = image.manifest
    media_type = str(manifest.get("mediaType") or OCI_MANIFEST)

    blobs: list[str] = []
    for descriptor in [manifest["config"], *(manifest.get("layers") or [])]:
        if descriptor["digest"] not in blobs:
            blobs.append(str(descriptor["digest"]))
    result = PushResult(
        reference=str(reference),
        digest=image.manifest_digest,
        media_type=media_type,
        size=len(manifest_bytes) + sum(agent.content.size(d) for d in blobs),
    )

    sources = {} if isinstance(auth, BearerToken) else _mount_sources(agent, tenant, reference)

    def send(digest: str) -> int:
        if _blob_exists(client, reference, digest):
            return -1
        return upload_blob(agent, client, reference, digest, sources.get(digest))

    ordered = sorted(blobs, key=lambda d: -agent.content.size(d))
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        outcomes = list(pool.map(send, ordered))
    for digest, sent in zip(ordered, outcomes, strict=True):
        if sent == -1:
            result.existing.append(digest)
        elif sent == -2:
            result.mounted.append(digest)
        else:
            result.uploaded.append(digest)
            result.bytes_uploaded += sent

    response = client.request(
        "PUT",
        f"/v2/{reference.repository}/manifests/{reference.reference}",
        scope=scope_for(reference.repository, "pull,push"),
        expected=(201,),
        what=f"manifest {reference}",
        headers={"Content-Type": media_type},
        data=manifest_bytes,
        timeout=60,
    )
    response.close()
    announced = response.headers.get("Docker-Content-Digest")
    if announced and announced != image.manifest_digest:
        raise RegistryError(
            f"{reference}: registry stored the manifest as {announced}, not {image.manifest_digest}"
        )
    return result


def _mount_sources(agent: Agent, tenant: str, target: Reference) -> dict[str, str]:
    """Blob digest → another repository on the same registry that the node knows holds it
    (from the tenant's references pulled from or pushed to that registry)."""
    sources: dict[str, str] = {}
    prefix = f"{target.registry}/"
    for key, digest in agent.images.references(tenant).items():
        if not key.startswith(prefix):
            continue
        repository = key[len(prefix) :].rsplit(":", 1)[0]
        if repository == target.repository:
            continue
        try:
            image = agent.images.load(tenant, digest, key)
        except AgentError:
            continue
        for descriptor in [image.manifest["config"], *image.layers]:
            sources.setdefault(str(descriptor["digest"]), repository)
    return sources
