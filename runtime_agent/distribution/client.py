"""HTTP client for one registry, doing the bearer-token dance as docker does.

A request goes out with the token cached for its scope (or none); on 401 the
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` challenge is answered by
fetching a token from the realm (GET, Basic auth when credentials are known), and the
request is retried once. Tokens are cached per scope until shortly before they expire.

Given a pre-issued :class:`~runtime_agent.distribution.auth.BearerToken` instead, every
request carries it and nothing is fetched from the realm. If it can be renewed, it is
renewed shortly before its ``exp`` and once after a 401; otherwise (or when the renewed one
is refused too) a 401 means the token does not grant the request (another repository, or
it expired) and is raised as is.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

import requests

from runtime_agent.distribution.auth import BearerToken, Credentials, token_expiry
from runtime_agent.distribution.errors import (
    RegistryError,
    RegistryUnauthorized,
    error_from_response,
)

USER_AGENT = "berth-agent/0.1"
RENEW_BEFORE = 30.0  # seconds before a pre-issued token's exp to fetch the next one
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def registry_base_url(registry: str) -> str:
    """http for loopback hosts and hosts in BERTH_INSECURE_REGISTRIES (as docker), else https."""
    host = registry.rsplit(":", 1)[0].strip("[]") if registry.count(":") <= 1 else registry
    insecure = {h for h in os.environ.get("BERTH_INSECURE_REGISTRIES", "").split(",") if h}
    if host == "localhost" or registry in insecure or host in insecure:
        return f"http://{registry}"
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return f"http://{registry}"
    except ValueError:
        pass
    return f"https://{registry}"


def parse_challenge(header: str) -> dict[str, str] | None:
    """Parse ``Bearer realm="...",service="...",scope="..."``; None for other schemes."""
    scheme, _, params = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return dict(_CHALLENGE_PARAM.findall(params))


class RegistryClient:
    """Requests against ``/v2/`` of one registry with per-scope bearer tokens.

    Thread-safe: each thread gets its own ``requests.Session`` (connection pool), the
    token cache is shared under a lock so parallel layer transfers reuse one token.
    """

    def __init__(self, registry: str, credentials: Credentials | BearerToken | None = None) -> None:
        self.registry = registry
        self.base = registry_base_url(registry)
        self.bearer = credentials if isinstance(credentials, BearerToken) else None
        self.credentials = credentials if isinstance(credentials, Credentials) else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}
        self._bearer_token = self.bearer.token if self.bearer else ""
        self._bearer_expiry = token_expiry(self._bearer_token) if self.bearer else None

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
        return session

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base}{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: Mapping[str, str] | None = None,
        expected: tuple[int, ...] = (200,),
        what: str = "",
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request, answering one auth challenge; raise typed errors on failure.

        ``data`` must be re-readable for the retry: bytes, or a file object (it is
        rewound to where it started).
        """
        data = kwargs.get("data")
        start = data.tell() if data is not None and hasattr(data, "tell") else None
        for attempt in range(2):
            hdrs = dict(headers or {})
            token = self._cached_token(scope)
            if token:
                hdrs["Authorization"] = f"Bearer {token}"
            try:
                response = self.session.request(method, self.url(path), headers=hdrs, **kwargs)
            except requests.RequestException as exc:
                raise RegistryError(f"{what or path}: cannot reach {self.registry}: {exc}") from exc
            if response.status_code == 401 and attempt == 0 and self.bearer is None:
                challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
                response.close()
                if challenge is None or "realm" not in challenge:
                    raise RegistryUnauthorized(
                        f"{what or path}: {self.registry} requires authentication it does not "
                        "describe",
                        status=401,
                    )
                self._fetch_token(challenge, scope)
                if start is not None:
                    data.seek(start)  # type: ignore[union-attr]
                continue
            if response.status_code == 401 and self.bearer is not None:
                challenge = parse_challenge(response.headers.get("WWW-Authenticate", "")) or {}
                response.close()
                if attempt == 0 and self.bearer.renew is not None:
                    self._renew_bearer(token)
                    if start is not None:
                        data.seek(start)  # type: ignore[union-attr]
                    continue
                raise RegistryUnauthorized(
                    f"{what or path}: {self.registry} refused the pre-issued token "
                    f"(UNAUTHORIZED {challenge.get('error') or 'for this request'})",
                    status=401,
                    registry_code="UNAUTHORIZED",
                )
            if response.status_code not in expected:
                body = response.content if not kwargs.get("stream") else response.raw.read(65536)
                response.close()
                raise error_from_response(response.status_code, body, what or f"{method} {path}")
            return response
        raise AssertionError("unreachable")

    def _cached_token(self, scope: str) -> str | None:
        if self.bearer is not None:
            with self._lock:
                token, expiry = self._bearer_token, self._bearer_expiry
            if (
                self.bearer.renew is not None
                and expiry is not None
                and expiry - time.time() < RENEW_BEFORE
            ):
                return self._renew_bearer(token)
            return token
        with self._lock:
            entry = self._tokens.get(scope)
        if entry and entry[1] > time.monotonic():
            return entry[0]
        return None

    def _renew_bearer(self, stale: str | None) -> str:
        """The next pre-issued token (once per stale one, whatever the thread count)."""
        assert self.bearer is not None and self.bearer.renew is not None
        with self._lock:
            if self._bearer_token != stale:
                return self._bearer_token  # another thread renewed it meanwhile
            fresh = self.bearer.renew()
            self._bearer_token = fresh
            self._bearer_expiry = token_expiry(fresh)
            return fresh

    def _fetch_token(self, challenge: dict[str, str], scope: str) -> str:
        params: dict[str, str | list[str]] = {"service": challenge.get("service", "")}
        wanted = challenge.get("scope") or scope
        if wanted:
            # Several scopes (e.g. a cross-repository mount) come space-separated in the
            # challenge and go as repeated ``scope`` parameters, as docker sends them.
            params["scope"] = wanted.split()
        if self.credentials:
            params["account"] = self.credentials.username
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        try:
            response = self.session.get(challenge["realm"], params=params, auth=auth, timeout=30)
        except requests.RequestException as exc:
            realm = challenge["realm"]
            raise RegistryError(f"cannot reach the token server {realm}: {exc}") from exc
        if response.status_code != 200:
            raise error_from_response(
                response.status_code, response.content, f"token for {wanted or 'registry'}"
            )
        body = response.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError(f"token server {challenge['realm']} returned no token")
        lifetime = int(body.get("expires_in") or 60)
        with self._lock:
            # Refresh a little early so a token never expires mid-request.
            self._tokens[scope] = (token, time.monotonic() + max(lifetime - 10, 1))
        return str(token)
