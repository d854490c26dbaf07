"""``berth-agent images|import|load|save|rmi|tag|bootstrap|image inspect|system prune``.

Shaped like docker's commands of the same names. Every command acts in one tenant's
image namespace (``--tenant``); shared base images (the ``library`` namespace, e.g.
``busybox`` after ``bootstrap``) are listed and usable by every tenant but removable only
with ``--tenant library``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from datetime import UTC, datetime
from typing import Any, BinaryIO

from runtime_agent.agent import Agent
from runtime_agent.cli.main import add_tenant_argument
from runtime_agent.cli.template import (
    Template,
    add_format_argument,
    go_time,
    print_inspected,
    print_rows,
)
from runtime_agent.config import AgentConfig
from runtime_agent.errors import AgentError, InvalidArgument
from runtime_agent.images.archive import parse_changes
from runtime_agent.images.bootstrap import bootstrap_busybox
from runtime_agent.images.reference import SHARED_NAMESPACE
from runtime_agent.images.store import Image
from runtime_agent.images.usage import containers_in_use


def human_size(size: float) -> str:
    """docker's sizes: decimal units, three significant digits (1.98MB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            text = f"{size:.3g}"
            return f"{text}{unit}"
        size /= 1000
    return f"{size}B"


def _created_time(created: str | None) -> datetime | None:
    """An image config's ``created`` (RFC 3339), or None when absent or unreadable."""
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")) if created else None
    except ValueError:
        return None


def human_age(created: str | None) -> str:
    when = _created_time(created)
    if when is None:
        return "N/A"
    seconds = (datetime.now(UTC) - when).total_seconds()
    for limit, unit, div in (
        (120, "seconds", 1),
        (7200, "minutes", 60),
        (172800, "hours", 3600),
        (1209600, "days", 86400),
        (5184000, "weeks", 604800),
        (63072000, "months", 2592000),
    ):
        if seconds < limit:
            return f"{max(int(seconds // div), 1)} {unit} ago"
    return f"{int(seconds // 31536000)} years ago"


def inspect_image(image: Image) -> dict[str, Any]:
    """``docker image inspect``-shaped description."""
    cfg = image.container_config
    return {
        "Id": image.config_digest,
        "RepoTags": image.repo_tags,
        "RepoDigests": [f"{t.rsplit(':', 1)[0]}@{image.manifest_digest}" for t in image.repo_tags],
        "Created": image.created,
        "Author": image.config.get("author", ""),
        "Architecture": image.config.get("architecture"),
        "Os": image.config.get("os"),
        "Size": image.size,
        "Config": {
            "Env": cfg.get("Env"),
            "Cmd": cfg.get("Cmd"),
            "Entrypoint": cfg.get("Entrypoint"),
            "WorkingDir": cfg.get("WorkingDir", ""),
            "User": cfg.get("User", ""),
            "ExposedPorts": cfg.get("ExposedPorts"),
            "Volumes": cfg.get("Volumes"),
            "Labels": cfg.get("Labels"),
            "StopSignal": cfg.get("StopSignal"),
        },
        "RootFS": {"Type": "layers", "Layers": image.diff_ids},
        "Metadata": {"Namespace": image.tenant, "ManifestDigest": image.manifest_digest},
    }


# images --format: docker's field names for an image row, and their table headers.
IMAGE_FIELDS = {
    "ID": "IMAGE ID",
    "Repository": "REPOSITORY",
    "Tag": "TAG",
    "Digest": "DIGEST",
    "CreatedSince": "CREATED",
    "CreatedAt": "CREATED AT",
    "Size": "SIZE",
}


def _image_row(image: Image, no_trunc: bool) -> dict[str, str]:
    name, tag = (image.reference or "<none>:<none>").rsplit(":", 1)
    when = _created_time(image.created)
    return {
        "ID": image.config_digest if no_trunc else image.short_id,
        "Repository": name,
        "Tag": tag,
        "Digest": image.manifest_digest,
        "CreatedSince": human_age(image.created),
        "CreatedAt": go_time(when) if when else "",
        "Size": human_size(image.size),
    }


def _images(args: argparse.Namespace, config: AgentConfig) -> int:
    template = Template.parse(args.format) if args.format else None  # bad ones fail first
    agent = Agent(config)
    images = agent.images.list(args.tenant, include_shared=True)
    if args.reference:
        from runtime_agent.images.reference import parse_reference

        wanted = parse_reference(args.reference, default_tag=False)
        images = [
            i
            for i in images
            if i.reference
            and i.reference.rsplit(":", 1)[0] == wanted.name
            and (wanted.tag is None or i.reference.rsplit(":", 1)[1] == wanted.tag)
        ]
    if args.quiet:
        seen: set[str] = set()
        for image in images:
            if image.config_digest not in seen:
                seen.add(image.config_digest)
                print(image.config_digest if args.no_trunc else image.short_id)
        return 0
    if template is not None:
        print_rows(template, [_image_row(image, args.no_trunc) for image in images], IMAGE_FIELDS)
        return 0
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")]
    for image in images:
        name, tag = (image.reference or "<none>:<none>").rsplit(":", 1)
        image_id = image.config_digest if args.no_trunc else image.short_id
        rows.append((name, tag, image_id, human_age(image.created), human_size(image.size)))
    widths = [max(len(r[i]) for r in rows) + 3 for i in range(4)]
    for row in rows:
        print("".join(col.ljust(w) for col, w in zip(row[:4], widths, strict=True)) + row[4])
    return 0


def _open_input(path: str | None) -> BinaryIO:
    if path is None or path == "-":
        if sys.stdin.isatty():
            raise InvalidArgument("requested load from stdin, but stdin is empty")
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InvalidArgument(f"cannot open {path}: {exc.strerror}") from None


def _import(args: argparse.Namespace, config: AgentConfig) -> int:
    changes = parse_changes(args.change or [])
    source = _open_input(args.file)
    try:
        image = Agent(config).images.import_rootfs(
            args.tenant, source, args.reference, changes=changes, message=args.message
        )
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    print(image.config_digest)
    return 0


def _load(args: argparse.Namespace, config: AgentConfig) -> int:
    source = _open_input(args.input)
    try:
        images = Agent(config).images.import_archive(args.tenant, source)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    for image in images:
        if image.reference and not image.reference.startswith("untagged-"):
            print(f"Loaded image: {image.reference}")
        else:
            print(f"Loaded image ID: {image.config_digest}")
    return 0


def _save(args: argparse.Namespace, config: AgentConfig) -> int:
    agent = Agent(config)
    if args.output is None:
        if sys.stdout.isatty():
            raise InvalidArgument(
                "cowardly refusing to save to a terminal. Use the -o flag or redirect"
            )
        agent.images.save(args.tenant, args.images, sys.stdout.buffer, args.format)
        sys.stdout.buffer.flush()
        return 0
    tmp = f"{args.output}.partial"
    try:
        with open(tmp, "wb") as out:
            agent.images.save(args.tenant, args.images, out, args.format)
        os.replace(tmp, args.output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return 0


def _rmi(args: argparse.Namespace, config: AgentConfig) -> int:
    agent = Agent(config)
    in_use = containers_in_use(agent).image_ids
    status = 0
    for ref in args.images:
        try:
            for key in agent.images.remove(args.tenant, ref, force=args.force, in_use=in_use):
                print(f"Untagged: {key}")
        except AgentError as exc:
            sys.stderr.write(f"Error response from daemon: {exc}\n")
            status = 1
    return status


def _tag(args: argparse.Namespace, config: AgentConfig) -> int:
    Agent(config).images.tag(args.tenant, args.source, args.target)
    return 0


def _bootstrap(args: argparse.Namespace, config: AgentConfig) -> int:
    image = bootstrap_busybox(Agent(config))
    print(f"{SHARED_NAMESPACE}/{image.reference} {image.config_digest}")
    return 0


def _image_inspect(args: argparse.Namespace, config: AgentConfig) -> int:
    template = Template.parse(args.format) if args.format else None
    agent = Agent(config)
    found, status = [], 0
    for ref in args.images:
        try:
            found.append(inspect_image(agent.images.resolve(args.tenant, ref)))
        except AgentError as exc:
            sys.stderr.write(f"Error: {exc}\n")
            status = 1
    print_inspected(found, template)
    return status


def prune_images(agent: Agent, tenant: str, *, all_images: bool) -> tuple[list[str], int]:
    """Remove unused images (with ``all_images``), then unreferenced blobs and snapshots.

    Returns (untagged references, bytes reclaimed). Blobs and layers are node-wide and
    removed only when no tenant's image references them; snapshots of existing
    containers are kept.
    """
    usage = containers_in_use(agent)
    untagged: list[str] = []
    if all_images:
        for image in agent.images.list(tenant):
            if image.config_digest in usage.image_ids or image.reference is None:
                continue
            untagged.extend(agent.images.remove(tenant, image.reference))
    before = agent.snapshots.layers_usage()
    # Blobs of images that containers still run on stay, even if force-untagged.
    _, freed = agent.images.gc(extra_manifests=usage.manifests)
    agent.snapshots.gc(
        agent.images.referenced_chain_ids(),
        keys_in_use=usage.snapshot_keys if usage.known else None,
    )
    freed += max(before - agent.snapshots.layers_usage(), 0)
    return untagged, freed


def prune_stopped_containers(agent: Agent, tenant: str) -> list[str]:
    """Remove the tenant's containers that are not running (docker system prune's first step)."""
    manager = getattr(agent, "containers", None)
    if manager is None:
        return []
    removed = []
    for info in manager.list(tenant, all=True):
        if info.state in ("running", "paused"):
            continue
        try:
            manager.remove(tenant, info.id)
        except AgentError as exc:
            sys.stderr.write(f"berth-agent: could not remove container {info.short_id}: {exc}\n")
            continue
        removed.append(info.id)
    return removed


def _system_prune(args: argparse.Namespace, config: AgentConfig) -> int:
    if not args.force:
        sys.stderr.write(
            "WARNING! This will remove:\n  - all stopped containers\n"
            "  - all dangling images and unreferenced layers\n"
            + (
                "  - all images without at least one container associated to them\n"
                if args.all
                else ""
            )
            + "Are you sure you want to continue? [y/N] "
        )
        sys.stderr.flush()
        answer = sys.stdin.readline().strip().lower() if not sys.stdin.closed else ""
        if answer not in ("y", "yes"):
            return 0
    agent = Agent(config)
    removed = prune_stopped_containers(agent, args.tenant)
    if removed:
        print("Deleted Containers:")
        for container_id in removed:
            print(container_id)
        print()
    untagged, freed = prune_images(agent, args.tenant, all_images=args.all)
    if untagged:
        print("Deleted Images:")
        for key in untagged:
            print(f"untagged: {key}")
        print()
    print(f"Total reclaimed space: {human_size(freed)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("images", help="list images")
    add_tenant_argument(p)
    p.add_argument("reference", nargs="?", help="only images of this repository[:tag]")
    p.add_argument("-q", "--quiet", action="store_true", help="only show image ids")
    p.add_argument("--no-trunc", action="store_true", help="show full image ids")
    p.add_argument("-a", "--all", action="store_true", help="accepted for docker compatibility")
    p.add_argument(
        "--format",
        help="a Go template per image ('table' first for a header), fields: "
        + ", ".join(f".{name}" for name in IMAGE_FIELDS),
    )
    p.set_defaults(func=_images)

    p = subparsers.add_parser("import", help="create an image from a root filesystem tarball")
    add_tenant_argument(p)
    p.add_argument("file", help="tarball (plain, gzip or zstd) or - for stdin")
    p.add_argument("reference", nargs="?", help="REPOSITORY[:TAG]")
    p.add_argument(
        "-c",
        "--change",
        action="append",
        help="apply a Dockerfile instruction (CMD, ENV, WORKDIR, ...)",
    )
    p.add_argument("-m", "--message", help="commit message for the image history")
    p.set_defaults(func=_import)

    p = subparsers.add_parser("load", help="load images from a docker or OCI archive")
    add_tenant_argument(p)
    p.add_argument("-i", "--input", help="read from this file instead of stdin")
    p.add_argument("-q", "--quiet", action="store_true", help="accepted for compatibility")
    p.set_defaults(func=_load)

    p = subparsers.add_parser("save", help="save images to an archive (docker load accepts it)")
    add_tenant_argument(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument(
        "--format",
        choices=("docker", "oci"),
        default="docker",
        help="docker: uncompressed layers; oci: blobs as stored (both loadable)",
    )
    p.set_defaults(func=_save)

    p = subparsers.add_parser("rmi", help="remove images")
    add_tenant_argument(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true", help="remove even if in use")
    p.set_defaults(func=_rmi)

    p = subparsers.add_parser("tag", help="create a reference to an image")
    add_tenant_argument(p)
    p.add_argument("source", metavar="SOURCE_IMAGE[:TAG]")
    p.add_argument("target", metavar="TARGET_IMAGE[:TAG]")
    p.set_defaults(func=_tag)

    p = subparsers.add_parser("bootstrap", help="create the shared busybox:latest base image")
    add_tenant_argument(p)
    p.set_defaults(func=_bootstrap)

    image = subparsers.add_parser("image", help="manage images")
    image_sub = image.add_subparsers(
        dest="image_command", metavar="COMMAND", parser_class=type(image)
    )
    image_sub.required = True
    p = image_sub.add_parser("inspect", help="show image details as JSON")
    add_tenant_argument(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_format_argument(p, "{{.Id}}")
    p.set_defaults(func=_image_inspect)
    p = image_sub.add_parser("ls", help="list images")
    add_tenant_argument(p)
    p.add_argument("reference", nargs="?")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("-a", "--all", action="store_true")
    p.set_defaults(func=_images)
    p = image_sub.add_parser("rm", help="remove images")
    add_tenant_argument(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true")
    p.set_defaults(func=_rmi)

    system = subparsers.add_parser("system", help="manage the node")
    system_sub = system.add_subparsers(
        dest="system_command", metavar="COMMAND", parser_class=type(system)
    )
    system_sub.required = True
    p = system_sub.add_parser("prune", help="remove unused data")
    add_tenant_argument(p)
    p.add_argument(
        "-a", "--all", action="store_true", help="also remove the tenant's images no container uses"
    )
    p.add_argument("-f", "--force", action="store_true", help="do not prompt for confirmation")
    p.set_defaults(func=_system_prune)
