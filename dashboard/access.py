"""Who may see and do what in the dashboard: the same rules as the API.

Every tenant page is reached as ``/t/<slug>/…``. :func:`tenant_page` resolves the tenant
among the signed-in user's memberships only (any other slug, existing or not, is a 404),
then checks the page's permission with :func:`tenants.permissions.has_permission` — the
role table the API uses. Writes are POST-only views with their own permission, so a
viewer who posts to a deploy URL anyway is refused exactly as the API refuses it.

:func:`once` makes a form submission idempotent: every form carries a random ``idem``
token; the first POST with it claims the token in the cache (Redis), a repeat is sent to
where the first one went instead of doing the work twice.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import resolve_url
from django.utils.http import url_has_allowed_host_and_scheme

from tenants.models import Tenant
from tenants.permissions import has_permission
from tenants.services import Actor, role_of

View = Callable[..., HttpResponse]
ONCE_TTL_SECONDS = 24 * 3600


def is_htmx(request: HttpRequest) -> bool:
    return request.headers.get("HX-Request") == "true"


def login_redirect(request: HttpRequest) -> HttpResponse:
    """Send an anonymous (or expired) session to log in and back to where it was.

    An htmx fragment request would otherwise swap the login page into the fragment: it
    gets an ``HX-Redirect`` to the page the browser shows instead.
    """
    login = resolve_url(settings.LOGIN_URL)
    if is_htmx(request):
        current = request.headers.get("HX-Current-URL", "")
        path = current.split("://", 1)[-1].partition("/")[2] if current else ""
        target = f"{login}?{urlencode({'next': '/' + path})}"
        response = HttpResponse(status=401)
        response["HX-Redirect"] = target
        return response
    return HttpResponseRedirect(f"{login}?{urlencode({'next': request.get_full_path()})}")


def signed_in(view: View) -> View:
    """Like ``login_required``, but htmx-aware (see :func:`login_redirect`)."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return login_redirect(request)
        return view(request, *args, **kwargs)

    return wrapper


def tenant_page(permission: str, *, methods: tuple[str, ...] = ("GET",)) -> Callable[[View], View]:
    """Resolve ``slug`` to one of the user's tenants and require ``permission``.

    Sets ``request.tenant``, ``request.role`` and ``request.actor``; the view gets the
    tenant as its first argument after the request.
    """

    def decorator(view: View) -> View:
        @wraps(view)
        def wrapper(request: HttpRequest, slug: str, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                return login_redirect(request)
            if request.method not in methods:
                return HttpResponse(status=405, headers={"Allow": ", ".join(methods)})
            tenant = (
                Tenant.objects.select_related("plan")
                .filter(slug=slug, memberships__user=request.user)
                .first()
            )
            if tenant is None:
                raise Http404("no such organisation")
            role = role_of(tenant, request.user)
            if not has_permission(role, permission):
                from dashboard.views import refused

                return refused(
                    request,
                    PermissionDenied(f"Your role ({role}) does not allow this ({permission})."),
                )
            request.tenant = tenant  # type: ignore[attr-defined]
            request.role = role  # type: ignore[attr-defined]
            request.actor = Actor.from_request(request)  # type: ignore[attr-defined]
            if request.session.get("dashboard_tenant") != tenant.slug:  # no write per poll
                request.session["dashboard_tenant"] = tenant.slug
            return view(request, tenant, *args, **kwargs)

        return wrapper

    return decorator


def new_idem() -> str:
    return secrets.token_urlsafe(16)


def _once_key(request: HttpRequest, token: str) -> str:
    return f"dashboard:once:{request.user.pk}:{token}"


def once(view: View) -> View:
    """Run a POST view at most once per form ``idem`` token (double submits, reloads).

    The view returns a redirect on success (the token remembers where to) or a page with
    errors (the token is freed so the corrected form can be sent again).
    """

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        token = request.POST.get("idem", "")
        if not token or len(token) > 64:
            return view(request, *args, **kwargs)
        key = _once_key(request, token)
        if not cache.add(key, "", ONCE_TTL_SECONDS):
            messages.info(request, "That form was already submitted; it was not sent twice.")
            return HttpResponseRedirect(cache.get(key) or _back(request))
        try:
            response = view(request, *args, **kwargs)
        except BaseException:
            cache.delete(key)
            raise
        if isinstance(response, HttpResponseRedirect):
            cache.set(key, response.url, ONCE_TTL_SECONDS)
        else:
            cache.delete(key)
        return response

    return wrapper


def _back(request: HttpRequest) -> str:
    """Where a repeat of a form still being handled goes: the page the form was on."""
    referer = request.META.get("HTTP_REFERER", "")
    if url_has_allowed_host_and_scheme(
        referer, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return referer
    return "/"


def can(request: HttpRequest, permission: str) -> bool:
    return has_permission(getattr(request, "role", None), permission)
