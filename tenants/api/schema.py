"""OpenAPI generation: every operation documents the shared error body."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse

from tenants.api.errors import ErrorSerializer

_ERRORS = {
    "400": "Malformed JSON, unknown or invalid fields (code invalid / malformed_request).",
    "401": "Missing, unknown, expired or revoked credentials.",
    "403": "Role or token scope does not allow this, or the tenant is suspended.",
    "404": "No such object in this tenant (other tenants' objects are 404 too).",
    "409": "Conflict: quota_exceeded (details: quota, limit, used, requested), "
    "seat_limit_reached, last_owner, already_member.",
    "413": "Request body too large.",
    "429": "Rate limited (details.retry_after, Retry-After header).",
}


class BerthAutoSchema(AutoSchema):
    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        for code, description in _ERRORS.items():
            if code not in responses:
                responses[code] = self._get_response_for_code(
                    OpenApiResponse(response=ErrorSerializer, description=description), code
                )
        return responses


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Documents :class:`~tenants.api.authentication.BearerTokenAuthentication`."""

    target_class = "tenants.api.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "brt_xxxxxxxx_<secret> (API token)",
        }
