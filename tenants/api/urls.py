"""Routes of the tenants API, mounted at /api/v1/ by config/urls.py.

Tenant-owned collections hang under ``tenants/<tenant_slug>/``; other apps mount their own
routers at the same prefix (``path("api/v1/tenants/<str:tenant_slug>/", include(...))``).
"""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from tenants.api import views

tenant_router = SimpleRouter()
tenant_router.register("members", views.MembershipViewSet, basename="member")
tenant_router.register("invitations", views.InvitationViewSet, basename="invitation")
tenant_router.register("tokens", views.APITokenViewSet, basename="token")
tenant_router.register("audit-log", views.TenantAuditLogViewSet, basename="tenant-audit-log")

platform_router = SimpleRouter()
platform_router.register("audit-log", views.PlatformAuditLogViewSet, basename="audit-log")

urlpatterns = [
    path("me/", views.MeView.as_view(), name="me"),
    path("tenants/", views.TenantListView.as_view(), name="tenant-list"),
    path("tenants/<str:tenant_slug>/", views.TenantDetailView.as_view(), name="tenant-detail"),
    path("tenants/<str:tenant_slug>/quotas/", views.QuotaView.as_view(), name="tenant-quotas"),
    path("tenants/<str:tenant_slug>/", include(tenant_router.urls)),
    path("invitations/accept/", views.InvitationAcceptView.as_view(), name="invitation-accept"),
    path("", include(platform_router.urls)),
]
