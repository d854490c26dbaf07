"""The browsable API documentation page (Swagger UI over /api/v1/schema/)."""

from __future__ import annotations

from drf_spectacular.views import SpectacularSwaggerView


class APIDocsView(SpectacularSwaggerView):
    """GET/HEAD only: the HTML renderer cannot answer OPTIONS (drf-spectacular's own view
    crashes with a 500 on it)."""

    http_method_names = ["get", "head"]
