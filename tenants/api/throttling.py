"""Rate limits and stream caps in Redis (fixed one-minute windows, shared by all workers).

Two counters, and every request counts, failures included (#27 item 10):

- **Per client address**, before anything else: :class:`AddressRateLimitMiddleware`
  counts every request under ``/api/`` — a bad token (401), a forbidden (403) or hidden
  (404) object alike — and refuses past ``BERTH_API_ADDRESS_RATE_LIMIT`` a minute.
- **Per user**, whatever token or session they use: :class:`TokenRateThrottle` (DRF's
  throttle, after authentication) counts requests that reach it; the middleware counts the
  authenticated user's requests that failed before it (a permission refusal, a 404).
  Past ``BERTH_API_RATE_LIMIT`` a minute, the user's requests are 429. Minting more tokens
  does not buy more requests. Anonymous requests count per address.

Long-lived requests (log and build followers, job waits) also hold one of the user's
``BERTH_API_STREAMS_PER_USER`` stream slots while they run (:func:`stream_slot`,
:func:`limited_stream`): each holds a worker thread for up to minutes.

``0`` disables a limit. If Redis is unreachable, requests are let through and a warning
logged: rate limiting must not take the API down.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import redis
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.throttling import BaseThrottle

from runtime_agent.protocol import NODE_ID_HEADER

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60
#: Set on the Django request once the user's counter has this request (no double count).
COUNTED = "_berth_user_rate_counted"


def _now() -> float:
    """The clock windows are cut from (a seam so tests can pin it)."""
    return time.time()


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def client_address(request: Any) -> str:
    """The peer address (``REMOTE_ADDR``; no proxy header is trusted)."""
    return str(request.META.get("REMOTE_ADDR", ""))


def rate_key(request: Any) -> str:
    """Whose counter a request goes to: its user (any token or session), else its address."""
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return f"ip:{client_address(request)}"


def hit(key: str, limit: int, *, window_seconds: int = WINDOW_SECONDS) -> float | None:
    """Count one request against ``key`` in fixed windows of ``window_seconds``; seconds to
    wait when past ``limit``, else None."""
    if limit <= 0:
        return None
    now = _now()
    window = int(now // window_seconds)
    name = f"berth:ratelimit:{key}:{window_seconds}:{window}"
    try:
        pipe = _client(settings.REDIS_URL).pipeline()
        pipe.incr(name)
        pipe.expire(name, window_seconds + 5)
        count = int(pipe.execute()[0])
    except redis.RedisError as exc:
        log.warning("rate limiting skipped, Redis unavailable: %s", exc)
        return None
    if count > limit:
        return (window + 1) * window_seconds - now
    return None


class TokenRateThrottle(BaseThrottle):
    """Per user (or anonymous address), ``BERTH_API_RATE_LIMIT`` requests a minute."""

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Any, view: Any) -> bool:
        django_request = getattr(request, "_request", request)
        setattr(django_request, COUNTED, True)
        self._wait = hit(rate_key(request), int(settings.BERTH_API_RATE_LIMIT))
        return self._wait is None

    def wait(self) -> float | None:
        return self._wait


def _too_many(message: str, wait: float) -> JsonResponse:
    from tenants.api.errors import error_body

    seconds = max(0, int(wait))
    response = JsonResponse(
        error_body("rate_limited", message, {"retry_after": seconds}), status=429
    )
    response["Retry-After"] = str(seconds)
    return response


#: Where nodes talk to the control plane (reports, pull tokens, secrets, build contexts).
NODE_API_PREFIX = "/api/v1/nodes/"


def _from_a_node(request: HttpRequest) -> bool:
    """A node's own request: not counted per address. Tenants' containers share their
    node's address (masquerade), so one tenant could otherwise spend the node's budget and
    get its heartbeats refused; these views check a random node credential instead (one
    indexed lookup, nothing to guess)."""
    return request.path.startswith(NODE_API_PREFIX) and NODE_ID_HEADER in request.headers


class AddressRateLimitMiddleware:
    """Counts every ``/api/`` request per client address before authentication, and the
    failures of authenticated users that never reached :class:`TokenRateThrottle`."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.path.startswith("/api/") or _from_a_node(request):
            return self.get_response(request)
        address = client_address(request)
        wait = hit(f"addr:{address}", int(settings.BERTH_API_ADDRESS_RATE_LIMIT))
        if wait is not None:
            log.warning("rate limited API requests from %s", address or "?")
            return _too_many("Too many requests from your address.", wait)
        response = self.get_response(request)
        user = getattr(request, "user", None)
        if (
            response.status_code >= 400
            and not getattr(request, COUNTED, False)
            and user is not None
            and user.is_authenticated
        ):
            hit(f"user:{user.pk}", int(settings.BERTH_API_RATE_LIMIT))
        return response


# --------------------------------------------------------------------------- streams


class TooManyStreams(APIException):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_detail = "Too many log or build streams open at once: close one first."
    default_code = "too_many_streams"


@contextmanager
def stream_slot(request: Any, *, seconds: float) -> Iterator[None]:
    """Hold one of the user's stream slots while the body runs (at most ``seconds`` plus a
    margin: a slot whose holder died frees itself then). 429 ``too_many_streams`` when all
    ``BERTH_API_STREAMS_PER_USER`` are taken."""
    release = acquire_stream(request, seconds=seconds)
    try:
        yield
    finally:
        release()


def acquire_stream(request: Any, *, seconds: float) -> Callable[[], None]:
    """Take a stream slot now (or raise :class:`TooManyStreams`); returns its release."""
    limit = int(settings.BERTH_API_STREAMS_PER_USER)
    if limit <= 0:
        return lambda: None
    key = f"berth:streams:{rate_key(request)}"
    member = uuid.uuid4().hex
    now = _now()
    try:
        client = _client(settings.REDIS_URL)
        pipe = client.pipeline()
        pipe.zremrangebyscore(key, "-inf", now)  # slots past their deadline are free
        pipe.zadd(key, {member: now + seconds + 30})
        pipe.zcard(key)
        pipe.expire(key, int(seconds) + 60)
        held = int(pipe.execute()[2])
        if held > limit:
            client.zrem(key, member)
            raise TooManyStreams(
                f"{limit} log or build streams are open for you already: close one first"
            )
    except redis.RedisError as exc:
        log.warning("stream cap skipped, Redis unavailable: %s", exc)
        return lambda: None

    def release() -> None:
        try:
            _client(settings.REDIS_URL).zrem(key, member)
        except redis.RedisError as exc:
            log.warning("could not free a stream slot (it expires): %s", exc)

    return release


def limited_stream(request: Any, chunks: Iterator[bytes], *, seconds: float) -> Iterator[bytes]:
    """``chunks`` holding a stream slot, taken now (a 429 before the response starts) and
    given back when the stream ends or the response is closed (the client went)."""
    return _SlotStream(chunks, acquire_stream(request, seconds=seconds))


class _SlotStream:
    """An iterator that frees its slot at the end or on ``close()`` (which Django's
    response calls even when the body was never read; a generator's ``finally`` would not
    run then)."""

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release = release

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, lambda: None
        release()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
