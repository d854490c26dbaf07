"""What the control plane knows about the registry's contents, and how it is governed.

Rows are written from the registry's notifications (``registry.events``), never from
what clients claim: a repository, manifest or tag exists here once the registry said it
stored it. ``Blob`` rows (config and layer blobs, and manifests themselves) per tenant
are what storage accounting sums, each digest once per tenant however many manifests or
repositories share it.
"""

from __future__ import annotations

from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from tenants.models import TenantScopedQuerySet


class RepositoryQuerySet(TenantScopedQuerySet):
    pass


class Repository(models.Model):
    """``<tenant-slug>/<name>`` in the registry; ``public`` allows anonymous pulls."""

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="registry_repositories"
    )
    name = models.CharField(max_length=200, help_text="Path under the tenant, e.g. 'web'.")
    public = models.BooleanField(default=False, help_text="Anyone may pull without a token.")
    created_at = models.DateTimeField(default=timezone.now)
    last_pushed_at = models.DateTimeField(null=True, blank=True)

    objects = RepositoryQuerySet.as_manager()

    class Meta:
        ordering = ["tenant_id", "name"]
        verbose_name_plural = "repositories"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="registry_repo_unique"),
        ]

    def __str__(self) -> str:
        return self.full_name

    @property
    def full_name(self) -> str:
        return f"{self.tenant.slug}/{self.name}"


class Blob(models.Model):
    """A blob the tenant holds in the registry, counted once per tenant.

    ``size`` is what the registry stores (a HEAD of the blob, or its file), never what a
    manifest claims. A row is created when a manifest referencing the blob is recorded,
    or by the storage scan (``registry.services.scan_tenant_storage``) when the blob sits
    in one of the tenant's repositories with no manifest referencing it: ``orphaned_at``
    then says since when it has been counted as such (until GC frees it).
    """

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="registry_blobs"
    )
    digest = models.CharField(max_length=71)
    size = models.BigIntegerField(validators=[MinValueValidator(0)])
    media_type = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    orphaned_at = models.DateTimeField(
        null=True, blank=True, help_text="Found in storage with no manifest referencing it."
    )

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "digest"], name="registry_blob_unique"),
            models.CheckConstraint(
                condition=models.Q(size__gte=0), name="registry_blob_size_not_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.digest[:19]} ({self.size} B)"


class ManifestQuerySet(TenantScopedQuerySet):
    tenant_field = "repository__tenant"


class Manifest(models.Model):
    """A manifest (image or index) stored in a repository."""

    repository = models.ForeignKey(Repository, on_delete=models.CASCADE, related_name="manifests")
    digest = models.CharField(max_length=71)
    media_type = models.CharField(max_length=255)
    size = models.BigIntegerField(help_text="Bytes of the manifest itself.")
    total_size = models.BigIntegerField(
        help_text="Manifest plus every blob it references (config, layers, child manifests)."
    )
    blobs = models.ManyToManyField(Blob, related_name="manifests", blank=True)
    pushed_at = models.DateTimeField(default=timezone.now)

    objects = ManifestQuerySet.as_manager()

    class Meta:
        ordering = ["-pushed_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["repository", "digest"], name="registry_manifest_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest}"


class Tag(models.Model):
    """A tag of a repository, pointing at one of its manifests."""

    repository = models.ForeignKey(Repository, on_delete=models.CASCADE, related_name="tags")
    name = models.CharField(max_length=128)
    manifest = models.ForeignKey(Manifest, on_delete=models.CASCADE, related_name="tags")
    updated_at = models.DateTimeField(default=timezone.now)

    objects = ManifestQuerySet.as_manager()

    class Meta:
        ordering = ["-updated_at", "name"]
        constraints = [
            models.UniqueConstraint(fields=["repository", "name"], name="registry_tag_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.repository}:{self.name}"


class RetentionPolicy(models.Model):
    """Per repository: keep the newest ``keep_last_tags`` tags; delete manifests left
    without any tag for ``delete_untagged_after_days`` days. Empty fields disable a rule."""

    repository = models.OneToOneField(
        Repository, on_delete=models.CASCADE, related_name="retention"
    )
    keep_last_tags = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    delete_untagged_after_days = models.PositiveIntegerField(null=True, blank=True)
    last_applied_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "retention policies"

    def __str__(self) -> str:
        days = self.delete_untagged_after_days
        untagged = "kept" if days is None else f"deleted after {days} d"
        return f"{self.repository}: keep {self.keep_last_tags or 'all'} tags, untagged {untagged}"


class RegistryEvent(models.Model):
    """One notification from the registry, stored once by its id (redelivery is a no-op).

    ``error`` marks an event whose recording failed or whose push was refused (a size a
    manifest lied about, a suspended tenant, the storage quota): the delivery was still
    acknowledged, so one tenant's push can never stall the registry's queue of events.
    """

    event_id = models.CharField(max_length=100, unique=True)
    action = models.CharField(max_length=16)
    repository = models.CharField(max_length=255)
    digest = models.CharField(max_length=71, blank=True)
    tag = models.CharField(max_length=128, blank=True)
    media_type = models.CharField(max_length=255, blank=True)
    size = models.BigIntegerField(null=True, blank=True)
    actor = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=500, blank=True, help_text="What recording did.")
    error = models.BooleanField(default=False, help_text="Recording failed or refused the push.")
    occurred_at = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.action} {self.repository} {self.tag or self.digest[:19]}"


class NodeCredential(models.Model):
    """A node's registry login: ``node-<node_name>`` / a ``brn_`` secret (only its hash kept).

    It pulls what anyone may (public repositories) and nothing else: a node pulls a
    tenant's image with a token minted for that tenant
    (:func:`registry.services.tenant_pull_token`). A joined node's credential is keyed by
    its id (``node_id``, the ``workloads.Node``), so another node can never take it over
    by name; the operator mints credentials of nodes that never joined by name
    (``node_id`` empty). :func:`registry.services.create_node_credential` creates or
    rotates one and hands the secret to the agent (``berth-agent login``).
    """

    node_id = models.UUIDField(null=True, blank=True, unique=True)
    node_name = models.CharField(max_length=100, unique=True)
    secret_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["node_name"]

    def __str__(self) -> str:
        return f"node-{self.node_name}"


class RegistryUsage(models.Model):
    """Registry bytes of one tenant and the storage quota reservation that covers them."""

    tenant = models.OneToOneField(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="registry_usage"
    )
    bytes_used = models.BigIntegerField(default=0)
    reserved_gib = models.BigIntegerField(default=0)
    reservation = models.ForeignKey(
        "tenants.QuotaReservation", null=True, blank=True, on_delete=models.SET_NULL
    )
    upload_bytes = models.BigIntegerField(
        default=0, help_text="Unfinished uploads in the tenant's repositories (storage scan)."
    )
    quota_refusal = models.CharField(
        max_length=500,
        blank=True,
        help_text="Why the last recount could not hold the bytes in storage_gib (over "
        "quota, suspended): the manifest push that got there was refused.",
    )
    scanned_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.tenant}: {self.bytes_used} B"


class GarbageCollectionRun(models.Model):
    """One ``docker-registry garbage-collect`` run and what it reported."""

    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    dry_run = models.BooleanField(default=False)
    succeeded = models.BooleanField(default=False)
    blobs_marked = models.IntegerField(null=True, blank=True)
    blobs_eligible = models.IntegerField(null=True, blank=True)
    manifests_eligible = models.IntegerField(null=True, blank=True)
    bytes_freed = models.BigIntegerField(null=True, blank=True)
    output = models.TextField(blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"GC {self.started_at:%Y-%m-%d %H:%M} {'ok' if self.succeeded else 'failed'}"
