"""Platform-wide registry routes, mounted at /api/v1/registry/."""

from __future__ import annotations

from django.urls import path

from registry.api import views

urlpatterns = [
    path("gc/", views.GarbageCollectionView.as_view(), name="registry-gc"),
]
