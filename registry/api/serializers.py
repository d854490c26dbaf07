"""Serializers of the registry API (output shapes and validated inputs)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from registry.models import GarbageCollectionRun, Manifest, Repository, RetentionPolicy, Tag
from tenants.api.serializers import StrictSerializer


class TagSerializer(serializers.ModelSerializer):
    digest = serializers.CharField(source="manifest.digest")
    media_type = serializers.CharField(source="manifest.media_type")
    size = serializers.IntegerField(source="manifest.total_size")

    class Meta:
        model = Tag
        fields = ["name", "digest", "media_type", "size", "updated_at"]


class ManifestSerializer(serializers.ModelSerializer):
    tags = serializers.SerializerMethodField()

    class Meta:
        model = Manifest
        fields = ["digest", "media_type", "size", "total_size", "tags", "pushed_at"]

    def get_tags(self, manifest: Manifest) -> list[str]:
        return sorted(t.name for t in manifest.tags.all())


class RetentionSerializer(serializers.ModelSerializer):
    class Meta:
        model = RetentionPolicy
        fields = ["keep_last_tags", "delete_untagged_after_days", "last_applied_at"]
        read_only_fields = ["last_applied_at"]


class RetentionUpdateSerializer(StrictSerializer):
    keep_last_tags = serializers.IntegerField(min_value=1, allow_null=True, required=True)
    delete_untagged_after_days = serializers.IntegerField(
        min_value=0, allow_null=True, required=True
    )


class RepositorySerializer(serializers.ModelSerializer):
    full_name = serializers.CharField(read_only=True)
    pull_name = serializers.SerializerMethodField()
    tags = TagSerializer(many=True, read_only=True)
    retention = serializers.SerializerMethodField()

    class Meta:
        model = Repository
        fields = [
            "id",
            "name",
            "full_name",
            "pull_name",
            "public",
            "created_at",
            "last_pushed_at",
            "tags",
            "retention",
        ]

    def get_pull_name(self, repo: Repository) -> str:
        return f"{settings.BERTH_REGISTRY_HOST}/{repo.full_name}"

    def get_retention(self, repo: Repository) -> dict[str, Any] | None:
        policy = RetentionPolicy.objects.filter(repository=repo).first()
        return RetentionSerializer(policy).data if policy else None


class RepositoryUpdateSerializer(StrictSerializer):
    public = serializers.BooleanField()


class UsageSerializer(serializers.Serializer):
    bytes_used = serializers.IntegerField(
        help_text="Registry bytes: blobs referenced or left without a manifest, unfinished "
        "uploads (each blob once, at its stored size)."
    )
    storage_limit_bytes = serializers.IntegerField()
    storage_used_bytes = serializers.IntegerField()
    repositories = serializers.IntegerField()
    quota_refusal = serializers.CharField(
        help_text="Why the last push was refused for the storage quota; empty when it fit."
    )


class GarbageCollectionRunSerializer(serializers.ModelSerializer):
    class Meta:
        model = GarbageCollectionRun
        fields = [
            "id",
            "started_at",
            "finished_at",
            "dry_run",
            "succeeded",
            "blobs_marked",
            "blobs_eligible",
            "manifests_eligible",
            "bytes_freed",
            "output",
        ]


class GarbageCollectionRequestSerializer(StrictSerializer):
    dry_run = serializers.BooleanField(default=False)
