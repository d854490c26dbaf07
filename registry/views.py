"""The registry's two HTTP endpoints on the control plane (plain Django views: they speak
the registry protocols, not Berth's API format).

``GET /registry/token``   docker's token endpoint: Basic credentials, ``service`` and
                           ``scope`` parameters → a signed bearer token (also the OAuth2
                           password-grant POST containerd tries first).
``POST /registry/events/`` the registry's notifications, authenticated with the shared
                           secret from ``notify.secret``.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from registry import services
from registry.errors import RegistryAuthError, RegistryDenied

log = logging.getLogger(__name__)

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"


def _error(status: int, code: str, message: str) -> JsonResponse:
    """An error in the distribution format, which docker/skopeo print."""
    response = JsonResponse(
        {"errors": [{"code": code, "message": message, "detail": None}]}, status=status
    )
    if status == 401:
        response["WWW-Authenticate"] = 'Basic realm="berth-registry"'
    return response


@csrf_exempt
@require_http_methods(["GET", "POST"])
def token(request: HttpRequest) -> HttpResponse:
    """Issue a registry token for the requested scopes.

    docker, skopeo and podman use GET with Basic auth and ``service``/``scope`` query
    parameters; containerd first tries the OAuth2 form (POST ``grant_type=password`` with
    ``username``, ``password``, space-separated ``scope``), which is answered the same way.
    """
    if request.method == "POST":
        params = request.POST
        if params.get("grant_type") != "password":
            return _error(400, "UNSUPPORTED", "only grant_type=password is supported")
        credentials: tuple[str, str] | None = (
            params.get("username", ""),
            params.get("password", ""),
        )
        scopes = params.get("scope", "").split()
    else:
        params = request.GET
        credentials = None
        scopes = params.getlist("scope")
    service = params.get("service", "")
    if service and service != settings.BERTH_REGISTRY_SERVICE:
        return _error(400, "INVALID_REQUEST", f"unknown service {service!r}")
    try:
        if credentials is None:
            credentials = services.parse_basic_auth(request.META.get("HTTP_AUTHORIZATION", ""))
        principal = services.authenticate(credentials, ip=request.META.get("REMOTE_ADDR"))
        issued = services.token_for(principal, scopes)
    except RegistryAuthError as exc:
        return _error(401, "UNAUTHORIZED", exc.message)
    except RegistryDenied as exc:
        return _error(403, "DENIED", exc.message)
    return JsonResponse(
        {
            "token": issued.token,
            "access_token": issued.token,
            "expires_in": issued.expires_in,
            "issued_at": issued.issued_at,
        }
    )


@csrf_exempt
@require_http_methods(["POST"])
def events(request: HttpRequest) -> HttpResponse:
    """Record the registry's notifications; each event once however often it is sent.

    Only a wrong secret is refused (401). An authenticated delivery is always answered
    200, whatever it holds and whatever recording made of it: distribution redelivers a
    refused one forever and queues every later event of every tenant behind it. What
    could not be recorded is kept with an error outcome and logged at error level
    (``services.record_delivery``).
    """
    if not services.check_notification_auth(request.META.get("HTTP_AUTHORIZATION", "")):
        return JsonResponse({"error": "bad notification secret"}, status=401)
    content_type = request.content_type or ""
    if content_type not in (EVENTS_MEDIA_TYPE, "application/json"):
        log.error("registry notification with media type %.100s, read as JSON", content_type)
    return JsonResponse(services.record_delivery(request.body))
