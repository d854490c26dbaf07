"""Platform admins' view of the registry: repositories (visibility, retention), manifests,
tags, storage use per tenant, node credentials, events, and garbage-collection runs."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from registry import services
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
from tenants.services import Actor


def _actor(request: HttpRequest) -> Actor:
    return Actor(user=request.user, ip=request.META.get("REMOTE_ADDR"))  # type: ignore[arg-type]


class TagInline(admin.TabularInline):
    model = Tag
    extra = 0
    fields = ("name", "manifest", "updated_at")
    readonly_fields = ("name", "manifest", "updated_at")
    can_delete = False


class RetentionInline(admin.StackedInline):
    model = RetentionPolicy
    extra = 0


@admin.register(Repository)
class RepositoryAdmin(admin.ModelAdmin):
    list_display = ["__str__", "public", "created_at", "last_pushed_at"]
    list_filter = ["public"]
    search_fields = ["name", "tenant__slug"]
    readonly_fields = ["tenant", "name", "created_at", "last_pushed_at"]
    inlines = [RetentionInline, TagInline]
    actions = ["apply_retention"]

    @admin.action(description="Apply retention policy now")
    def apply_retention(self, request: HttpRequest, queryset: QuerySet[Repository]) -> None:
        for repo in queryset:
            removed = services.apply_retention(repo, actor=_actor(request))
            self.message_user(request, f"{repo}: removed {removed}")


@admin.register(Manifest)
class ManifestAdmin(admin.ModelAdmin):
    list_display = ["repository", "digest", "media_type", "total_size", "pushed_at"]
    search_fields = ["digest", "repository__name", "repository__tenant__slug"]
    readonly_fields = ["repository", "digest", "media_type", "size", "total_size", "pushed_at"]
    exclude = ["blobs"]
    actions = ["delete_from_registry"]

    @admin.action(description="Delete from the registry")
    def delete_from_registry(self, request: HttpRequest, queryset: QuerySet[Manifest]) -> None:
        for manifest in queryset.select_related("repository__tenant"):
            services.delete_manifest(manifest, actor=_actor(request))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(Tag)
class TagAdmin(admin.ModelAdmin):
    list_display = ["__str__", "manifest", "updated_at"]
    search_fields = ["name", "repository__name", "repository__tenant__slug"]
    readonly_fields = ["repository", "name", "manifest", "updated_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(RegistryUsage)
class RegistryUsageAdmin(admin.ModelAdmin):
    list_display = ["tenant", "bytes_used", "reserved_gib", "quota_refusal", "updated_at"]
    readonly_fields = [
        "tenant",
        "bytes_used",
        "upload_bytes",
        "reserved_gib",
        "reservation",
        "quota_refusal",
        "scanned_at",
        "updated_at",
    ]
    actions = ["recount"]

    @admin.action(description="Recount storage (scan the registry's storage)")
    def recount(self, request: HttpRequest, queryset: QuerySet[RegistryUsage]) -> None:
        for usage in queryset.select_related("tenant"):
            services.scan_tenant_storage(usage.tenant)


@admin.register(NodeCredential)
class NodeCredentialAdmin(admin.ModelAdmin):
    list_display = ["__str__", "created_at", "revoked_at", "last_used_at"]
    readonly_fields = ["node_name", "secret_hash", "created_at", "revoked_at", "last_used_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(RegistryEvent)
class RegistryEventAdmin(admin.ModelAdmin):
    list_display = ["received_at", "action", "repository", "tag", "digest", "error", "outcome"]
    list_filter = ["error", "action"]
    search_fields = ["repository", "digest", "event_id"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Blob)
class BlobAdmin(admin.ModelAdmin):
    list_display = ["tenant", "digest", "size", "media_type"]
    search_fields = ["digest", "tenant__slug"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(GarbageCollectionRun)
class GarbageCollectionRunAdmin(admin.ModelAdmin):
    list_display = ["started_at", "dry_run", "succeeded", "blobs_eligible", "bytes_freed"]
    readonly_fields = [f.name for f in GarbageCollectionRun._meta.fields]
    actions = ["run_now"]

    @admin.action(description="Run garbage collection now (select any row)")
    def run_now(self, request: HttpRequest, queryset: QuerySet[GarbageCollectionRun]) -> None:
        run = services.run_garbage_collection(actor=_actor(request))
        level = messages.SUCCESS if run.succeeded else messages.ERROR
        self.message_user(request, f"GC finished: freed {run.bytes_freed} bytes", level)
