"""Bad input and rate limits on the API (#27 items 9 and 10), sent as an outsider or a
tenant would: tampered cursors and deeply nested JSON are 400s in the error format, never
500s; rate limits count per user and per client address, failures included."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import pytest

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
