"""Bearer-token and session authentication for the API.

``Authorization: Bearer brt_xxxxxxxx_…`` authenticates as the token's creator *within the
token's tenant only* (``request.auth`` is the :class:`~tenants.models.APIToken`). Expired,
revoked, or orphaned tokens (creator no longer a member) are refused with 401 and a code
saying which. Browsers use Django sessions (CSRF enforced on writes).
"""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from tenants.models import TOKEN_PREFIX, APIToken, Membership, hash_secret
from tenants.services import touch_token


class TokenRefused(exceptions.AuthenticationFailed):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Any) -> tuple[Any, APIToken] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        parts = header.split()
        if parts[0].lower() != self.keyword.lower():
            return None
        if len(parts) != 2 or not parts[1].startswith(TOKEN_PREFIX):
            raise TokenRefused("invalid_token", "Malformed bearer token.")
        token = (
            APIToken.objects.select_related("user", "tenant")
            .filter(token_hash=hash_secret(parts[1]))
            .first()
        )
        if token is None:
            raise TokenRefused("invalid_token", "Unknown API token.")
        if token.state == "revoked":
            raise TokenRefused("token_revoked", f"API token {token.prefix} was revoked.")
        if token.state == "expired":
            raise TokenRefused("token_expired", f"API token {token.prefix} has expired.")
        if (
            not token.user.is_active
            or not Membership.objects.filter(
                tenant_id=token.tenant_id, user_id=token.user_id
            ).exists()
        ):
            raise TokenRefused(
                "token_orphaned", f"The owner of API token {token.prefix} left the tenant."
            )
        touch_token(token, request.META.get("REMOTE_ADDR") or None)
        return token.user, token

    def authenticate_header(self, request: Any) -> str:
        return f'{self.keyword} realm="api"'


#: Django session login; CSRF checked on unsafe methods. DRF's own class, re-exported so
#: drf-spectacular documents it (it matches authentication classes exactly).
SessionAuthentication = authentication.SessionAuthentication


class PeopleOnly(authentication.BaseAuthentication):
    """For endpoints that act for a person, not a tenant: accepting an invitation, signing
    up, changing a password. An API token is bound to one tenant and to what its scope
    allows; it must not let its holder join another tenant or act as the person, so a
    request that carries one is refused outright (403, code ``token_not_accepted``)
    instead of being treated as the token's user. Put it first in
    ``authentication_classes``, before session auth."""

    def authenticate(self, request: Any) -> None:
        header = authentication.get_authorization_header(request)
        if header:
            raise TokenRefused(
                "token_not_accepted",
                "This endpoint acts for a person: log in (or send no credentials), "
                "API tokens are not accepted here.",
            )
        return None
