"""Image archives in and out: ``docker save`` archives, OCI archives, rootfs tarballs.

Import reads three shapes:

* docker archives: ``manifest.json`` listing each image's config, layers and RepoTags
  (docker <= 24 puts layers at ``<id>/layer.tar``; docker >= 25 writes the same
  ``manifest.json`` inside an OCI layout with ``blobs/sha256/<hex>``);
* OCI archives: an OCI image layout (``oci-layout``, ``index.json``, ``blobs/``) whose
  index entries are named by ``io.containerd.image.name`` or
  ``org.opencontainers.image.ref.name``;
* (``import_rootfs``) a plain root filesystem tarball, gzip/zstd or not, as ``docker
  import`` does.

Everything is checked before any reference changes: member paths, digests of blobs,
each layer's diff id against the image config. A bad archive raises ``InvalidArchive``
(or ``DigestMismatch``) and the blobs this import added are removed again.

Export writes one layout that both ``docker load`` (any version: it reads
``manifest.json``) and OCI tools (``index.json``) accept. The ``docker`` format stores
layers uncompressed (what older engines expect); ``oci`` keeps blobs and manifests
byte-for-byte as stored.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from runtime_agent.archive import members, open_tar
from runtime_agent.content.store import parse_digest
from runtime_agent.errors import InvalidArchive, InvalidArgument, ResourceExhausted
from runtime_agent.images import media
from runtime_agent.images.reference import is_registry_host, parse_reference, validate_tenant
from runtime_agent.snapshots.unpack import clean_member_path

if TYPE_CHECKING:
    from runtime_agent.images.store import Image, ImageStore

_MAX_JSON = 16 << 20  # manifests and configs are small; refuse absurd ones


# --------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _seekable_tar(store: ImageStore, fileobj: BinaryIO) -> Iterator[tarfile.TarFile]:
    """Open an archive for random access.

    An uncompressed regular file is read in place; a pipe, or a gzip/zstd-compressed
    archive, is first spooled (decompressed) to a temporary file.
    """
    head = fileobj.read(4)
    kind = media.compression_of(head)
    if kind == "none" and _is_seekable(fileobj):
        fileobj.seek(0)
        with _open_tar(fileobj) as tar:
            yield tar
        return
    spool_dir = store.content.ingest_dir
    spool_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=spool_dir) as spool:
        source: IO[bytes] = _Prepend(head, fileobj)  # type: ignore[assignment]
        try:
            if kind == "gzip":
                with gzip.GzipFile(fileobj=source, mode="rb") as gz:
                    shutil.copyfileobj(gz, spool, 1 << 20)
            elif kind == "zstd":
                with media.open_uncompressed(_Rewound(head, fileobj)) as stream:  # type: ignore[arg-type]
                    shutil.copyfileobj(stream, spool, 1 << 20)
            else:
                shutil.copyfileobj(source, spool, 1 << 20)
        except (OSError, EOFError, gzip.BadGzipFile, InvalidArgument) as exc:
            raise InvalidArchive(f"archive cannot be decompressed: {exc}") from exc
        spool.seek(0)
        with _open_tar(spool) as tar:
            yield tar


@contextlib.contextmanager
def _open_tar(fileobj: IO[bytes]) -> Iterator[tarfile.TarFile]:
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.TarError as exc:
        raise InvalidArchive(f"not a tar archive: {exc}") from exc
    with tar:
        yield tar


def _is_seekable(fileobj: BinaryIO) -> bool:
    try:
        return bool(fileobj.seekable()) and os.fstat(fileobj.fileno()).st_mode & 0o170000 == (
            0o100000
        )
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


class _Rewound(io.RawIOBase):
    """``_Prepend`` that also answers ``seek(0)`` once (what open_uncompressed does)."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._inner = _Prepend(head, rest)
        self._head = head

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._inner.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        if (offset, whence) != (0, 0):
            raise io.UnsupportedOperation("seek")
        self._inner = _Prepend(self._head, self._inner._rest)
        return 0


class _Prepend(io.RawIOBase):
    """A stream with some already-read bytes put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size < 0:
                data, self._head = self._head + self._rest.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            if len(data) < size:
                data += self._rest.read(size - len(data))
            return data
        return self._rest.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _ArchiveIndex:
    """Member lookup by cleaned path, with symlinks inside the archive followed."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for member in tar.getmembers():
                parts = clean_member_path(member.name)
                if parts:
                    self.members["/".join(parts)] = member
        except tarfile.TarError as exc:
            raise InvalidArchive(f"archive is corrupt: {exc}") from exc

    def find(self, path: str, *, depth: int = 0) -> tarfile.TarInfo:
        parts = clean_member_path(path)
        member = self.members.get("/".join(parts))
        if member is None:
            raise InvalidArchive(f"archive refers to {path!r}, which it does not contain")
        if member.issym() or member.islnk():
            if depth > 8:
                raise InvalidArchive(f"archive member {path!r}: too many levels of links")
            base = "/".join(parts[:-1]) if member.issym() else ""
            target = (
                member.linkname
                if member.linkname.startswith("/") or not base
                else (f"{base}/{member.linkname}")
            )
            return self.find(target, depth=depth + 1)
        if not member.isreg():
            raise InvalidArchive(f"archive member {path!r} is not a regular file")
        return member

    def has(self, path: str) -> bool:
        return "/".join(clean_member_path(path)) in self.members

    def open(self, path: str) -> IO[bytes]:
        member = self.find(path)
        stream = self.tar.extractfile(member)
        if stream is None:
            raise InvalidArchive(f"archive member {path!r} cannot be read")
        return stream

    def read_json(self, path: str) -> Any:
        member = self.find(path)
        if member.size > _MAX_JSON:
            raise InvalidArchive(f"archive member {path!r} is too large for JSON metadata")
        try:
            return json.loads(self.open(path).read())
        except ValueError as exc:
            raise InvalidArchive(f"archive member {path!r} is not valid JSON: {exc}") from exc


class _Ingest:
    """Tracks blobs an import adds, so a failed import can take them back out."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        self.added: list[str] = []

    def blob(
        self, stream: IO[bytes], expected: str | None = None, size: int | None = None
    ) -> tuple[str, int]:
        if expected is not None and self.store.content.has(expected):
            # Already stored: still check the archive's copy, so a corrupt archive is
            # reported as such rather than silently papered over.
            _verify_stream(stream, expected, size)
            return expected, self.store.content.size(expected)
        digest, written = self.store.content.ingest(stream, expected, size)  # type: ignore[arg-type]
        self.added.append(digest)
        return digest, written

    def data(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.store.content.has(digest):
            self.store.content.write_bytes(data)
            self.added.append(digest)
        return digest

    def rollback(self) -> None:
        reachable = self.store.reachable_blobs()
        for digest in self.added:
            if digest not in reachable:
                self.store.content.delete(digest)


def _verify_stream(stream: IO[bytes], expected: str, size: int | None) -> None:
    hasher = hashlib.sha256()
    total = 0
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        hasher.update(chunk)
        total += len(chunk)
    actual = "sha256:" + hasher.hexdigest()
    if actual != expected or (size is not None and total != size):
        raise InvalidArchive(
            f"archive blob announced as {expected} hashes to {actual}", expected=expected
        )


def _layer_media_type(store: ImageStore, digest: str) -> str:
    with store.content.open(digest) as fh:
        kind = media.compression_of(fh.read(4))
    return {"gzip": media.OCI_LAYER_GZIP, "zstd": media.OCI_LAYER_ZSTD}.get(kind, media.OCI_LAYER)


def _check_config(config: Any, where: str) -> dict[str, Any]:
    if not isinstance(config, dict) or not isinstance(config.get("rootfs"), dict):
        raise InvalidArchive(f"{where}: image config has no rootfs section")
    diff_ids = config["rootfs"].get("diff_ids")
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise InvalidArchive(f"{where}: image config has no diff_ids list")
    for diff_id in diff_ids:
        try:
            parse_digest(diff_id)
        except InvalidArgument as exc:
            raise InvalidArchive(f"{where}: {exc}") from None
    return config


def _verify_layers(
    store: ImageStore, config: dict[str, Any], layers: list[dict[str, Any]], where: str
) -> None:
    diff_ids = config["rootfs"]["diff_ids"]
    if len(diff_ids) != len(layers):
        raise InvalidArchive(
            f"{where}: config lists {len(diff_ids)} layers, the manifest {len(layers)}"
        )
    for desc in layers:  # capped first: a bomb never gets decompressed whole for its diff id
        _scan_layer_paths(store, desc["digest"], where)
    for desc, expected in zip(layers, diff_ids, strict=True):
        try:
            actual = store.diff_id(desc)
        except InvalidArgument as exc:
            raise InvalidArchive(f"{where}: {exc}") from exc
        if actual != expected:
            raise InvalidArchive(
                f"{where}: layer {desc['digest']} unpacks to {actual}, the config says {expected}"
            )


def _scan_layer_paths(store: ImageStore, digest: str, where: str) -> None:
    """Refuse, before anything is tagged, a layer the node would refuse to unpack: read
    through the one archive reader (``runtime_agent.archive``) with the node's layer caps,
    so a bomb (unpacked size, member count, extended headers) stops at the cap instead of
    after decompressing all of it, and member names or hard links that climb out of the
    root are refused (checked again on unpack)."""
    limits = store.config.layer_limits
    try:
        with store.content.open(digest) as raw, media.open_uncompressed(raw) as stream:
            with open_tar(stream, limits, compressed=False) as (tar, capped):
                for member, _parts in members(tar, limits) if tar is not None else ():
                    if member.islnk():
                        clean_member_path(member.linkname)
                capped.drain()
    except ResourceExhausted as exc:
        raise ResourceExhausted(f"{where}: layer {digest}: {exc}", **exc.details) from None
    except InvalidArchive as exc:
        raise InvalidArchive(f"{where}: layer {digest}: {exc}") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        if store.content.size(digest) == 0:
            return
        raise InvalidArchive(f"{where}: layer {digest} is not a valid tar: {exc}") from exc


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _untagged_ref(config_digest: str) -> str:
    return f"untagged-{config_digest.split(':', 1)[1][:12]}:latest"


# --------------------------------------------------------------------- import
def import_archive(
    store: ImageStore, tenant: str, fileobj: BinaryIO, ref: str | None = None
) -> list[Image]:
    """Load every image of a docker or OCI archive into ``tenant``'s namespace.

    ``ref`` tags the archive's single image (with several images it is an error).
    Images the archive does not name are kept as ``untagged-<id>:latest``.
    """
    validate_tenant(tenant)
    if ref is not None:
        parse_reference(ref)
    ingest = _Ingest(store)
    try:
        with _seekable_tar(store, fileobj) as tar:
            index = _ArchiveIndex(tar)
            if index.has("manifest.json"):
                planned = _plan_docker(store, index, ingest)
            elif index.has("index.json"):
                planned = _plan_oci(store, index, ingest)
            elif index.has("repositories"):
                raise InvalidArchive(
                    "archive is in the pre-1.10 docker format (no manifest.json); re-save it "
                    "with a current docker"
                )
            else:
                raise InvalidArchive(
                    "not an image archive (no manifest.json or index.json); to make an image "
                    "from a root filesystem tarball use `import`"
                )
        if not planned:
            raise InvalidArchive("archive contains no images")
        if ref is not None and len(planned) > 1:
            raise InvalidArgument(
                f"archive contains {len(planned)} images; a single reference cannot name them"
            )
        images: list[Image] = []
        for manifest_digest, config_digest, names in planned:
            tags = [ref] if ref is not None else names or [_untagged_ref(config_digest)]
            keys = [store.set_reference(tenant, tag, manifest_digest) for tag in tags]
            images.append(store.resolve(tenant, keys[0]))
        return images
    except BaseException:
        ingest.rollback()
        raise


def _plan_docker(
    store: ImageStore, index: _ArchiveIndex, ingest: _Ingest
) -> list[tuple[str, str, list[str]]]:
    entries = index.read_json("manifest.json")
    if not isinstance(entries, list):
        raise InvalidArchive("manifest.json is not a list")
    planned: list[tuple[str, str, list[str]]] = []
    for n, entry in enumerate(entries):
        where = f"manifest.json entry {n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise InvalidArchive(f"{where}: no Config")
        layer_paths = entry.get("Layers") or []
        if not isinstance(layer_paths, list) or not all(isinstance(p, str) for p in layer_paths):
            raise InvalidArchive(f"{where}: Layers is not a list of paths")
        config_member = index.find(entry["Config"])
        if config_member.size > _MAX_JSON:
            raise InvalidArchive(f"{where}: config is too large")
        config_bytes = index.open(entry["Config"]).read()
        try:
            config = _check_config(json.loads(config_bytes), where)
        except ValueError as exc:
            raise InvalidArchive(f"{where}: config is not valid JSON: {exc}") from exc
        config_digest = ingest.data(config_bytes)
        layers = []
        for path in layer_paths:
            member = index.find(path)
            expected = _digest_from_path(path)
            digest, size = ingest.blob(index.open(path), expected, member.size)
            layers.append(
                {"mediaType": _layer_media_type(store, digest), "digest": digest, "size": size}
            )
        _verify_layers(store, config, layers, where)
        manifest = {
            "schemaVersion": 2,
            "mediaType": media.OCI_MANIFEST,
            "config": {
                "mediaType": media.OCI_CONFIG,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": layers,
        }
        manifest_digest = ingest.data(_canonical(manifest))
        names = []
        for tag in entry.get("RepoTags") or []:
            try:
                names.append(parse_reference(str(tag)).tagged)
            except InvalidArgument:
                raise InvalidArchive(f"{where}: bad RepoTag {tag!r}") from None
        planned.append((manifest_digest, config_digest, names))
    return planned


def _digest_from_path(path: str) -> str | None:
    """``blobs/sha256/<hex>`` names its own digest (checked while ingesting)."""
    parts = clean_member_path(path)
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256":
        candidate = f"sha256:{parts[2]}"
        try:
            parse_digest(candidate)
        except InvalidArgument:
            return None
        return candidate
    return None


def _plan_oci(
    store: ImageStore, index: _ArchiveIndex, ingest: _Ingest
) -> list[tuple[str, str, list[str]]]:
    top = index.read_json("index.json")
    if not isinstance(top, dict) or not isinstance(top.get("manifests"), list):
        raise InvalidArchive("index.json has no manifests list")
    planned: list[tuple[str, str, list[str]]] = []
    for n, desc in enumerate(top["manifests"]):
        where = f"index.json entry {n}"
        digest = _ingest_descriptor(index, ingest, desc, where)
        _, manifest = _platform_manifest(store, index, ingest, digest, where)
        config_desc = manifest.get("config")
        if not isinstance(config_desc, dict):
            raise InvalidArchive(f"{where}: manifest has no config")
        config_digest = _ingest_descriptor(index, ingest, config_desc, where)
        try:
            config = _check_config(json.loads(store.content.read_bytes(config_digest)), where)
        except ValueError as exc:
            raise InvalidArchive(f"{where}: config is not valid JSON: {exc}") from exc
        layers = []
        for layer in manifest.get("layers") or []:
            layer_digest = _ingest_descriptor(index, ingest, layer, where)
            layers.append({**layer, "digest": layer_digest})
        _verify_layers(store, config, layers, where)
        annotations = desc.get("annotations") or {}
        name = annotations.get("io.containerd.image.name") or annotations.get(
            "org.opencontainers.image.ref.name"
        )
        names = []
        if name:
            try:
                names.append(parse_reference(str(name)).tagged)
            except InvalidArgument:
                pass  # a bare tag such as "latest" names no repository
        planned.append((digest, config_digest, names))
    return planned


def _ingest_descriptor(index: _ArchiveIndex, ingest: _Ingest, desc: Any, where: str) -> str:
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
        raise InvalidArchive(f"{where}: malformed descriptor {desc!r}")
    digest = desc["digest"]
    try:
        hex_part = parse_digest(digest)
    except InvalidArgument as exc:
        raise InvalidArchive(f"{where}: {exc}") from None
    path = f"blobs/sha256/{hex_part}"
    member = index.find(path)
    size = desc.get("size")
    if isinstance(size, int) and size != member.size:
        raise InvalidArchive(
            f"{where}: blob {digest} is {member.size} bytes, descriptor says {size}"
        )
    ingest.blob(index.open(path), digest, member.size)
    return digest


def _platform_manifest(
    store: ImageStore, index: _ArchiveIndex, ingest: _Ingest, digest: str, where: str
) -> tuple[str, dict[str, Any]]:
    for _ in range(4):
        try:
            doc = json.loads(store.content.read_bytes(digest))
        except ValueError as exc:
            raise InvalidArchive(f"{where}: manifest {digest} is not valid JSON") from exc
        if not isinstance(doc, dict):
            raise InvalidArchive(f"{where}: manifest {digest} is not an object")
        if "manifests" not in doc:
            return digest, doc
        os_name, arch = media.host_platform()
        chosen = None
        for entry in doc.get("manifests") or []:
            plat = entry.get("platform") or {}
            if plat.get("os", os_name) == os_name and plat.get("architecture", arch) == arch:
                chosen = entry
                break
        if chosen is None:
            raise InvalidArchive(f"{where}: no manifest for {os_name}/{arch}")
        digest = _ingest_descriptor(index, ingest, chosen, where)
    raise InvalidArchive(f"{where}: image indexes nested too deeply")


# --------------------------------------------------------------------- rootfs
def parse_changes(lines: Sequence[str]) -> dict[str, Any]:
    """Dockerfile-style ``--change`` lines (CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE,
    LABEL, STOPSIGNAL, VOLUME) into an image config's ``config`` section."""
    config: dict[str, Any] = {}
    for line in lines:
        instruction, _, rest = line.strip().partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction in ("CMD", "ENTRYPOINT", "VOLUME"):
            if rest.startswith("["):
                try:
                    value = json.loads(rest)
                except ValueError as exc:
                    raise InvalidArgument(f"bad --change {line!r}: {exc}") from None
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise InvalidArgument(f"bad --change {line!r}: expected a JSON string list")
            elif instruction == "VOLUME":
                value = rest.split()
            else:
                value = ["/bin/sh", "-c", rest]
            if instruction == "VOLUME":
                config.setdefault("Volumes", {}).update({v: {} for v in value})
            else:
                config["Cmd" if instruction == "CMD" else "Entrypoint"] = value
        elif instruction == "ENV":
            pairs = shlex.split(rest)
            if len(pairs) == 2 and "=" not in pairs[0]:
                pairs = [f"{pairs[0]}={pairs[1]}"]
            env = config.setdefault("Env", [])
            for pair in pairs:
                if "=" not in pair:
                    raise InvalidArgument(f"bad --change {line!r}: ENV needs NAME=value")
                key = pair.split("=", 1)[0]
                env[:] = [e for e in env if e.split("=", 1)[0] != key] + [pair]
        elif instruction == "LABEL":
            for pair in shlex.split(rest):
                if "=" not in pair:
                    raise InvalidArgument(f"bad --change {line!r}: LABEL needs key=value")
                key, value = pair.split("=", 1)
                config.setdefault("Labels", {})[key] = value
        elif instruction == "EXPOSE":
            for port in rest.split():
                if "/" not in port:
                    port += "/tcp"
                config.setdefault("ExposedPorts", {})[port] = {}
        elif instruction in ("WORKDIR", "USER", "STOPSIGNAL"):
            if not rest:
                raise InvalidArgument(f"bad --change {line!r}: missing value")
            config[
                {"WORKDIR": "WorkingDir", "USER": "User", "STOPSIGNAL": "StopSignal"}[instruction]
            ] = rest
        else:
            raise InvalidArgument(
                f"bad --change {line!r}: only CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, "
                "STOPSIGNAL, USER, VOLUME and WORKDIR are supported"
            )
    return config


def import_rootfs(
    store: ImageStore,
    tenant: str,
    fileobj: BinaryIO,
    ref: str | None,
    *,
    changes: dict[str, Any] | None = None,
    message: str | None = None,
) -> Image:
    """One-layer image from a root filesystem tarball (``docker import``).

    The tarball is stored as given (compressed or not) after checking it is a tar whose
    entries stay inside the root; ``changes`` become the image's ``config`` section.
    """
    validate_tenant(tenant)
    if ref is not None:
        parse_reference(ref)
    ingest = _Ingest(store)
    try:
        digest, size = ingest.blob(fileobj)
        if size == 0:
            raise InvalidArchive("the root filesystem tarball is empty")
        _scan_layer_paths(store, digest, "rootfs tarball")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        history: dict[str, Any] = {"created": now, "created_by": "berth-agent import"}
        if message:
            history["comment"] = message
        config: dict[str, Any] = {
            "created": now,
            "config": dict(changes or {}),
            "history": [history],
        }
        layer = {"mediaType": _layer_media_type(store, digest), "digest": digest, "size": size}
        image = store.commit(tenant, None, config, [layer])
        target = ref if ref is not None else _untagged_ref(image.config_digest)
        key = store.set_reference(tenant, target, image.manifest_digest)
        return store.resolve(tenant, key)
    except BaseException:
        ingest.rollback()
        raise


# --------------------------------------------------------------------- export
def save_archive(
    store: ImageStore, tenant: str, refs: Sequence[str], out: BinaryIO, fmt: str = "docker"
) -> None:
    """Write ``refs`` (resolved as ``tenant`` sees them) as one archive to ``out``."""
    if fmt not in ("docker", "oci"):
        raise InvalidArgument(f"unknown archive format {fmt!r}: use docker or oci")
    if not refs:
        raise InvalidArgument("save needs at least one image")
    images: list[tuple[Image, str | None]] = []
    for ref in refs:
        image = store.resolve(tenant, ref)
        name = None
        if (
            not ref.startswith("sha256:")
            and image.reference is not None
            and (image.reference == parse_reference(ref).tagged)
        ):
            name = image.reference
        images.append((image, name))
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        written: set[str] = set()
        docker_entries: list[dict[str, Any]] = []
        index_entries: list[dict[str, Any]] = []
        by_config: dict[str, dict[str, Any]] = {}
        uncompressed_sizes: dict[str, int] = {}

        def add_bytes(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        def add_blob(digest: str) -> None:
            if digest in written:
                return
            written.add(digest)
            info = tarfile.TarInfo(f"blobs/sha256/{parse_digest(digest)}")
            info.size = store.content.size(digest)
            info.mode = 0o644
            with store.content.open(digest) as fh:
                tar.addfile(info, fh)

        add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        info = tarfile.TarInfo("blobs")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for image, name in images:
            if fmt == "oci":
                layers = image.layers
                for desc in layers:
                    add_blob(desc["digest"])
                manifest_bytes = store.content.read_bytes(image.manifest_digest)
                manifest_digest = image.manifest_digest
            else:
                layers = [
                    _uncompressed_layer(store, d, dff, add_blob, tar, uncompressed_sizes)
                    for d, dff in zip(image.layers, image.diff_ids, strict=True)
                ]
                manifest = {
                    "schemaVersion": 2,
                    "mediaType": media.OCI_MANIFEST,
                    "config": {
                        "mediaType": media.OCI_CONFIG,
                        "digest": image.config_digest,
                        "size": store.content.size(image.config_digest),
                    },
                    "layers": layers,
                }
                manifest_bytes = _canonical(manifest)
                manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
            add_blob(image.config_digest)
            if manifest_digest not in written:
                written.add(manifest_digest)
                add_bytes(f"blobs/sha256/{parse_digest(manifest_digest)}", manifest_bytes)
            entry = by_config.get(image.config_digest)
            if entry is None:
                entry = {
                    "Config": f"blobs/sha256/{parse_digest(image.config_digest)}",
                    "RepoTags": [],
                    "Layers": [f"blobs/sha256/{parse_digest(d['digest'])}" for d in layers],
                }
                by_config[image.config_digest] = entry
                docker_entries.append(entry)
            index_entry: dict[str, Any] = {
                "mediaType": media.OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
            }
            if name is not None:
                entry["RepoTags"].append(name)
                index_entry["annotations"] = {
                    "io.containerd.image.name": _docker_full_name(name),
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                }
            index_entries.append(index_entry)
        for entry in docker_entries:
            if not entry["RepoTags"]:
                entry["RepoTags"] = None
        add_bytes("manifest.json", json.dumps(docker_entries).encode())
        add_bytes(
            "index.json",
            _canonical(
                {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": index_entries}
            ),
        )


def _uncompressed_layer(
    store: ImageStore,
    desc: dict[str, Any],
    diff_id: str,
    add_blob: Any,
    tar: tarfile.TarFile,
    sizes: dict[str, int],
) -> dict[str, Any]:
    """Write a layer uncompressed (its digest is then its diff id)."""
    if media.compression_of(_head(store, desc["digest"])) == "none":
        add_blob(desc["digest"])
        return {"mediaType": media.OCI_LAYER, "digest": desc["digest"], "size": desc["size"]}
    if diff_id in sizes:
        return {"mediaType": media.OCI_LAYER, "digest": diff_id, "size": sizes[diff_id]}
    with tempfile.TemporaryFile(dir=store.content.ingest_dir) as tmp:
        with store.content.open(desc["digest"]) as raw, media.open_uncompressed(raw) as stream:
            shutil.copyfileobj(stream, tmp, 1 << 20)
        size = tmp.tell()
        tmp.seek(0)
        info = tarfile.TarInfo(f"blobs/sha256/{parse_digest(diff_id)}")
        info.size = size
        info.mode = 0o644
        tar.addfile(info, tmp)
    sizes[diff_id] = size
    return {"mediaType": media.OCI_LAYER, "digest": diff_id, "size": size}


def _head(store: ImageStore, digest: str) -> bytes:
    with store.content.open(digest) as fh:
        return fh.read(4)


def _docker_full_name(name: str) -> str:
    if "/" in name and is_registry_host(name.split("/", 1)[0]):
        return name
    if "/" not in name.rsplit(":", 1)[0]:
        return f"docker.io/library/{name}"
    return f"docker.io/{name}"
