"""Failed password sign-ins, counted per account and per client address, lock both out.

Every password sign-in (the dashboard's ``/login/``, ``/admin/login/``, DRF's
``/api-auth/login/``) goes through ``django.contrib.auth.authenticate``, so the guard sits
there, in one place: :class:`LoginThrottleBackend` comes first in
``AUTHENTICATION_BACKENDS`` and refuses (``PermissionDenied``: no later backend is asked,
not even with the right password) while the account or the address is locked; Django's
``user_login_failed`` signal counts each failure. Counters live in Django's cache (Redis,
shared by every web worker) for ``BERTH_LOGIN_LOCKOUT_SECONDS`` from the first failure.

- Per account (``BERTH_LOGIN_FAILURES_PER_ACCOUNT``): one account guessed from many
  addresses. Counted whether the account exists or not, so a lockout says nothing about
  which emails have accounts. A success clears it.
- Per address (``BERTH_LOGIN_FAILURES_PER_ADDRESS``): many accounts guessed from one
  address. A success does not clear it (an attacker's own account would reset it).

If the cache is unreachable, sign-ins go on unthrottled with a warning: an outage of Redis
must not lock every person out.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver
from django.http import HttpRequest

log = logging.getLogger(__name__)
KEY_PREFIX = "berth:login-failures"


def client_address(request: HttpRequest | None) -> str:
    """The peer address (``REMOTE_ADDR``; no proxy header is trusted)."""
    if request is None:
        return ""
    return str(request.META.get("REMOTE_ADDR") or "")


def _account_key(username: str) -> str:
    # Case and spaces folded (emails are matched case-insensitively); hashed so the cache
    # never holds the typed names.
    digest = hashlib.sha256(username.strip().casefold().encode()).hexdigest()
    return f"{KEY_PREFIX}:account:{digest}"


def _address_key(address: str) -> str:
    return f"{KEY_PREFIX}:address:{address}"


def _keys(request: HttpRequest | None, username: str | None) -> dict[str, tuple[str, int]]:
    """The counters a sign-in attempt touches: name → (cache key, limit)."""
    keys: dict[str, tuple[str, int]] = {}
    if username:
        keys["account"] = (_account_key(username), settings.BERTH_LOGIN_FAILURES_PER_ACCOUNT)
    address = client_address(request)
    if address:
        keys["address"] = (_address_key(address), settings.BERTH_LOGIN_FAILURES_PER_ADDRESS)
    return keys


def locked_out(request: HttpRequest | None, username: str | None) -> str | None:
    """Why sign-ins for ``username`` from this request's address are refused now, or None."""
    keys = _keys(request, username)
    try:
        counts = cache.get_many([key for key, _ in keys.values()])
    except redis.RedisError as exc:  # fail open, loudly
        log.warning("sign-in throttling skipped, cache unavailable: %s", exc)
        return None
    for name, (key, limit) in keys.items():
        if limit > 0 and int(counts.get(key) or 0) >= limit:
            minutes = max(1, settings.BERTH_LOGIN_LOCKOUT_SECONDS // 60)
            what = "this account" if name == "account" else "your address"
            return (
                f"Too many failed sign-ins for {what}: try again in up to {minutes} minutes "
                "(or reset the password)."
            )
    return None


def record_failure(request: HttpRequest | None, username: str | None) -> None:
    """Count one failed sign-in against the account and the address."""
    try:
        for key, _ in _keys(request, username).values():
            # The window starts at the first failure and is not extended by later ones.
            cache.add(key, 0, timeout=settings.BERTH_LOGIN_LOCKOUT_SECONDS)
            try:
                cache.incr(key)
            except ValueError:  # expired between add and incr: count afresh
                cache.set(key, 1, timeout=settings.BERTH_LOGIN_LOCKOUT_SECONDS)
    except redis.RedisError as exc:
        log.warning("could not count a failed sign-in, cache unavailable: %s", exc)


def reset(*, username: str | None = None, address: str | None = None) -> None:
    """Forget the failures counted against an account and/or an address (an unlock)."""
    keys = []
    if username:
        keys.append(_account_key(username))
    if address:
        keys.append(_address_key(address))
    cache.delete_many(keys)


def _username(credentials: Mapping[str, Any]) -> str | None:
    value = credentials.get("username") or credentials.get("email")
    return value if isinstance(value, str) else None


class LoginThrottleBackend:
    """First of ``AUTHENTICATION_BACKENDS``: refuses sign-ins while locked out, else defers.

    It has no ``get_user`` on purpose: it never signs anyone in, so sessions (and the test
    client's ``force_login``) keep naming ``ModelBackend``.
    """

    def authenticate(self, request: HttpRequest | None, **credentials: Any) -> None:
        reason = locked_out(request, _username(credentials))
        if reason is not None:
            log.warning("refused a sign-in from %s: %s", client_address(request) or "?", reason)
            raise PermissionDenied(reason)  # stops authenticate(): no later backend runs
        return None


@receiver(user_login_failed, dispatch_uid="berth-login-throttle-failed")
def _count_failure(
    sender: Any, credentials: Mapping[str, Any], request: Any = None, **_: Any
) -> None:
    record_failure(request, _username(credentials))


@receiver(user_logged_in, dispatch_uid="berth-login-throttle-success")
def _clear_account(sender: Any, request: Any = None, user: Any = None, **_: Any) -> None:
    if user is None:
        return
    try:
        cache.delete_many([_account_key(user.get_username()), _account_key(user.email or "")])
    except redis.RedisError as exc:
        log.warning("could not clear sign-in failures, cache unavailable: %s", exc)
