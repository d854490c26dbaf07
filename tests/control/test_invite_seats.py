"""Inviting beyond the paid seats: refused, unless an allowed role buys the seat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from billing.models import SeatLedgerEntry
from tenants.choices import Role, Scope
from tenants.models import Tenant, User
from tests.control.billing_helpers import mark_subscribed


@pytest.mark.django_db(transaction=True)
def test_invitation_beyond_seats_buys_one_only_when_asked_and_allowed(
    make_tenant: Callable[..., tuple[Tenant, User]],
    add_member: Callable[..., User],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
) -> None:
    tenant, owner = make_tenant("seaty", plan="team", seats=2)
    mark_subscribed(tenant)
    add_member(tenant, Role.DEVELOPER)  # both seats now taken
    owner_client = client_for(make_token(tenant, owner, Scope.ADMIN))
    url = "/api/v1/tenants/seaty/invitations/"

    refused = owner_client.post(url, {"email": "new@seaty.example"}, format="json")
    assert refused.status_code == 409, refused.content
    assert refused.json()["error"]["details"]["seats"] == 2

    bought = owner_client.post(url, {"email": "new@seaty.example", "buy_seat": True}, format="json")
    assert bought.status_code == 201, bought.content
    tenant.refresh_from_db()
    assert tenant.seats == 3
    latest = SeatLedgerEntry.objects.filter(tenant=tenant).order_by("-id").first()
    assert latest is not None and latest.seats == 3  # appended to the seat ledger

    # Inviting does not buy a seat while one is free.
    owner_client.delete(f"{url}{bought.json()['id']}/")
    again = owner_client.post(
        url, {"email": "other@seaty.example", "buy_seat": True}, format="json"
    )
    assert again.status_code == 201
    tenant.refresh_from_db()
    assert tenant.seats == 3
