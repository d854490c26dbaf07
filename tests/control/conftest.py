"""Control-plane fixtures on the real Postgres named by DATABASE_URL.

``make_tenant`` creates tenants through the services (as production does); ``add_member``
and ``make_token`` give users roles and API tokens; ``client_for(secret)`` is a DRF client
sending ``Authorization: Bearer <secret>``. Plans are re-seeded for every test because
``transactional_db`` tests truncate tables, seeded rows included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from billing.models import Plan
from billing.plans import DEFAULT_PLANS
from tenants import services
from tenants.choices import Role, Scope
from tenants.models import Membership, Tenant, User

SYSTEM = services.Actor.for_system("tests")


def seed_plans() -> None:
    for order, plan in enumerate(DEFAULT_PLANS):
        Plan.objects.get_or_create(
            code=plan.code,
            defaults={
                "name": plan.name,
                "seat_price_cents": plan.seat_price_cents,
                "min_seats": plan.min_seats,
                "max_seats": plan.max_seats,
                "sort_order": order,
                **plan.per_seat,
            },
        )


@pytest.fixture(autouse=True)
def _default_plans(request: pytest.FixtureRequest, _django_db_marker: None) -> None:
    """Every database test here starts with the default plans.

    They come from a data migration, but each ``transaction=True`` test truncates all
    tables when it ends, so tests running after one would otherwise find no plans.
    """
    names = set(request.fixturenames)
    if "transactional_db" in names:
        request.getfixturevalue("transactional_db")
    elif "db" in names:
        request.getfixturevalue("db")
    elif request.node.get_closest_marker("django_db") is None:
        return
    seed_plans()


@pytest.fixture
def plans(db: None) -> None:
    seed_plans()


@pytest.fixture
def make_tenant(plans: None) -> Callable[..., tuple[Tenant, User]]:
    def make(
        slug: str, *, plan: str = "team", seats: int | None = 5, owner: str | None = None
    ) -> tuple[Tenant, User]:
        return services.create_tenant(
            slug=slug,
            owner_email=owner or f"owner@{slug}.example",
            plan_code=plan,
            seats=seats,
            actor=SYSTEM,
        )

    return make


@pytest.fixture
def add_member() -> Callable[..., User]:
    """A user with ``role`` in ``tenant`` (created directly: seat rules are tested apart)."""

    def add(tenant: Tenant, role: str, email: str | None = None) -> User:
        user, _ = services.get_or_create_user(email or f"{role}@{tenant.slug}.example")
        Membership.objects.create(tenant=tenant, user=user, role=role)
        return user

    return add


@pytest.fixture
def make_token() -> Callable[..., str]:
    def make(tenant: Tenant, user: User, scope: str = Scope.ADMIN, **kwargs: Any) -> str:
        _, secret = services.create_api_token(
            tenant, user, name=f"test-{scope}", scope=scope, actor=SYSTEM, **kwargs
        )
        return secret

    return make


@pytest.fixture
def client_for() -> Callable[[str | None], APIClient]:
    def make(secret: str | None = None) -> APIClient:
        client = APIClient()
        if secret:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
        return client

    return make


@pytest.fixture
def acme(make_tenant: Callable[..., tuple[Tenant, User]]) -> tuple[Tenant, User]:
    return make_tenant("acme")


@pytest.fixture
def owner_token(acme: tuple[Tenant, User], make_token: Callable[..., str]) -> str:
    tenant, owner = acme
    return make_token(tenant, owner, Scope.ADMIN)


__all__ = ["SYSTEM", "Role", "seed_plans"]
