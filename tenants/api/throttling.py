"""Per-token rate limiting in Redis (fixed one-minute windows, shared by all web workers).

The key is the token's prefix, else the session user, else the client IP. The limit is
``BERTH_API_RATE_LIMIT`` requests per minute (``0`` disables). If Redis is unreachable the
request is let through and a warning logged: rate limiting must not take the API down.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import Any

import redis
from django.conf import settings
from rest_framework.throttling import BaseThrottle

from tenants.models import APIToken

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60


def _now() -> float:
    """The clock windows are cut from (a seam so tests can pin it)."""
    return time.time()


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def rate_key(request: Any) -> str:
    token = getattr(request, "auth", None)
    if isinstance(token, APIToken):
        return f"token:{token.prefix}"
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return f"ip:{request.META.get('REMOTE_ADDR', '')}"


class TokenRateThrottle(BaseThrottle):
    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Any, view: Any) -> bool:
        limit = int(settings.BERTH_API_RATE_LIMIT)
        if limit <= 0:
            return True
        now = _now()
        window = int(now // WINDOW_SECONDS)
        key = f"berth:ratelimit:{rate_key(request)}:{window}"
        try:
            pipe = _client(settings.REDIS_URL).pipeline()
            pipe.incr(key)
            pipe.expire(key, WINDOW_SECONDS + 5)
            count = int(pipe.execute()[0])
        except redis.RedisError as exc:
            log.warning("rate limiting skipped, Redis unavailable: %s", exc)
            return True
        if count > limit:
            self._wait = (window + 1) * WINDOW_SECONDS - now
            return False
        return True

    def wait(self) -> float | None:
        return self._wait
