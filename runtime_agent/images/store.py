"""Images per tenant: references -> OCI manifests -> config + layers in the content store.

Each tenant has its own namespace of references (``images/<tenant>/refs.json``, a map of
``name:tag`` to manifest digest); the ``library`` namespace holds shared base images that
every tenant can use but not change. ``resolve`` looks in the tenant's namespace first
and then in ``library``, so a tenant's own ``busybox`` shadows the shared one.

Blobs (manifests, configs, layers) live once in the content store whatever the number of
tenants referencing them; ``gc`` removes those no reference reaches.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from runtime_agent.config import AgentConfig
from runtime_agent.content.store import ContentStore, parse_digest
from runtime_agent.errors import FailedPrecondition, InvalidArgument, NotFound
from runtime_agent.images import media
from runtime_agent.images.reference import (
    SHARED_NAMESPACE,
    Reference,
    parse_reference,
    validate_tenant,
)


@dataclass(frozen=True)
class Image:
    """One resolved image (a single-platform manifest) as seen from a tenant."""

    tenant: str  # the namespace the reference was found in ("library" for shared images)
    reference: str | None  # "name:tag", or None when looked up by id/digest only
    manifest_digest: str
    config_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[dict[str, Any]]  # OCI descriptors, bottom layer first
    diff_ids: list[str]
    chain_ids: list[str]
    size: int  # bytes of all layer blobs
    repo_tags: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        """Docker's image id: the config digest."""
        return self.config_digest

    @property
    def short_id(self) -> str:
        return self.config_digest.split(":", 1)[1][:12]

    @property
    def container_config(self) -> dict[str, Any]:
        """The ``config`` section (Cmd, Entrypoint, Env, WorkingDir, User, ...)."""
        return dict(self.config.get("config") or {})

    @property
    def created(self) -> str | None:
        return self.config.get("created")

    @property
    def top_chain_id(self) -> str | None:
        return self.chain_ids[-1] if self.chain_ids else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


class ImageStore:
    """Tenant-scoped references over a shared content store."""

    def __init__(self, config: AgentConfig, content: ContentStore) -> None:
        self.config = config
        self.content = content
        self.root = Path(config.images_dir)
        self._diff_id_dir = self.root / ".diffids"

    # ----------------------------------------------------------------- references
    def _refs_path(self, tenant: str) -> Path:
        return self.root / validate_tenant(tenant) / "refs.json"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time for references (and GC, which must see a stable set)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_refs(self, tenant: str) -> dict[str, str]:
        try:
            data = json.loads(self._refs_path(tenant).read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v["digest"]) for k, v in data.items()}

    def _write_refs(self, tenant: str, refs: dict[str, str]) -> None:
        path = self._refs_path(tenant)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        payload = {k: {"digest": v} for k, v in sorted(refs.items())}
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)

    def tenants(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "refs.json").is_file())

    def references(self, tenant: str) -> dict[str, str]:
        """The tenant's own ``name:tag -> manifest digest`` map."""
        return self._read_refs(tenant)

    def set_reference(self, tenant: str, ref: str, manifest_digest: str) -> str:
        """Point ``ref`` of ``tenant`` at a manifest already in the content store."""
        parse_digest(manifest_digest)
        if not self.content.has(manifest_digest):
            raise NotFound(f"manifest {manifest_digest} not found", digest=manifest_digest)
        key = parse_reference(ref).tagged
        with self._lock():
            refs = self._read_refs(tenant)
            refs[key] = manifest_digest
            self._write_refs(tenant, refs)
        return key

    # ----------------------------------------------------------------- reading
    def _load_json(self, digest: str, what: str) -> dict[str, Any]:
        try:
            data = json.loads(self.content.read_bytes(digest))
        except NotFound:
            raise NotFound(f"{what} {digest} is missing from the content store") from None
        except ValueError as exc:
            raise InvalidArgument(f"{what} {digest} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidArgument(f"{what} {digest} is not a JSON object")
        return data

    def _platform_manifest(self, digest: str) -> tuple[str, dict[str, Any]]:
        """Follow an index to this host's platform; return (manifest digest, manifest)."""
        manifest = self._load_json(digest, "manifest")
        media_type = manifest.get("mediaType")
        if media_type in media.INDEX_TYPES or (
            media_type is None and "manifests" in manifest and "layers" not in manifest
        ):
            os_name, arch = media.host_platform()
            choices = manifest.get("manifests") or []
            chosen = None
            for desc in choices:
                plat = desc.get("platform") or {}
                if plat.get("os", os_name) == os_name and plat.get("architecture", arch) == arch:
                    chosen = desc
                    break
            if chosen is None:
                raise NotFound(f"image index {digest} has no manifest for {os_name}/{arch}")
            return self._platform_manifest(chosen["digest"])
        return digest, manifest

    def load(self, tenant: str, manifest_digest: str, reference: str | None = None) -> Image:
        """Build an ``Image`` from a manifest (or index) digest in the content store."""
        digest, manifest = self._platform_manifest(manifest_digest)
        config_desc = manifest.get("config") or {}
        config_digest = config_desc.get("digest")
        if not isinstance(config_digest, str):
            raise InvalidArgument(f"manifest {digest} has no config")
        config = self._load_json(config_digest, "image config")
        layers = [dict(d) for d in manifest.get("layers") or []]
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        if len(diff_ids) != len(layers):
            raise InvalidArgument(
                f"image {digest}: config lists {len(diff_ids)} diff ids for {len(layers)} layers"
            )
        return Image(
            tenant=tenant,
            reference=reference,
            manifest_digest=digest,
            config_digest=config_digest,
            manifest=manifest,
            config=config,
            layers=layers,
            diff_ids=diff_ids,
            chain_ids=media.chain_ids(diff_ids),
            size=sum(int(d.get("size", 0)) for d in layers),
        )

    def resolve(self, tenant: str, ref: str) -> Image:
        """Find an image by reference, digest or (a prefix of) its id.

        The tenant's namespace is searched first, then the shared ``library`` one.
        """
        validate_tenant(tenant)
        namespaces = [tenant] if tenant == SHARED_NAMESPACE else [tenant, SHARED_NAMESPACE]
        if ref.startswith("sha256:"):
            by_id = self._match_id(namespaces, ref)
            if by_id is None:
                raise NotFound(f"No such image: {ref}", reference=ref, tenant=tenant)
            return by_id
        try:
            parsed = parse_reference(ref)
        except InvalidArgument:
            by_id = self._match_id(namespaces, ref)
            if by_id is None:
                raise
            return by_id
        for namespace in namespaces:
            refs = self._read_refs(namespace)
            if parsed.digest is not None:
                # name@digest: the digest must be a manifest this namespace references
                # under that name (or an index entry of one).
                for key, digest in refs.items():
                    if key.rsplit(":", 1)[0] == parsed.name and digest == parsed.digest:
                        return self._with_tags(self.load(namespace, digest, key), refs)
                continue
            found = refs.get(parsed.tagged)
            if found is not None:
                return self._with_tags(self.load(namespace, found, parsed.tagged), refs)
        by_id = self._match_id(namespaces, ref)
        if by_id is not None:
            return by_id
        raise NotFound(f"No such image: {ref}", reference=ref, tenant=tenant)

    def _with_tags(self, image: Image, refs: dict[str, str]) -> Image:
        """The image with every reference of its namespace that points at it."""
        tags = sorted(
            k for k, v in refs.items() if v == image.manifest_digest or k == image.reference
        )
        return dataclasses.replace(image, repo_tags=tags)

    def _match_id(self, namespaces: Sequence[str], text: str) -> Image | None:
        """Look ``text`` up as an image id (config digest) or manifest digest, or a prefix."""
        candidate = text.removeprefix("sha256:")
        if not (4 <= len(candidate) <= 64) or any(c not in "0123456789abcdef" for c in candidate):
            return None
        for namespace in namespaces:
            refs = self._read_refs(namespace)
            matches: dict[str, Image] = {}
            for key, digest in refs.items():
                try:
                    image = self.load(namespace, digest, key)
                except (NotFound, InvalidArgument):
                    continue
                for d in (image.config_digest, image.manifest_digest):
                    if d.split(":", 1)[1].startswith(candidate):
                        matches.setdefault(image.config_digest, image)
            if len(matches) > 1:
                raise InvalidArgument(f"image id prefix {text!r} is ambiguous")
            if matches:
                return self._with_tags(next(iter(matches.values())), refs)
        return None

    def list(self, tenant: str, *, include_shared: bool = False) -> list[Image]:
        """Images of one namespace, one entry per reference (like ``docker images``)."""
        namespaces = [tenant]
        if include_shared and tenant != SHARED_NAMESPACE:
            namespaces.append(SHARED_NAMESPACE)
        seen: set[str] = set()
        result: list[Image] = []
        for namespace in namespaces:
            refs = self._read_refs(namespace)
            for key, digest in sorted(refs.items()):
                if key in seen:
                    continue  # shadowed by the tenant's own reference
                seen.add(key)
                try:
                    result.append(self._with_tags(self.load(namespace, digest, key), refs))
                except (NotFound, InvalidArgument):
                    continue
        return result

    # ----------------------------------------------------------------- writing
    def tag(self, tenant: str, source: str, target: str) -> Image:
        """Give an image (possibly a shared one) a new reference in the tenant's namespace."""
        image = self.resolve(tenant, source)
        key = self.set_reference(tenant, target, image.manifest_digest)
        return self.resolve(tenant, key)

    def remove(
        self, tenant: str, ref: str, *, force: bool = False, in_use: Iterable[str] = ()
    ) -> builtins.list[str]:
        """Untag ``ref`` in the tenant's namespace; return the removed references.

        ``ref`` may be a name or an image id; by id, every reference of that image in
        the namespace goes (docker needs -f for that when there are several). Images
        whose config digest is in ``in_use`` (containers exist) need ``force``. Blobs
        are freed by ``gc``.
        """
        validate_tenant(tenant)
        in_use = set(in_use)
        with self._lock():
            refs = self._read_refs(tenant)
            by_id = self._match_id([tenant], ref)
            if by_id is not None and ref not in refs and parse_reference(ref).tagged not in refs:
                keys = [k for k, v in refs.items() if v == by_id.manifest_digest]
                if len(keys) > 1 and not force:
                    raise FailedPrecondition(
                        f"unable to delete {by_id.short_id} (must be forced) - image is "
                        f"referenced in multiple repositories: {', '.join(sorted(keys))}"
                    )
                image = by_id
            else:
                key = parse_reference(ref).tagged
                if key not in refs:
                    shared = self._read_refs(SHARED_NAMESPACE) if tenant != SHARED_NAMESPACE else {}
                    if key in shared:
                        raise FailedPrecondition(
                            f"{key} is a shared base image; tenants cannot remove it"
                        )
                    raise NotFound(f"No such image: {ref}", reference=ref, tenant=tenant)
                keys = [key]
                image = self.load(tenant, refs[key], key)
            remaining = [k for k, v in refs.items() if v == image.manifest_digest and k not in keys]
            if image.config_digest in in_use and not remaining and not force:
                raise FailedPrecondition(
                    f"conflict: unable to remove {keys[0]} ({image.short_id}): "
                    "image is being used by a container (use force)"
                )
            for key in keys:
                refs.pop(key, None)
            self._write_refs(tenant, refs)
        return keys

    def diff_id(self, layer: dict[str, Any]) -> str:
        """The uncompressed digest of a layer descriptor (cached per blob)."""
        digest = layer["digest"]
        hex_part = parse_digest(digest)
        if media.compression_of(self._head(digest)) == "none":
            return digest
        cached = self._diff_id_dir / hex_part
        with contextlib.suppress(FileNotFoundError):
            return cached.read_text().strip()
        diff_id = media.uncompressed_digest(self.content, digest)
        self._diff_id_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(diff_id)
        os.rename(tmp, cached)
        return diff_id

    def _head(self, digest: str) -> bytes:
        with self.content.open(digest) as fh:
            return fh.read(4)

    def commit(
        self,
        tenant: str,
        ref: str | None,
        config: dict[str, Any],
        layers: Sequence[dict[str, Any]],
        *,
        manifest_annotations: dict[str, str] | None = None,
    ) -> Image:
        """Write an image config and OCI manifest for ``layers`` and point ``ref`` at it.

        ``config`` is an OCI image config (``architecture``, ``os``, ``config`` with
        Cmd/Env/..., ``history``); its ``rootfs`` is recomputed from the layers, and
        missing ``architecture``/``os``/``created`` are filled in. Each layer descriptor
        must name a blob already in the content store. ``ref=None`` makes an untagged
        image (kept only while something else references it).
        """
        validate_tenant(tenant)
        config = copy.deepcopy(config)
        descs: list[dict[str, Any]] = []
        diff_ids: list[str] = []
        for layer in layers:
            digest = layer.get("digest")
            if not isinstance(digest, str):
                raise InvalidArgument(f"layer descriptor without digest: {layer!r}")
            size = self.content.size(digest)  # NotFound if absent
            media_type = layer.get("mediaType") or media.OCI_LAYER
            if media_type not in media.LAYER_TYPES:
                raise InvalidArgument(f"unsupported layer media type {media_type!r}")
            desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
            if layer.get("annotations"):
                desc["annotations"] = dict(layer["annotations"])
            descs.append(desc)
            diff_ids.append(self.diff_id(desc))
        os_name, arch = media.host_platform()
        config.setdefault("architecture", arch)
        config.setdefault("os", os_name)
        config.setdefault("created", _now())
        config.setdefault("config", {})
        config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
        history = config.get("history")
        if history is not None:
            non_empty = [h for h in history if not h.get("empty_layer")]
            if len(non_empty) != len(descs):
                raise InvalidArgument(
                    f"config history has {len(non_empty)} non-empty entries for {len(descs)} layers"
                )
        config_bytes = _canonical_json(config)
        config_digest = self.content.write_bytes(config_bytes)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media.OCI_MANIFEST,
            "config": {
                "mediaType": media.OCI_CONFIG,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": descs,
        }
        if manifest_annotations:
            manifest["annotations"] = dict(manifest_annotations)
        manifest_digest = self.content.write_bytes(_canonical_json(manifest))
        key = None
        if ref is not None:
            key = self.set_reference(tenant, ref, manifest_digest)
        image = self.load(tenant, manifest_digest, key)
        if key is not None:
            image = self._with_tags(image, self._read_refs(tenant))
        return image

    # ----------------------------------------------------------------- GC
    def reachable_blobs(
        self, extra_manifests: Iterable[str] = (), *, namespaces: Iterable[str] | None = None
    ) -> set[str]:
        """Every blob reachable from the references of ``namespaces`` (default: every
        tenant's) and from ``extra_manifests``."""
        chosen = self.tenants() if namespaces is None else namespaces
        roots = [d for t in chosen for d in self._read_refs(t).values()]
        roots.extend(extra_manifests)
        reachable: set[str] = set()
        pending = list(roots)
        while pending:
            digest = pending.pop()
            if digest in reachable:
                continue
            reachable.add(digest)
            try:
                doc = self._load_json(digest, "manifest")
            except (NotFound, InvalidArgument):
                continue
            for desc in doc.get("manifests") or []:
                if desc.get("digest"):
                    pending.append(desc["digest"])
            config_desc = doc.get("config") or {}
            if config_desc.get("digest"):
                reachable.add(config_desc["digest"])
            for desc in doc.get("layers") or []:
                if desc.get("digest"):
                    reachable.add(desc["digest"])
        return reachable

    def referenced_chain_ids(self) -> set[str]:
        """Chain ids of every layer of every referenced image (snapshots to keep)."""
        chains: set[str] = set()
        for tenant in self.tenants():
            for key, digest in self._read_refs(tenant).items():
                try:
                    chains.update(self.load(tenant, digest, key).chain_ids)
                except (NotFound, InvalidArgument):
                    continue
        return chains

    def gc(
        self, *, grace_seconds: float = 600.0, extra_manifests: Iterable[str] = ()
    ) -> tuple[builtins.list[str], int]:
        """Delete blobs no reference reaches; return (deleted digests, bytes freed).

        Blobs younger than ``grace_seconds`` survive: an import, pull or build may have
        written them and not yet set the reference that makes them reachable.
        """
        deleted: list[str] = []
        freed = 0
        cutoff = time.time() - grace_seconds
        with self._lock():
            reachable = self.reachable_blobs(extra_manifests)
            for digest in list(self.content.digests()):
                if digest in reachable:
                    continue
                path = self.content.path(digest)
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if st.st_mtime > cutoff:
                    continue
                if self.content.delete(digest):
                    deleted.append(digest)
                    freed += st.st_size
                    with contextlib.suppress(FileNotFoundError):
                        (self._diff_id_dir / parse_digest(digest)).unlink()
        self.content.gc_ingest(older_than_seconds=max(grace_seconds, 0.0))
        return deleted, freed

    # ----------------------------------------------------------------- archives
    def import_archive(
        self, tenant: str, fileobj: BinaryIO, ref: str | None = None
    ) -> builtins.list[Image]:
        from runtime_agent.images.archive import import_archive

        return import_archive(self, tenant, fileobj, ref)

    def import_rootfs(
        self,
        tenant: str,
        fileobj: BinaryIO,
        ref: str | None,
        *,
        changes: dict[str, Any] | None = None,
        message: str | None = None,
    ) -> Image:
        from runtime_agent.images.archive import import_rootfs

        return import_rootfs(self, tenant, fileobj, ref, changes=changes, message=message)

    def save(self, tenant: str, refs: Sequence[str], out: BinaryIO, fmt: str = "docker") -> None:
        from runtime_agent.images.archive import save_archive

        save_archive(self, tenant, refs, out, fmt)


__all__ = ["Image", "ImageStore", "Reference"]
