"""Routes of the workloads API (tenant-scoped ones are mounted under tenants/<slug>/)."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from workloads.api import node_pulls, storage_builds, views
from workloads.api.node_reports import BuildReportView, ContainerSecretsView, NodeReportView

tenant_router = SimpleRouter()
tenant_router.register("services", views.ServiceViewSet, basename="service")
tenant_router.register("jobs", views.JobViewSet, basename="job")
tenant_router.register("volumes", storage_builds.VolumeViewSet, basename="volume")
tenant_router.register("networks", storage_builds.NetworkViewSet, basename="network")
tenant_router.register("builds", storage_builds.BuildViewSet, basename="build")

platform_router = SimpleRouter()
platform_router.register("nodes", views.NodeViewSet, basename="node")

tenant_urlpatterns = tenant_router.urls
platform_urlpatterns = [
    path(
        "nodes/builds/<uuid:build_id>/context/",
        storage_builds.BuildContextView.as_view(),
        name="build-context",
    ),
    path(
        "nodes/builds/<uuid:build_id>/push-token/",
        storage_builds.BuildPushTokenView.as_view(),
        name="build-push-token",
    ),
    path("nodes/pull-token/", node_pulls.NodePullTokenView.as_view(), name="pull-token"),
    path("nodes/report/", NodeReportView.as_view(), name="node-report"),
    path("nodes/builds/<uuid:build_id>/report/", BuildReportView.as_view(), name="build-report"),
    path(
        "nodes/containers/<uuid:container_id>/secrets/",
        ContainerSecretsView.as_view(),
        name="container-secrets",
    ),
    *platform_router.urls,
]
