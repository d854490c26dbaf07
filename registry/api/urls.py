"""Tenant registry routes, mounted at /api/v1/tenants/<tenant_slug>/registry/."""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from registry.api import views

router = SimpleRouter()
router.register("repositories", views.RepositoryViewSet, basename="registry-repository")

urlpatterns = [
    path("usage/", views.UsageView.as_view(), name="registry-usage"),
    path("", include(router.urls)),
]
