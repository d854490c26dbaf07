"""Root URLconf.

Apps add their API routes here: tenant-owned resources under
``api/v1/tenants/<str:tenant_slug>/`` with views based on
``tenants.api.views.TenantScopedViewSet`` (docs/control-plane.md).
"""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from tenants.api.docs import APIDocsView
from workloads.api import urls as workloads_urls

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("tenants.api.urls")),
    path("api/v1/tenants/<str:tenant_slug>/billing/", include("billing.api.urls")),
    path("billing/", include("billing.urls")),
    path("api/v1/tenants/<str:tenant_slug>/", include(workloads_urls.tenant_urlpatterns)),
    path("api/v1/", include(workloads_urls.platform_urlpatterns)),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/v1/docs/", APIDocsView.as_view(url_name="schema"), name="api-docs"),
    path("api-auth/", include("rest_framework.urls")),
    path("registry/", include("registry.urls")),
    path("api/v1/tenants/<str:tenant_slug>/registry/", include("registry.api.urls")),
    path("api/v1/registry/", include("registry.api.platform_urls")),
    path("", include("dashboard.urls")),
]

handler400 = "tenants.api.errors.json_400"
handler404 = "tenants.api.errors.json_404"
handler500 = "tenants.api.errors.json_500"
