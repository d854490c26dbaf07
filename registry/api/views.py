"""Registry API: a tenant's repositories, tags, manifests, sizes, visibility, retention;
and the platform admins' garbage-collection runs."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from registry import services
from registry.api.serializers import (
    GarbageCollectionRequestSerializer,
    GarbageCollectionRunSerializer,
    ManifestSerializer,
    RepositorySerializer,
    RepositoryUpdateSerializer,
    RetentionSerializer,
    RetentionUpdateSerializer,
    TagSerializer,
    UsageSerializer,
)
from registry.models import GarbageCollectionRun, Manifest, RegistryUsage, Repository, Tag
from tenants import permissions as perms
from tenants.api.permissions import PlatformAdminOnly
from tenants.api.views import TenantScopedAPIView, TenantScopedViewSet
from tenants.errors import NotFound
from tenants.services import Actor


class RepositoryViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """``/api/v1/tenants/<slug>/registry/repositories/``: list, show, make public/private,
    tags and manifests with digests and sizes, deletes, retention policy."""

    queryset = Repository.objects.select_related("tenant").prefetch_related("tags__manifest")
    serializer_class = RepositorySerializer
    read_permission = perms.WORKLOADS_VIEW
    write_permission = perms.WORKLOADS_MANAGE

    def get_queryset(self) -> QuerySet[Any]:
        queryset = super().get_queryset()
        name = self.request.query_params.get("name")
        return queryset.filter(name=name) if name else queryset

    @extend_schema(request=RepositoryUpdateSerializer, responses=RepositorySerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        repo = self.get_object()
        body = RepositoryUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        services.set_public(repo, body.validated_data["public"], actor=self.actor)
        return Response(RepositorySerializer(repo).data)

    @extend_schema(responses=TagSerializer(many=True))
    @action(detail=True, methods=["get"], pagination_class=None)
    def tags(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        repo = self.get_object()
        tags = Tag.objects.filter(repository=repo).select_related("manifest")
        return Response(TagSerializer(tags, many=True).data)

    @extend_schema(request=None, responses={204: None})
    @action(detail=True, methods=["delete"], url_path=r"tags/(?P<tag>[\w][\w.-]{0,127})")
    def delete_tag(self, request: Request, tag: str, *args: Any, **kwargs: Any) -> Response:
        repo = self.get_object()
        row = Tag.objects.filter(repository=repo, name=tag).select_related("manifest").first()
        if row is None:
            raise NotFound(f"no tag {repo.full_name}:{tag}")
        services.delete_tag(row, actor=self.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(responses=ManifestSerializer(many=True))
    @action(detail=True, methods=["get"], pagination_class=None)
    def manifests(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        repo = self.get_object()
        manifests = Manifest.objects.filter(repository=repo).prefetch_related("tags")
        return Response(ManifestSerializer(manifests, many=True).data)

    @extend_schema(request=None, responses={204: None})
    @action(detail=True, methods=["delete"], url_path=r"manifests/(?P<digest>sha256:[a-f0-9]{64})")
    def delete_manifest(self, request: Request, digest: str, *args: Any, **kwargs: Any) -> Response:
        repo = self.get_object()
        manifest = Manifest.objects.filter(repository=repo, digest=digest).first()
        if manifest is None:
            raise NotFound(f"no manifest {repo.full_name}@{digest}")
        services.delete_manifest(manifest, actor=self.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=RetentionUpdateSerializer, responses=RetentionSerializer)
    @action(detail=True, methods=["put"])
    def retention(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        repo = self.get_object()
        body = RetentionUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        policy = services.set_retention(repo, actor=self.actor, **body.validated_data)
        return Response(RetentionSerializer(policy).data)

    @extend_schema(request=None, responses=dict)
    @action(detail=True, methods=["post"], url_path="retention/apply")
    def apply_retention(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        repo = self.get_object()
        return Response(services.apply_retention(repo, actor=self.actor))


class UsageView(TenantScopedAPIView):
    """Registry bytes of the tenant and its storage quota."""

    queryset = Repository.objects.all()
    serializer_class = UsageSerializer
    pagination_class = None
    read_permission = perms.WORKLOADS_VIEW

    def get(self, request: Request, tenant_slug: str) -> Response:
        limit, used = services.storage_limit_and_use(self.tenant)
        usage = RegistryUsage.objects.filter(tenant=self.tenant).first()
        data = {
            "bytes_used": services.registry_bytes(self.tenant)
            + (usage.upload_bytes if usage else 0),
            "storage_limit_bytes": limit,
            "storage_used_bytes": used,
            "repositories": Repository.objects.for_tenant(self.tenant).count(),
            "quota_refusal": usage.quota_refusal if usage else "",
        }
        return Response(UsageSerializer(data).data)


class GarbageCollectionView(GenericAPIView):
    """``/api/v1/registry/gc/``: platform admins list runs and start one."""

    permission_classes = [PlatformAdminOnly]
    serializer_class = GarbageCollectionRunSerializer
    queryset = GarbageCollectionRun.objects.all()

    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    @extend_schema(request=GarbageCollectionRequestSerializer)
    def post(self, request: Request) -> Response:
        body = GarbageCollectionRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        run = services.run_garbage_collection(
            dry_run=body.validated_data["dry_run"], actor=Actor.from_request(request)
        )
        return Response(GarbageCollectionRunSerializer(run).data, status=status.HTTP_201_CREATED)
