"""Routes of the workloads API (tenant-scoped ones are mounted under tenants/<slug>/)."""

from __future__ import annotations

from rest_framework.routers import SimpleRouter

from workloads.api import views

tenant_router = SimpleRouter()
tenant_router.register("services", views.ServiceViewSet, basename="service")
tenant_router.register("jobs", views.JobViewSet, basename="job")

platform_router = SimpleRouter()
platform_router.register("nodes", views.NodeViewSet, basename="node")

tenant_urlpatterns = tenant_router.urls
platform_urlpatterns = platform_router.urls
