"""Django-level API errors in the API's error format, whatever DEBUG says.

URLs under /api/ that match no route never reach DRF, and with DEBUG on Django would answer
with its HTML debug page; API clients should always get
``{"error": {"code": "not_found", …}}``.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework.response import Response

from tenants.api.errors import error_body


class APINotFoundMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (
            response.status_code == 404
            and request.path.startswith("/api/")
            and not isinstance(response, Response)
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            return JsonResponse(error_body("not_found", "Not found."), status=404)
        return response
