"""Bad input and rate limits on the API (#27 items 9 and 10), sent as an outsider or a
tenant would: tampered cursors and deeply nested JSON are 400s in the error format, never
500s; rate limits count per user and per client address, failures included."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import pytest
import redis

from tenants.choices import Scope

V1 = "/api/v1"
pytestmark = pytest.mark.django_db


def cursor(raw: str) -> str:
    return quote(base64.b64encode(raw.encode()).decode())


@pytest.fixture
def owner(acme: Any, make_token: Any, client_for: Any) -> Any:
    tenant, user = acme
    return client_for(make_token(tenant, user, Scope.ADMIN))


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["error"]["code"] == code, body
    assert set(body["error"]) == {"code", "message", "details"}


def test_tampered_cursors_are_400s(owner: Any) -> None:
    for name in ("a", "b", "c"):
        body = {"name": name, "scope": "read"}
        assert owner.post(f"{V1}/tenants/acme/tokens/", body, format="json").status_code == 201
    lists = [f"{V1}/tenants/acme/tokens/", f"{V1}/tenants/acme/services/", f"{V1}/tenants/"]
    tampered = [
        "cD1hYmM%3D",  # the issue's: p=abc
        cursor("p=abc"),
        cursor("p="),
        cursor("p=1.5"),
        cursor("p=1e9999"),
        cursor("p=12345678901234567890123"),  # past a bigint
        cursor("p=9d2b5e4c-not-a-uuid"),
        cursor("o=-1"),
        cursor("o=abc"),
        cursor("r=x"),
        cursor("p=\u00e9"),  # not ascii once decoded
        "%%%",  # not base64
        "cD1hYmM",  # unpadded
        "cD1hYmM=\n",
    ]
    for url in lists:
        for value in tampered:
            response = owner.get(f"{url}?cursor={value}")
            assert response.status_code == 400, (url, value, response.content)
            assert_error(response, 400, "invalid_cursor")
    # Positive control: the API's own next link works.
    first = owner.get(f"{V1}/tenants/acme/tokens/?page_size=1").json()
    assert first["next"]
    following = owner.get(first["next"])
    assert following.status_code == 200 and len(following.json()["results"]) == 1


def test_deeply_nested_json_is_a_400(owner: Any, client_for: Any) -> None:
    url = f"{V1}/tenants/acme/services/"
    bodies = [
        "[" * 200_000 + "]" * 200_000,  # the issue's
        '{"a":' * 100_000 + "1" + "}" * 100_000,
        "[" * 200_000,  # unterminated
        '{"name": "x", "image": "busybox", "env": ' + "[" * 500 + "]" * 500 + "}",
        '{"name": "x", "image": "busybox", "labels": ' + '{"k":' * 40 + "1" + "}" * 41,
    ]
    for body in bodies:
        response = owner.generic("POST", url, body, content_type="application/json")
        assert_error(response, 400, "malformed_request")
        # Before authentication too: an outsider gets no 500 either.
        anonymous = client_for(None).generic("POST", url, body, content_type="application/json")
        assert anonymous.status_code in (400, 401), anonymous.content
    # Positive control: an ordinary nested document is accepted.
    ok = owner.post(
        url,
        {
            "name": "web",
            "image": "busybox",
            "env": {"A": "1"},
            "health_check": {"test": ["true"], "retries": 1},
        },
        format="json",
    )
    assert ok.status_code == 201, ok.content


# --------------------------------------------------------------------------- rate limits


@pytest.fixture
def pinned_window(monkeypatch: Any, settings: Any) -> None:
    """One fixed minute window for the whole test (no boundary resets a count mid-test),
    starting empty: counters and slots of an earlier run (the same user ids, in a fresh
    test database) are cleared."""
    import time

    broker = redis.Redis.from_url(settings.REDIS_URL)
    for pattern in ("berth:ratelimit:*", "berth:streams:*"):
        for key in broker.scan_iter(pattern):
            broker.delete(key)
    pinned = (time.time() // 60) * 60 + 30
    monkeypatch.setattr("tenants.api.throttling._now", lambda: pinned)


@pytest.fixture
def limits(
    acme: Any,
    make_tenant: Any,
    make_token: Any,
    client_for: Any,
    settings: Any,
    pinned_window: None,
) -> tuple[Any, ...]:
    """What the rate-limit tests use, in a fresh minute window."""
    return acme, make_tenant, make_token, client_for, settings


def test_a_users_tokens_share_one_budget_and_failures_count(limits: Any) -> None:
    acme, make_tenant, make_token, client_for, settings = limits
    settings.BERTH_API_RATE_LIMIT = 5
    tenant, user = acme
    # Many tokens buy nothing: the user's requests count together.
    tokens = [client_for(make_token(tenant, user, Scope.READ)) for _ in range(5)]
    assert [t.get(f"{V1}/me/").status_code for t in tokens] == [200] * 5
    assert_error(tokens[0].get(f"{V1}/me/"), 429, "rate_limited")
    assert_error(
        client_for(make_token(tenant, user, Scope.ADMIN)).get(f"{V1}/me/"), 429, "rate_limited"
    )

    # Failures count too: another user probing other tenants' URLs (404) and writing with
    # a read token (403) spends their budget, then their ordinary request is refused.
    prober_tenant, prober = make_tenant("prober")
    reader = client_for(make_token(prober_tenant, prober, Scope.READ))
    assert reader.get(f"{V1}/tenants/acme/services/").status_code == 404
    assert reader.get(f"{V1}/tenants/acme/tokens/").status_code == 404
    denied = reader.post(f"{V1}/tenants/prober/tokens/", {"name": "x"}, format="json")
    assert denied.status_code == 403
    assert reader.get(f"{V1}/tenants/victim/").status_code == 404
    assert reader.get(f"{V1}/me/").status_code == 200  # the 5th request
    assert_error(reader.get(f"{V1}/me/"), 429, "rate_limited")
    # Positive control: a third user is unaffected.
    third_tenant, third = make_tenant("third")
    assert client_for(make_token(third_tenant, third)).get(f"{V1}/me/").status_code == 200


def test_an_address_is_limited_before_authentication(
    acme: Any, make_token: Any, client_for: Any, settings: Any, pinned_window: None
) -> None:
    settings.BERTH_API_ADDRESS_RATE_LIMIT = 6
    tenant, user = acme
    good = make_token(tenant, user)
    guesser, elsewhere = "203.0.113.9", "198.51.100.9"
    for guess in range(6):  # token guesses: 401s, counted against the address
        response = client_for(f"brt_guess{guess:03d}_nope").get(f"{V1}/me/", REMOTE_ADDR=guesser)
        assert response.status_code == 401, response.content
    # The address is spent: even a valid token (or no token) from it is refused, in the
    # error format, with Retry-After.
    limited = client_for(good).get(f"{V1}/me/", REMOTE_ADDR=guesser)
    assert_error(limited, 429, "rate_limited")
    assert int(limited["Retry-After"]) >= 0
    assert_error(client_for(None).get(f"{V1}/tenants/", REMOTE_ADDR=guesser), 429, "rate_limited")
    # Positive control: the same token from another address works.
    assert client_for(good).get(f"{V1}/me/", REMOTE_ADDR=elsewhere).status_code == 200
    # Pages outside the API are not counted here (the dashboard has its own limits).
    assert client_for(None).get("/login/", REMOTE_ADDR=guesser).status_code == 200


def test_a_tenant_sharing_its_nodes_address_cannot_spend_the_nodes_budget(
    acme: Any, client_for: Any, settings: Any, pinned_window: None
) -> None:
    """Containers reach the internet masqueraded as their node: a tenant hammering the API
    from one spends that address, but the node's own reports are not counted there."""
    from runtime_agent import protocol
    from tests.control.conftest import SYSTEM
    from workloads.services import nodes

    settings.BERTH_API_ADDRESS_RATE_LIMIT = 3
    _, join = nodes.create_join_token(actor=SYSTEM)
    node, credential = nodes.join_node(join, name="shared-addr", capacity={}, labels={})
    node_address = "203.0.113.20"
    for _ in range(3):  # the tenant's container, from the node's address
        client_for(None).get(f"{V1}/tenants/", REMOTE_ADDR=node_address)
    assert_error(
        client_for(None).get(f"{V1}/tenants/", REMOTE_ADDR=node_address), 429, "rate_limited"
    )
    report = {"node_id": str(node.pk), "credential": "", "sent_at": "2026-01-01T00:00:00Z"}
    headers = {
        "HTTP_X_BERTH_NODE": str(node.pk),
        "HTTP_X_BERTH_NODE_CREDENTIAL": credential,
        "REMOTE_ADDR": node_address,
    }
    assert protocol.NODE_ID_HEADER == "X-Berth-Node"
    for _ in range(5):
        answer = client_for(None).post(f"{V1}/nodes/report/", report, format="json", **headers)
        assert answer.status_code == 200, answer.content
    # The node headers open nothing else: the rest of the API stays limited.
    limited = client_for(None).get(f"{V1}/tenants/", **headers)
    assert_error(limited, 429, "rate_limited")


def close(response: Any) -> None:
    """Close a streaming response as the server does when the client goes (without the
    request_finished hook closing the test's database connection, as Django's test
    client does too)."""
    from django.core.signals import request_finished
    from django.db import close_old_connections

    request_finished.disconnect(close_old_connections)
    try:
        response.close()
    finally:
        request_finished.connect(close_old_connections)


def test_concurrent_streams_per_user_are_capped(limits: Any) -> None:
    acme, make_tenant, make_token, client_for, settings = limits
    settings.BERTH_API_STREAMS_PER_USER = 2
    tenant, user = acme
    owner = client_for(make_token(tenant, user))
    assert (
        owner.post(
            f"{V1}/tenants/acme/services/", {"name": "web", "image": "busybox"}, format="json"
        ).status_code
        == 201
    )
    follow = f"{V1}/tenants/acme/services/web/logs/?follow=1&seconds=60"
    # Two followers, from two tokens of the user: both open.
    first = owner.get(follow)
    second = client_for(make_token(tenant, user, Scope.READ)).get(follow)
    assert first.status_code == second.status_code == 200
    assert first.streaming and second.streaming
    # A third is refused, whichever token asks.
    assert_error(owner.get(follow), 429, "too_many_streams")
    # Another user's stream is theirs (positive control).
    other_tenant, other = make_tenant("other")
    other_client = client_for(make_token(other_tenant, other))
    other_client.post(
        f"{V1}/tenants/other/services/", {"name": "web", "image": "busybox"}, format="json"
    )
    other_stream = other_client.get(f"{V1}/tenants/other/services/web/logs/?follow=1&seconds=60")
    assert other_stream.status_code == 200
    close(other_stream)
    # A closed stream (the client went) frees its slot.
    close(first)
    again = owner.get(follow)
    assert again.status_code == 200
    close(again)
    close(second)
