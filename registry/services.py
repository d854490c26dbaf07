"""Registry services: who may do what (the token server), recording notifications,
storage accounting against the tenant's ``storage_gib`` quota, deletes, retention, GC.

Repository names are ``<tenant-slug>/<path>``: the first component is the tenant and
decides everything. A tenant API token reaches only its own tenant's repositories (pull
with scope ``read``; push and delete with ``write`` and a role allowed to manage
workloads); anyone pulls a repository marked public. A node's own credential pulls
nothing more than anyone: a node pulls a tenant's image with a token minted for that
tenant (:func:`tenant_pull_token`, asked for right before the pull), which reaches only
repositories the tenant may read itself — its own and public ones — so naming another
tenant's repository in a service does not borrow the node's rights. A build's push
token (:func:`repository_push_token`) pulls and pushes its one repository.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, JSONField, OuterRef, Q, QuerySet, Subquery, Sum
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from registry.errors import RegistryAuthError, RegistryDenied, RegistryUnavailable
from registry.models import (
    Blob,
    GarbageCollectionRun,
    Manifest,
    NodeCredential,
    RegistryEvent,
    RegistryUsage,
    Repository,
    RetentionPolicy,
    Tag,
)
from registry.tokens import Access, IssuedToken, issue_token, parse_scope
from runtime_agent.names import node_name_problem
from tenants import permissions as perms
from tenants import services as tenant_services
from tenants.choices import Scope
from tenants.errors import InvalidInput, NotFound, QuotaExceeded, TenantSuspended
from tenants.models import TOKEN_PREFIX, APIToken, Membership, Tenant, hash_secret
from tenants.services import Actor, record

log = logging.getLogger(__name__)

GIB = 1024**3
NODE_SECRET_PREFIX = "brn_"  # noqa: S105 (a public marker, not a secret)
NODE_USER_PREFIX = "node-"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})+$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)


# --------------------------------------------------------------------------- settings


def registry_dir() -> Path:
    return Path(settings.BERTH_REGISTRY_DIR)


def signing_key_path() -> str:
    return str(registry_dir() / "token.key")


def notify_secret() -> str:
    try:
        return (registry_dir() / "notify.secret").read_text().strip()
    except FileNotFoundError:
        return ""


def registry_configured() -> bool:
    """Whether this control plane has a registry to issue tokens for (``registry.sh
    setup`` wrote the token signing key under ``BERTH_REGISTRY_DIR``)."""
    return Path(signing_key_path()).is_file()


def storage_root() -> Path:
    """The filesystem driver's root (see infra/registry/config.yml.template)."""
    return registry_dir() / "storage"


# --------------------------------------------------------------------------- principals


@dataclass(frozen=True)
class Principal:
    """Who asks for a registry token."""

    kind: str  # "token", "node", "anonymous", "system"
    label: str
    token: APIToken | None = None
    role: str | None = None
    node: NodeCredential | None = None

    @property
    def tenant(self) -> Tenant | None:
        return self.token.tenant if self.token is not None else None


ANONYMOUS = Principal(kind="anonymous", label="anonymous")


def parse_basic_auth(header: str) -> tuple[str, str] | None:
    """``Basic base64(user:password)`` → (user, password); None when absent."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise RegistryAuthError("the token endpoint takes Basic credentials (user:API token)")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise RegistryAuthError("malformed Basic credentials") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise RegistryAuthError("malformed Basic credentials")
    return user, password


def authenticate(credentials: tuple[str, str] | None, *, ip: str | None = None) -> Principal:
    """Resolve Basic credentials: a tenant API token (any username), or a node credential."""
    if credentials is None:
        return ANONYMOUS
    username, secret = credentials
    if secret.startswith(NODE_SECRET_PREFIX):
        node = NodeCredential.objects.filter(secret_hash=hash_secret(secret)).first()
        if node is None or node.revoked_at is not None:
            raise RegistryAuthError("unknown or revoked node credential")
        if username and username != f"{NODE_USER_PREFIX}{node.node_name}":
            raise RegistryAuthError("the node credential belongs to another node")
        NodeCredential.objects.filter(pk=node.pk).update(last_used_at=timezone.now())
        return Principal(kind="node", label=str(node), node=node)
    if not secret.startswith(TOKEN_PREFIX):
        raise RegistryAuthError(
            "incorrect username or password: log in with a Berth API token as the password"
        )
    token = (
        APIToken.objects.select_related("tenant", "user")
        .filter(token_hash=hash_secret(secret))
        .first()
    )
    if token is None:
        raise RegistryAuthError("incorrect username or password: unknown API token")
    if token.state != "active":
        raise RegistryAuthError(f"API token {token.prefix} is {token.state}")
    membership = Membership.objects.filter(tenant_id=token.tenant_id, user_id=token.user_id).first()
    if membership is None or not token.user.is_active:
        raise RegistryAuthError(f"the owner of API token {token.prefix} left the tenant")
    tenant_services.touch_token(token, ip)
    return Principal(
        kind="token",
        label=f"{token.user.email} via token {token.prefix}",
        token=token,
        role=membership.role,
    )


# --------------------------------------------------------------------------- grants


def split_repository(name: str) -> tuple[str, str]:
    """``acme/web/api`` → (``acme``, ``web/api``); InvalidInput for malformed names."""
    if len(name) > 255 or not REPOSITORY_NAME_RE.match(name):
        raise InvalidInput(
            f"invalid repository name {name!r}: use <tenant>/<name> with lowercase letters, "
            "digits and separators",
            details={"repository": name},
        )
    tenant_slug, _, path = name.partition("/")
    return tenant_slug, path


def _may(principal: Principal, permission: str, scope: str) -> bool:
    token = principal.token
    return bool(
        token is not None
        and token.allows(scope)
        and perms.has_permission(principal.role, permission)
    )


def storage_limit_and_use(tenant: Tenant) -> tuple[int, int]:
    """(limit, bytes in use) of ``storage_gib`` for this tenant, in bytes.

    Use is everything else holding the quota (volumes...) plus the registry's exact bytes.
    """
    limit = int(tenant.quota_limits()["storage_gib"]) * GIB
    usage = RegistryUsage.objects.filter(tenant=tenant).first()
    from tenants.models import QuotaUsage

    pooled = QuotaUsage.objects.filter(tenant=tenant, quota="storage_gib").first()
    others_gib = (pooled.used if pooled else 0) - (usage.reserved_gib if usage else 0)
    return limit, max(0, others_gib) * GIB + (usage.bytes_used if usage else 0)


def check_push_quota(tenant: Tenant) -> None:
    """Refuse a push (RegistryDenied, with the message docker prints) when the tenant's
    storage quota is used up (exact bytes: blobs without a manifest and what a push with
    an older token took over the limit count too) or its monthly spend cap is reached
    (``billing.services.check_new_usage_allowed``)."""
    from billing.services import SpendCapReached, check_new_usage_allowed

    limit, used = storage_limit_and_use(tenant)
    if used >= limit:
        raise RegistryDenied(
            f"quota storage_gib exceeded: limit {limit // GIB} GiB, in use {used} bytes; "
            "delete images or raise the quota to push",
            details={"quota": "storage_gib", "limit": limit // GIB, "used_bytes": used},
        )
    try:
        check_new_usage_allowed(tenant, "push")
    except (SpendCapReached, TenantSuspended) as exc:
        raise RegistryDenied(exc.message, details=exc.details) from None


def grant(principal: Principal, scopes: Iterable[str]) -> list[Access]:
    """The access the principal gets for each requested scope (possibly less than asked).

    Like docker's token servers, access that is not allowed is left out rather than
    refused, and the registry answers the request with its own error. Exceptions that
    deserve a message: a push to one's own repository over the storage quota, or by a
    suspended tenant (RegistryDenied).
    """
    granted: list[Access] = []
    for raw in (part for scope in scopes for part in scope.split()):
        requested = parse_scope(raw)
        if requested is None or requested.type != "repository":
            continue
        try:
            tenant_slug, path = split_repository(requested.name)
        except InvalidInput:
            continue
        wanted = set(requested.actions)
        if "*" in wanted:
            wanted = {"pull", "push", "delete"}
        allowed: set[str] = set()
        own = principal.tenant is not None and principal.tenant.slug == tenant_slug
        if own and _may(principal, perms.WORKLOADS_VIEW, Scope.READ):
            allowed.add("pull")
        if own and _may(principal, perms.WORKLOADS_MANAGE, Scope.WRITE):
            allowed |= {"push", "delete"}
        if principal.kind == "system":
            allowed.add("pull")
        if principal.kind == "system":
            allowed |= {"push", "delete"}
        if "pull" in wanted and "pull" not in allowed:
            repo = Repository.objects.filter(
                tenant__slug=tenant_slug, name=path, public=True
            ).exists()
            if repo:
                allowed.add("pull")
        actions = wanted & allowed
        if "push" in actions and principal.kind == "token":
            tenant = principal.tenant
            assert tenant is not None
            tenant.refresh_from_db()
            if not tenant.is_active:
                raise RegistryDenied(
                    f"tenant {tenant.slug} is suspended: pushing is disabled"
                    + (f" ({tenant.status_reason})" if tenant.status_reason else "")
                )
            check_push_quota(tenant)
        if actions:
            granted.append(Access("repository", requested.name, tuple(sorted(actions))))
    return granted


def platform_repository(image: str) -> tuple[str, str] | None:
    """``(tenant slug, path)`` of an image on this platform's registry
    (``<BERTH_REGISTRY_HOST>/<tenant>/<path>[:tag][@digest]``); None for a local image or
    another registry's."""
    from runtime_agent.distribution.reference import parse_reference
    from runtime_agent.errors import InvalidArgument

    try:
        reference = parse_reference(image)
    except InvalidArgument:
        return None
    if reference.registry != settings.BERTH_REGISTRY_HOST:
        return None
    try:
        return split_repository(reference.repository)
    except InvalidInput:
        return None


def image_access_error(tenant: Tenant, image: str) -> str | None:
    """Why ``tenant`` may not run ``image`` from this platform's registry, or None.

    A tenant runs its own repositories and public ones; another tenant's private
    repository is refused whoever else on the platform (a node, say) could read it.
    """
    located = platform_repository(image)
    if located is None:
        return None
    owner, path = located
    if owner == tenant.slug:
        return None
    if Repository.objects.filter(tenant__slug=owner, name=path, public=True).exists():
        return None
    return (
        f"image {image!r} is in the repository {owner}/{path}, which is not {tenant.slug}'s "
        f"and not public: a tenant runs images of its own repositories "
        f"({settings.BERTH_REGISTRY_HOST}/{tenant.slug}/...) and public ones"
    )


def tenant_pull_token(tenant: Tenant, image: str, *, subject: str) -> IssuedToken | None:
    """A bearer token that may pull ``image``'s repository and nothing else, for a node
    about to pull it for ``tenant`` (valid ``BERTH_REGISTRY_TOKEN_TTL`` seconds).

    None when the image is not on this platform's registry (the node pulls it
    anonymously, never with a login of its own). RegistryDenied when the tenant may not
    read that repository (:func:`image_access_error`).
    """
    located = platform_repository(image)
    if located is None:
        return None
    if problem := image_access_error(tenant, image):
        raise RegistryDenied(problem, details={"image": image})
    return issue_token(
        key_path=signing_key_path(),
        issuer=settings.BERTH_REGISTRY_ISSUER,
        service=settings.BERTH_REGISTRY_SERVICE,
        subject=subject,
        access=[Access("repository", "/".join(located), ("pull",))],
        lifetime=settings.BERTH_REGISTRY_TOKEN_TTL,
    )


def token_for(principal: Principal, scopes: Iterable[str]) -> IssuedToken:
    return issue_token(
        key_path=signing_key_path(),
        issuer=settings.BERTH_REGISTRY_ISSUER,
        service=settings.BERTH_REGISTRY_SERVICE,
        subject=principal.label,
        access=grant(principal, scopes),
        lifetime=settings.BERTH_REGISTRY_TOKEN_TTL,
    )


def check_push_allowed(tenant: Tenant) -> None:
    """Refuse (RegistryDenied) when the tenant may not push now, as its own push would be
    refused at token time: a suspended tenant, or its storage quota used up."""
    tenant.refresh_from_db()
    if not tenant.is_active:
        raise RegistryDenied(f"tenant {tenant.slug} is suspended: pushing is disabled")
    check_push_quota(tenant)


def repository_push_token(tenant: Tenant, repository: str, *, subject: str) -> IssuedToken:
    """A bearer token that may pull and push ``<tenant>/<repository>`` and nothing else,
    for ``BERTH_REGISTRY_TOKEN_TTL`` seconds.

    The control plane mints it for the node building an image for the tenant when that
    node is about to push (a node's own credential may only pull), and refuses it as
    :func:`check_push_allowed` does (RegistryDenied). Nothing is stored: the token can't
    be revoked, so it is short-lived instead.
    """
    name = f"{tenant.slug}/{repository}"
    split_repository(name)
    check_push_allowed(tenant)
    return issue_token(
        key_path=signing_key_path(),
        issuer=settings.BERTH_REGISTRY_ISSUER,
        service=settings.BERTH_REGISTRY_SERVICE,
        subject=subject,
        access=[Access("repository", name, ("pull", "push"))],
        lifetime=settings.BERTH_REGISTRY_TOKEN_TTL,
    )


# --------------------------------------------------------------------------- node credentials


def _credentials_named(node_name: str, node_id: uuid.UUID | str | None) -> QuerySet[NodeCredential]:
    """Credentials other than ``node_id``'s that hold ``node_name``, leaving out those of
    joined nodes that no longer exist (their name is free again)."""
    from workloads.models import Node

    others = NodeCredential.objects.filter(node_name=node_name)
    if node_id is not None:
        others = others.exclude(node_id=node_id)
    alive = Node.objects.filter(pk=OuterRef("node_id"))
    return others.filter(Q(node_id__isnull=True) | Q(Exists(alive)))


def node_credential_problem(node_name: str, node_id: uuid.UUID | str | None = None) -> str | None:
    """Why ``node_name`` cannot get a registry credential (for the joined node ``node_id``,
    or, without it, minted by the operator for a node that never joined), or None.

    A joined node's credential is keyed by its id: minting by name never touches it, and
    another node never gets one under a name some node's credential already has.
    """
    if problem := node_name_problem(node_name):
        return problem
    holder = _credentials_named(node_name, node_id).first()
    if holder is None:
        return None
    if holder.node_id is not None:
        return (
            f"node {node_name!r} joined the control plane: its registry credential belongs "
            "to that node and is never minted by name"
        )
    if node_id is not None:
        return (
            f"the operator minted a registry credential for a node named {node_name!r}: "
            "join under another name, or revoke and delete that credential first"
        )
    return None


@transaction.atomic
def create_node_credential(
    node_name: str, *, actor: Actor, node_id: uuid.UUID | str | None = None
) -> tuple[NodeCredential, str]:
    """Mint (or rotate) the registry credential of a node; returns (row, secret).

    With ``node_id`` (a joined node, see ``workloads.services.nodes.registry_login``) the
    credential is that node's, found by id; without it, the operator's credential of a
    node that never joined, found by name. Refused (InvalidInput) as
    :func:`node_credential_problem` says. The agent logs in with username
    ``node-<node_name>`` and the secret; it pulls what anyone may (public repositories):
    tenants' images come with tokens minted for the tenant (:func:`tenant_pull_token`).
    Rotating invalidates the previous secret.
    """
    if problem := node_credential_problem(node_name, node_id):
        raise InvalidInput(problem, details={"node": node_name})
    secret = NODE_SECRET_PREFIX + secrets.token_urlsafe(32)
    fields = {
        "node_name": node_name,
        "secret_hash": hash_secret(secret),
        "revoked_at": None,
        "created_at": timezone.now(),
    }
    # A credential of a deleted node that had this name goes with its node.
    NodeCredential.objects.filter(node_name=node_name, node_id__isnull=False).exclude(
        node_id=node_id
    ).delete()
    if node_id is None:
        credential, _ = NodeCredential.objects.update_or_create(
            node_name=node_name, node_id=None, defaults=fields
        )
    else:
        credential, _ = NodeCredential.objects.update_or_create(node_id=node_id, defaults=fields)
    record(actor, "registry.node_credential.create", tenant=None, target=credential)
    return credential, secret


@transaction.atomic
def revoke_node_credential(node_name: str, *, actor: Actor) -> bool:
    updated = NodeCredential.objects.filter(node_name=node_name, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    if updated:
        record(actor, "registry.node_credential.revoke", tenant=None, details={"node": node_name})
    return bool(updated)


# --------------------------------------------------------------------------- notifications


def check_notification_auth(header: str) -> bool:
    expected = notify_secret()
    return bool(expected) and hmac.compare_digest(header or "", f"Bearer {expected}")


#: More than any real image has (overlayfs stacks at most 128 layers; indexes list a few
#: platforms): a manifest past it is refused before the registry is asked about each.
MAX_MANIFEST_REFERENCES = 1000


class PushRefused(Exception):
    """A manifest the registry accepted that Berth does not keep: it lies about a size,
    its tenant is suspended or over its storage quota. The manifest is deleted from the
    registry, the refusal recorded on the event and in the tenant's audit log."""

    def __init__(self, repository: Repository, digest: str, message: str) -> None:
        super().__init__(message)
        self.repository = repository
        self.digest = digest
        self.message = message


def record_delivery(body: bytes) -> dict[str, int]:
    """Record one authenticated notification delivery, whatever it holds.

    The registry retries a delivery that is not answered 2xx forever and queues every
    later event (of every tenant) behind it, so nothing a tenant can put in a push may
    make this fail: an undecodable envelope, a malformed event, an event whose recording
    fails or whose push is refused is recorded with an error outcome and logged at error
    level, and the delivery is still acknowledged. Returns counts per outcome.
    """
    try:
        envelope = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return _record_malformed(body, f"undecodable envelope: {type(exc).__name__}")
    return record_events(envelope, raw=body)


def record_events(envelope: Any, *, raw: bytes | None = None) -> dict[str, int]:
    """Record a decoded envelope; each event once (by id). Returns counts per outcome
    (see :func:`record_delivery`: a malformed envelope or event is recorded, not raised)."""
    counts = {"recorded": 0, "duplicate": 0, "ignored": 0, "failed": 0}
    events = envelope.get("events") if isinstance(envelope, dict) else None
    if not isinstance(events, list):
        fingerprint = raw if raw is not None else repr(envelope).encode()
        return _record_malformed(fingerprint, "envelope without an events list")
    for event in events:
        if not isinstance(event, dict) or not isinstance(event.get("id"), str | int):
            log.error("registry notification: ignored an event without an id: %.200r", event)
            counts["ignored"] += 1
            continue
        counts[record_event(event)] += 1
    return counts


def _record_malformed(body: bytes, reason: str) -> dict[str, int]:
    log.error("registry notification: %s (%d bytes)", reason, len(body))
    event_id = "malformed-" + hashlib.sha256(body).hexdigest()[:64]
    RegistryEvent.objects.get_or_create(
        event_id=event_id, defaults={"action": "invalid", "outcome": reason, "error": True}
    )
    return {"recorded": 0, "duplicate": 0, "ignored": 0, "failed": 1}


def _parse_time(value: Any) -> datetime | None:
    try:
        return parse_datetime(str(value)) if value else None
    except ValueError:
        return None


def _size_field(value: Any) -> int | None:
    """A size as JSON holds it: a non-negative integer, else None (bool is no size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _target_size(target: Mapping[str, Any]) -> int | None:
    return _size_field(target.get("size", target.get("length")))


def _text(mapping: Any, key: str, limit: int) -> str:
    value = mapping.get(key) if isinstance(mapping, Mapping) else None
    return value[:limit] if isinstance(value, str) else ""


@transaction.atomic
def record_event(event: Mapping[str, Any]) -> str:
    """Record one event once by its id: "recorded", "duplicate" (seen before), or
    "failed" (recorded with an error outcome: refused or not applied, never raised)."""
    raw_target = event.get("target")
    target: Mapping[str, Any] = raw_target if isinstance(raw_target, Mapping) else {}
    action = _text(event, "action", 16)
    row = RegistryEvent(
        event_id=str(event["id"])[:100],
        action=action,
        repository=_text(target, "repository", 255),
        digest=_text(target, "digest", 71),
        tag=_text(target, "tag", 128),
        media_type=_text(target, "mediaType", 255),
        size=_target_size(target),
        actor=_text(event.get("actor"), "name", 200),
        occurred_at=_parse_time(event.get("timestamp")),
    )
    try:
        with transaction.atomic():
            row.save()
    except IntegrityError:
        return "duplicate"
    try:
        with transaction.atomic():
            row.outcome = _apply_event(action, target)
    except PushRefused as refused:
        row.error = True
        row.outcome = f"refused: {refused.message}; {_undo_refused_push(refused, row)}"
    except Exception as exc:  # an event must never block the queue
        log.exception("registry event %s (%s %s) not applied", row.event_id, action, row.repository)
        row.error = True
        row.outcome = f"error: {type(exc).__name__}: {exc}"
    row.outcome = row.outcome[:500]
    row.save(update_fields=["outcome", "error"])
    return "failed" if row.error else "recorded"


def _undo_refused_push(refused: PushRefused, row: RegistryEvent) -> str:
    """Delete a refused manifest from the registry (its tags go with it), record why in
    the tenant's audit log and recount its storage: the blobs it uploaded stay in storage
    until GC and count meanwhile. Returns what was done, for the event's outcome."""
    repo = refused.repository
    log.error("registry push refused: %s@%s: %s", repo.full_name, refused.digest, refused.message)
    done = "manifest deleted from the registry"
    try:
        response = _registry_call(
            "DELETE", f"/v2/{repo.full_name}/manifests/{refused.digest}", repo.full_name
        )
        if response.status_code not in (202, 404):
            done = f"the registry refused to delete it ({response.status_code})"
    except RegistryUnavailable as exc:
        done = f"could not delete it: {exc.message}"
    if done != "manifest deleted from the registry":
        log.error("refused manifest %s@%s stays: %s", repo.full_name, refused.digest, done)
    try:
        with transaction.atomic():
            if row.tag:
                Tag.objects.filter(
                    repository__tenant_id=repo.tenant_id, repository__name=repo.name, name=row.tag
                ).delete()
            record(
                Actor.for_system("registry"),
                "registry.push.refused",
                tenant=repo.tenant,
                details={
                    "repository": repo.full_name,
                    "digest": refused.digest,
                    "tag": row.tag,
                    "reason": refused.message,
                    "undone": done,
                },
            )
            scan_tenant_storage(repo.tenant)
    except Exception:  # the periodic scan recounts later
        log.exception("recount after the refused push %s@%s failed", repo.full_name, refused.digest)
        done += "; recount failed"
    return done


def _repository_for(name: str, *, create: bool) -> Repository | None:
    try:
        tenant_slug, path = split_repository(name)
    except InvalidInput:
        return None
    tenant = Tenant.objects.filter(slug=tenant_slug).first()
    if tenant is None:
        return None
    if not create:
        return Repository.objects.filter(tenant=tenant, name=path).first()
    repo, _ = Repository.objects.get_or_create(tenant=tenant, name=path)
    return repo


def _apply_event(action: str, target: Mapping[str, Any]) -> str:
    media_type = str(target.get("mediaType") or "")
    digest = str(target.get("digest") or "")
    name = str(target.get("repository") or "")
    if action == "push" and media_type in MANIFEST_TYPES and DIGEST_RE.match(digest):
        repo = _repository_for(name, create=True)
        if repo is None:
            return "ignored: repository outside any tenant"
        return _record_manifest_push(repo, digest, media_type, target)
    if action == "delete":
        repo = _repository_for(name, create=False)
        if repo is None:
            return "ignored: unknown repository"
        tag = str(target.get("tag") or "")
        if tag:
            deleted, _ = Tag.objects.filter(repository=repo, name=tag).delete()
            return f"tag {tag} deleted" if deleted else "tag already gone"
        if DIGEST_RE.match(digest):
            deleted, _ = Manifest.objects.filter(repository=repo, digest=digest).delete()
            sync_storage_usage(repo.tenant)
            return "manifest deleted" if deleted else "manifest already gone"
    return "ignored"


def _record_manifest_push(
    repo: Repository, digest: str, media_type: str, target: Mapping[str, Any]
) -> str:
    """Record a pushed manifest with the sizes the registry holds, or refuse it.

    Every size a manifest declares (config, layers, child manifests) must be the size
    of the blob the registry stores (HEAD on the registry): a manifest that declares a
    30 MB layer as 1 byte, a negative size or a blob the registry lacks is refused, and
    so is a push by a suspended tenant or one that does not fit the storage quota (the
    token it pushed with was minted before; the quota is checked again here).
    """
    tenant = repo.tenant
    if not tenant.is_active:
        raise PushRefused(repo, digest, f"tenant {tenant.slug} is suspended: pushing is disabled")
    raw_refs = target.get("references")
    references = raw_refs if isinstance(raw_refs, list) else []
    if len(references) > MAX_MANIFEST_REFERENCES:
        # Each is a HEAD on the registry inside this delivery: thousands would hold the
        # notification queue of every tenant for minutes.
        raise PushRefused(
            repo,
            digest,
            f"a manifest may reference at most {MAX_MANIFEST_REFERENCES} blobs or manifests "
            f"(this one: {len(references)})",
        )
    real = _stored_sizes(repo, digest, references)
    own_size = real[digest]
    if own_size is None:
        raise PushRefused(repo, digest, "the registry does not hold this manifest any more")
    blobs = [_blob(tenant, digest, own_size, media_type)]
    for ref in references:
        ref_digest = ref.get("digest") if isinstance(ref, Mapping) else None
        if not isinstance(ref_digest, str) or not DIGEST_RE.match(ref_digest):
            raise PushRefused(repo, digest, f"a reference without a valid digest: {ref!r:.100}")
        declared = ref.get("size")
        if _size_field(declared) != real[ref_digest]:
            raise PushRefused(
                repo,
                digest,
                f"{ref_digest} is declared as {declared!r:.30} bytes but the registry holds "
                + (f"{real[ref_digest]}" if real[ref_digest] is not None else "no such blob"),
            )
        blobs.append(_blob(tenant, ref_digest, real[ref_digest], _text(ref, "mediaType", 255)))
    manifest, created = Manifest.objects.get_or_create(
        repository=repo,
        digest=digest,
        defaults={
            "media_type": media_type,
            "size": own_size,
            "total_size": own_size + sum(blob.size for blob in blobs[1:]),
        },
    )
    manifest.blobs.add(*blobs)
    Blob.objects.filter(pk__in=[blob.pk for blob in blobs]).update(orphaned_at=None)
    now = timezone.now()
    tag = _text(target, "tag", 128)
    if tag and TAG_RE.match(tag):
        Tag.objects.update_or_create(
            repository=repo, name=tag, defaults={"manifest": manifest, "updated_at": now}
        )
    Repository.objects.filter(pk=repo.pk).update(last_pushed_at=now)
    usage = sync_storage_usage(tenant)
    if usage.quota_refusal:
        raise PushRefused(repo, digest, usage.quota_refusal)
    return f"manifest {'stored' if created else 'seen'}" + (f", tag {tag}" if tag else "")


def _stored_sizes(repo: Repository, digest: str, references: list[Any]) -> dict[str, int | None]:
    """The sizes the registry holds for a manifest and what it references (HEAD each
    on the registry with the control plane's own token); None for what it lacks."""
    wanted = {digest: True}
    for ref in references:
        ref_digest = ref.get("digest") if isinstance(ref, Mapping) else None
        if isinstance(ref_digest, str) and DIGEST_RE.match(ref_digest):
            wanted.setdefault(ref_digest, ref.get("mediaType") in MANIFEST_TYPES)
    name = repo.full_name
    accept = ", ".join(sorted(MANIFEST_TYPES))
    sizes: dict[str, int | None] = {}
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {_system_token(name)}"
        for wanted_digest, is_manifest in wanted.items():
            kind = "manifests" if is_manifest else "blobs"
            url = f"{settings.BERTH_REGISTRY_URL}/v2/{name}/{kind}/{wanted_digest}"
            try:
                response = session.head(url, headers={"Accept": accept}, timeout=30)
                if response.is_redirect:  # object storage: the size is where it points
                    response = requests.head(response.headers["Location"], timeout=30)
            except requests.RequestException as exc:
                raise RegistryUnavailable(f"cannot HEAD {url}: {exc}") from exc
            length = response.headers.get("Content-Length", "")
            ok = response.status_code == 200 and length.isdigit()
            sizes[wanted_digest] = int(length) if ok else None
    return sizes


def _blob(tenant: Tenant, digest: str, size: int | None, media_type: str) -> Blob:
    """The tenant's row of a blob, its size the one the registry holds."""
    assert size is not None and size >= 0
    blob, created = Blob.objects.get_or_create(
        tenant=tenant, digest=digest, defaults={"size": size, "media_type": media_type[:255]}
    )
    if not created and blob.size != size:
        Blob.objects.filter(pk=blob.pk).update(size=size)
        blob.size = size
    return blob


# --------------------------------------------------------------------------- storage


def registry_bytes(tenant: Tenant) -> int:
    """Bytes of the tenant's blobs in the registry, each once: every blob one of its
    manifests references, and those the storage scan found in its repositories with no
    manifest (uploads never referenced, a refused push's layers) until GC frees them."""
    live = Manifest.blobs.through.objects.filter(blob_id=OuterRef("pk"))
    total = (
        Blob.objects.filter(tenant=tenant)
        .filter(Q(Exists(live)) | Q(orphaned_at__isnull=False))
        .aggregate(total=Sum("size"))["total"]
    )
    return int(total or 0)


@transaction.atomic
def sync_storage_usage(tenant: Tenant) -> RegistryUsage:
    """Recount the tenant's registry bytes and hold ``ceil(bytes / GiB)`` of ``storage_gib``.

    Bytes are :func:`registry_bytes` plus unfinished uploads (as the last storage scan
    found them). The reservation is swapped (release the old, reserve the new) inside one
    transaction. When the new amount cannot be held (over the quota, or the tenant is
    suspended) the old reservation stays, the exact bytes are still recorded and
    ``quota_refusal`` says why: the manifest push that got there is refused
    (:func:`_record_manifest_push`) and the token server refuses further pushes while
    the tenant is over its limit.
    """
    usage, _ = RegistryUsage.objects.select_for_update().get_or_create(tenant=tenant)
    usage.bytes_used = registry_bytes(tenant) + usage.upload_bytes
    needed = math.ceil(usage.bytes_used / GIB)
    actor = Actor.for_system("registry")
    usage.quota_refusal = ""
    if needed != usage.reserved_gib:
        old = usage.reservation
        try:
            with transaction.atomic():
                if old is not None:
                    tenant_services.release(old, actor=actor, reason="registry storage resize")
                reservation = (
                    tenant_services.reserve(
                        tenant, {"storage_gib": needed}, actor=actor, reason="registry storage"
                    )
                    if needed
                    else None
                )
            usage.reservation = reservation
            usage.reserved_gib = needed
        except (QuotaExceeded, TenantSuspended) as exc:
            usage.quota_refusal = exc.message[:500]
            log.warning("registry storage of %s not held: %s", tenant.slug, exc.message)
    usage.updated_at = timezone.now()
    usage.save()
    return usage


def _stored_in_tenant_repositories(tenant: Tenant) -> tuple[dict[str, int], int]:
    """What the registry's filesystem storage holds under the tenant's repositories:
    {digest: bytes} of every blob linked into one of them (uploaded, mounted or pushed
    with a manifest) whose data is still there, and the bytes of unfinished uploads."""
    v2 = storage_root() / "docker" / "registry" / "v2"
    blobs: dict[str, int] = {}
    uploads = 0
    for directory, subdirectories, _ in os.walk(v2 / "repositories" / tenant.slug):
        here = Path(directory)
        for link in (here / "_layers" / "sha256").glob("*/link"):
            digest = link.read_text(errors="replace").strip()
            if not DIGEST_RE.match(digest):
                continue
            hexdigest = digest.split(":", 1)[1]
            data = v2 / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"
            try:
                blobs[digest] = data.stat().st_size
            except FileNotFoundError:
                continue  # collected by GC; the dangling link holds nothing
        for upload in (here / "_uploads").glob("*/data"):
            with contextlib.suppress(FileNotFoundError):
                uploads += upload.stat().st_size
        # Repository path components never start with "_": those are the registry's own.
        subdirectories[:] = [name for name in subdirectories if not name.startswith("_")]
    return blobs, uploads


@transaction.atomic
def scan_tenant_storage(tenant: Tenant) -> RegistryUsage:
    """Count what the tenant holds in the registry's storage, manifest or not.

    A blob pushed without a manifest never causes a notification (and a refused push
    leaves its layers behind), so it is found here: each blob linked into one of the
    tenant's repositories becomes a ``Blob`` row with its real size, marked
    ``orphaned_at`` while no manifest references it, and counts until GC frees it;
    unfinished uploads count as ``upload_bytes`` until the registry purges them. Rows of
    orphans GC removed are dropped. Only the filesystem driver can be scanned; with
    other storage, orphans are left to GC and only referenced blobs count.
    """
    if not storage_root().is_dir():
        return sync_storage_usage(tenant)
    stored, uploads = _stored_in_tenant_repositories(tenant)
    now = timezone.now()
    referenced = set(
        Blob.objects.filter(tenant=tenant, manifests__isnull=False).values_list("digest", flat=True)
    )
    known = {blob.digest: blob for blob in Blob.objects.filter(tenant=tenant)}
    for digest, size in stored.items():
        orphaned_at = None if digest in referenced else now
        blob = known.get(digest)
        if blob is None:
            Blob.objects.create(tenant=tenant, digest=digest, size=size, orphaned_at=orphaned_at)
        elif blob.size != size or (blob.orphaned_at is None) != (orphaned_at is None):
            blob.size = size
            blob.orphaned_at = (blob.orphaned_at or orphaned_at) if orphaned_at else None
            blob.save(update_fields=["size", "orphaned_at"])
    Blob.objects.filter(tenant=tenant, orphaned_at__isnull=False, manifests__isnull=True).exclude(
        digest__in=list(stored)
    ).delete()
    RegistryUsage.objects.get_or_create(tenant=tenant)
    RegistryUsage.objects.filter(tenant=tenant).update(upload_bytes=uploads, scanned_at=now)
    return sync_storage_usage(tenant)


def scan_all_storage() -> dict[str, int]:
    """:func:`scan_tenant_storage` for every tenant with repositories in storage or a
    usage record; {tenant slug: bytes in use}. The periodic task runs it."""
    top = storage_root() / "docker" / "registry" / "v2" / "repositories"
    slugs = {entry.name for entry in top.iterdir() if entry.is_dir()} if top.is_dir() else set()
    tenants = Tenant.objects.filter(Q(slug__in=slugs) | Q(registry_usage__isnull=False))
    counted: dict[str, int] = {}
    for tenant in tenants.distinct():
        try:
            counted[tenant.slug] = scan_tenant_storage(tenant).bytes_used
        except Exception:  # one tenant's failure must not stop the others
            log.exception("registry storage scan of %s failed", tenant.slug)
    return counted


# --------------------------------------------------------------------------- registry API


def _system_token(repository: str) -> str:
    system = Principal(kind="system", label="berth-control-plane")
    return token_for(system, [f"repository:{repository}:pull,push,delete"]).token


def _registry_call(method: str, path: str, repository: str, **kwargs: Any) -> requests.Response:
    url = f"{settings.BERTH_REGISTRY_URL}{path}"
    headers = {"Authorization": f"Bearer {_system_token(repository)}", **kwargs.pop("headers", {})}
    try:
        return requests.request(method, url, headers=headers, timeout=30, **kwargs)
    except requests.RequestException as exc:
        raise RegistryUnavailable(f"cannot reach the registry at {url}: {exc}") from exc


@transaction.atomic
def delete_manifest(manifest: Manifest, *, actor: Actor) -> None:
    """Delete a manifest (and so every tag pointing at it) from the registry and here."""
    repo = manifest.repository
    response = _registry_call(
        "DELETE", f"/v2/{repo.full_name}/manifests/{manifest.digest}", repo.full_name
    )
    if response.status_code not in (202, 404):
        raise RegistryUnavailable(
            f"registry refused to delete {manifest.digest}: {response.status_code} "
            f"{response.text[:200]}"
        )
    record(
        actor,
        "registry.manifest.delete",
        tenant=repo.tenant,
        target=manifest,
        details={"repository": repo.full_name, "digest": manifest.digest},
    )
    manifest.delete()
    sync_storage_usage(repo.tenant)


@transaction.atomic
def delete_tag(tag: Tag, *, actor: Actor) -> None:
    """Remove a tag; its manifest stays (untagged) until deleted or retention removes it.

    distribution 2.8 has no tag-delete API, so the tag's link is removed from the
    filesystem storage directly (the layout is ``repositories/<name>/_manifests/tags/<tag>``).
    With other storage drivers delete the manifest instead.
    """
    repo = tag.repository
    tag_dir = (
        storage_root()
        / "docker/registry/v2/repositories"
        / repo.full_name
        / "_manifests/tags"
        / tag.name
    )
    if storage_root().is_dir():
        shutil.rmtree(tag_dir, ignore_errors=True)
    record(
        actor,
        "registry.tag.delete",
        tenant=repo.tenant,
        target=tag,
        details={"repository": repo.full_name, "tag": tag.name, "digest": tag.manifest.digest},
    )
    tag.delete()


@transaction.atomic
def set_public(repo: Repository, public: bool, *, actor: Actor) -> Repository:
    Repository.objects.filter(pk=repo.pk).update(public=public)
    repo.public = public
    record(
        actor,
        "registry.repository.visibility",
        tenant=repo.tenant,
        target=repo,
        details={"public": public},
    )
    return repo


@transaction.atomic
def set_retention(
    repo: Repository,
    *,
    keep_last_tags: int | None,
    delete_untagged_after_days: int | None,
    actor: Actor,
) -> RetentionPolicy:
    for field, value in (
        ("keep_last_tags", keep_last_tags),
        ("delete_untagged_after_days", delete_untagged_after_days),
    ):
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (1 if field == "keep_last_tags" else 0)
        ):
            raise InvalidInput(
                f"{field} must be a positive integer or null", details={"field": field}
            )
    policy, _ = RetentionPolicy.objects.update_or_create(
        repository=repo,
        defaults={
            "keep_last_tags": keep_last_tags,
            "delete_untagged_after_days": delete_untagged_after_days,
        },
    )
    record(
        actor,
        "registry.retention.set",
        tenant=repo.tenant,
        target=repo,
        details={
            "keep_last_tags": keep_last_tags,
            "delete_untagged_after_days": delete_untagged_after_days,
        },
    )
    return policy


def apply_retention(
    repo: Repository, *, actor: Actor, now: datetime | None = None
) -> dict[str, list[str]]:
    """Apply the repository's policy: drop tags beyond the newest N, then delete manifests
    untagged for longer than D days. Returns what was removed."""
    now = now or timezone.now()
    removed: dict[str, list[str]] = {"tags": [], "manifests": []}
    policy = RetentionPolicy.objects.filter(repository=repo).first()
    if policy is None:
        return removed
    if policy.keep_last_tags:
        stale = list(
            Tag.objects.filter(repository=repo).order_by("-updated_at", "-id")[
                policy.keep_last_tags :
            ]
        )
        for tag in stale:
            delete_tag(tag, actor=actor)
            removed["tags"].append(tag.name)
    if policy.delete_untagged_after_days is not None:
        cutoff = now - timedelta(days=policy.delete_untagged_after_days)
        untagged = Manifest.objects.filter(repository=repo, tags__isnull=True)
        # "Untagged since": a manifest's last tag may have moved on after it was pushed;
        # the push time is the conservative bound we know.
        in_use = digests_in_use(repo)
        for manifest in untagged.filter(pushed_at__lte=cutoff):
            if _is_index_child(manifest) or manifest.digest in in_use:
                continue
            delete_manifest(manifest, actor=actor)
            removed["manifests"].append(manifest.digest)
    RetentionPolicy.objects.filter(pk=policy.pk).update(last_applied_at=now)
    return removed


def digests_in_use(repo: Repository) -> set[str]:
    """Digests of ``repo`` that the tenant's workloads run by digest and may need again.

    A service or job deployed from a build's tag runs ``<host>/<repo>@sha256:…``
    (``workloads.services.builds.resolve_image``); a later build moves the tag on, which
    leaves that manifest untagged while replicas still start from it (scale-ups,
    reschedules, restarts) and a roll-back may return to it. Retention must not delete it.
    """
    from workloads.models import BatchJob, Container, Deployment, Service

    prefix = f"{settings.BERTH_REGISTRY_HOST}/{repo.full_name}@"
    found: set[str] = set()

    def note(references: Iterable[str]) -> None:
        for reference in references:
            if reference and reference.startswith(prefix):
                found.add(reference[len(prefix) :])

    tenant = repo.tenant_id
    # Each live service: what it names, what that resolved to, and what its latest
    # deployment would roll back to.
    rollback = Subquery(
        Deployment.objects.filter(service=OuterRef("pk"))
        .order_by("-generation")
        .values("previous_spec")[:1],
        output_field=JSONField(),
    )
    services = (
        Service.objects.filter(tenant_id=tenant)
        .exclude(state="deleted")
        .annotate(rollback=rollback)
        .values_list("image", "resolved_image", "rollback")
    )
    for image, resolved, previous in services:
        if isinstance(previous, str):  # SQLite hands a subquery's JSON back as text
            try:
                previous = json.loads(previous)
            except ValueError:
                previous = None
        if isinstance(previous, dict):
            previous = previous.get("resolved_image") or previous.get("image")
        note([image, resolved, previous if isinstance(previous, str) else ""])
    unfinished = BatchJob.objects.filter(tenant_id=tenant, state__in=["queued", "running"])
    for references in unfinished.values_list("image", "resolved_image"):
        note(references)
    note(
        Container.objects.filter(tenant_id=tenant, spec__image__startswith=prefix)
        .exclude(state__in=["removed", "lost"])
        .values_list("spec__image", flat=True)
    )
    return found


def _is_index_child(manifest: Manifest) -> bool:
    """Platform manifests of a still-present index are not 'untagged images'."""
    return (
        Manifest.objects.filter(repository=manifest.repository, blobs__digest=manifest.digest)
        .exclude(pk=manifest.pk)
        .exists()
    )


def apply_all_retention(*, actor: Actor) -> dict[str, dict[str, list[str]]]:
    results = {}
    for policy in RetentionPolicy.objects.select_related("repository__tenant"):
        results[policy.repository.full_name] = apply_retention(policy.repository, actor=actor)
    return results


_GC_MARKED = re.compile(r"(\d+) blobs marked, (\d+) blobs and (\d+) manifests eligible")


def run_garbage_collection(*, dry_run: bool = False, actor: Actor) -> GarbageCollectionRun:
    """Run ``docker-registry garbage-collect`` on the registry's storage and record it.

    Deletes blobs no manifest references (then recounts every tenant's storage: blobs
    without a manifest count until collected). Untagged manifests are left to retention
    policies (no ``--delete-untagged``), so pinned digests keep working. distribution
    recommends running GC while the registry is read-only: a blob uploaded during the
    run but not yet referenced by a manifest could be collected.
    """
    run = GarbageCollectionRun.objects.create(dry_run=dry_run)
    before = _tree_bytes(storage_root())
    command = ["docker-registry", "garbage-collect"]
    if dry_run:
        command.append("--dry-run")
    command.append(str(registry_dir() / "config.yml"))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
        output = (done.stdout + done.stderr)[-20000:]
        run.succeeded = done.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        output = str(exc)
        run.succeeded = False
    match = _GC_MARKED.search(output)
    if match:
        run.blobs_marked, run.blobs_eligible, run.manifests_eligible = map(int, match.groups())
    run.bytes_freed = max(0, before - _tree_bytes(storage_root())) if not dry_run else 0
    run.output = output
    run.finished_at = timezone.now()
    run.save()
    if run.succeeded and not dry_run:
        scan_all_storage()  # what GC freed stops counting now, not at the next scan
    record(
        actor,
        "registry.gc",
        tenant=None,
        target=run,
        details={"dry_run": dry_run, "succeeded": run.succeeded, "bytes_freed": run.bytes_freed},
    )
    return run


def _tree_bytes(root: Path) -> int:
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def find_repository(tenant: Tenant, name: str) -> Repository:
    repo = Repository.objects.filter(tenant=tenant, name=name).first()
    if repo is None:
        raise NotFound(f"no repository {tenant.slug}/{name}")
    return repo
