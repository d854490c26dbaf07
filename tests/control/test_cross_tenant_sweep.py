"""Cross-tenant sweep over every route under /api/ in the URLconf.

For each route the sweep substitutes the *victim* tenant's slug and object ids and sends
every method with the *attacker* tenant owner's admin-scope token: reads must be 404,
writes 404 or 405, no response may mention the victim's data, and none of the victim's
rows may change. Then, on the attacker's own objects, a read-scope token must not manage
any write (403/405, nothing changed). Routes added by any app are picked up automatically;
see tests/control/sweep_factories.py for objects the sweep cannot find by itself.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from django.apps import apps
from django.db.models import Model
from django.test import override_settings
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from tenants import services
from tenants.choices import Role, Scope
from tenants.models import Tenant, User
from tests.control.conftest import SYSTEM
from tests.control.sweep_factories import FACTORIES

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(600)]

SECRET_MARKERS = ("victim-corp", "secret-b")
#: The victim's memory use: no number in any response to the attacker may equal it.
SECRET_USAGE = 31337
WRITE_METHODS = ("post", "put", "patch", "delete")
READ_METHODS = ("get", "options", "head")


@dataclass(frozen=True)
class Route:
    parts: tuple[str, ...]
    callback: Any

    @property
    def template(self) -> str:
        return "/" + "".join(self.parts)

    @property
    def kwargs(self) -> list[str]:
        names: list[str] = []
        for part in self.parts:
            names += re.findall(r"\(\?P<(\w+)>", part)
            names += re.findall(r"<(?:[^<>:]+:)?(\w+)>", re.sub(r"\(\?P<\w+>", "", part))
        return names

    @property
    def view_class(self) -> Any:
        return getattr(self.callback, "cls", None) or getattr(self.callback, "view_class", None)

    def model(self) -> type[Model] | None:
        queryset = getattr(self.view_class, "queryset", None)
        return None if queryset is None else queryset.model

    def render(self, values: dict[str, str]) -> str:
        out = []
        for part in self.parts:
            part = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: values[m.group(1)], part)
            part = re.sub(r"<(?:[^<>:]+:)?(\w+)>", lambda m: values[m.group(1)], part)
            out.append(part.lstrip("^").rstrip("$").replace("\\", ""))
        return "/" + "".join(out)


def walk(patterns: list[Any], prefix: tuple[str, ...] = ()) -> Iterator[Route]:
    for pattern in patterns:
        parts = (*prefix, str(pattern.pattern))
        if isinstance(pattern, URLResolver):
            yield from walk(pattern.url_patterns, parts)
        elif isinstance(pattern, URLPattern):
            yield Route(parts, pattern.callback)


def api_routes() -> list[Route]:
    routes = [
        r
        for r in walk(get_resolver().url_patterns)
        if r.template.startswith("/api/") and "format" not in r.kwargs
    ]
    assert routes, "no /api/ routes found"
    return routes


ROUTES = api_routes()


# ------------------------------------------------------------------ world


@dataclass
class World:
    attacker: Tenant
    attacker_owner: User
    victim: Tenant
    victim_owner: User
    admin_token: str
    read_token: str


def populate(tenant: Tenant, owner: User, marker: str) -> None:
    """Give a tenant one object of every kind the tenants app has."""
    actor = services.Actor(user=owner)
    services.create_api_token(tenant, owner, name=f"{marker} ci", scope=Scope.WRITE, actor=actor)
    services.invite_member(
        tenant, f"invitee@{marker}.example", Role.VIEWER, actor=actor, actor_role=Role.OWNER
    )
    dev, _ = services.get_or_create_user(f"dev@{marker}.example")
    from tenants.models import Membership

    Membership.objects.create(tenant=tenant, user=dev, role=Role.DEVELOPER)
    services.set_quota_override(tenant, "containers", 3, actor=SYSTEM, reason=f"{marker} deal")
    for label, factory in FACTORIES.items():
        factory(tenant, owner)
        assert apps.get_model(label)


@pytest.fixture
def world(make_tenant, make_token) -> World:
    attacker, attacker_owner = make_tenant(
        "attacker", plan="business", owner="boss@attacker.example"
    )
    victim, victim_owner = services.create_tenant(
        slug="victim-corp",
        name="Secret-B Holdings",
        owner_email="owner@secret-b.example",
        plan_code="business",
        seats=10,
        actor=SYSTEM,
    )
    populate(attacker, attacker_owner, "attacker")
    populate(victim, victim_owner, "secret-b")
    services.reserve(victim, {"memory_mib": SECRET_USAGE}, actor=SYSTEM, reason="secret-b workload")
    return World(
        attacker=attacker,
        attacker_owner=attacker_owner,
        victim=victim,
        victim_owner=victim_owner,
        admin_token=make_token(attacker, attacker_owner, Scope.ADMIN),
        read_token=make_token(attacker, attacker_owner, Scope.READ),
    )


def tenant_models() -> list[type[Model]]:
    return [m for m in apps.get_models() if hasattr(m._default_manager.all(), "for_tenant")]


#: Bookkeeping that legitimately changes on reads (the token in use notes its last use).
VOLATILE_FIELDS = {"last_used_at", "last_used_ip"}


def snapshot(tenant: Tenant) -> dict[str, list[dict[str, Any]]]:
    """Every row of every tenant-owned model belonging to ``tenant``."""
    state = {}
    for model in tenant_models():
        rows = [
            {k: v for k, v in row.items() if k not in VOLATILE_FIELDS}
            for row in cast(Any, model._default_manager.all()).for_tenant(tenant).values()
        ]
        state[model._meta.label] = sorted(rows, key=repr)
    return state


#: Stand-ins for URL values the sweep cannot look up (a digest, a tag name…): the first one
#: matching the route's own pattern is used, so the URL still resolves to the view.
PLACEHOLDERS = ("424242", "sha256:" + "0" * 64, "latest", "x")


def placeholder_for(route: Route, name: str) -> str:
    for part in route.parts:
        match = re.search(rf"\(\?P<{name}>([^)]*)\)", part)
        if match:
            for candidate in PLACEHOLDERS:
                if re.fullmatch(match.group(1), candidate):
                    return candidate
    return PLACEHOLDERS[0]


@dataclass
class URLValues:
    values: dict[str, str]
    #: The route's object (its lookup kwarg) was found in the tenant.
    object_found: bool
    #: Every value is real (no placeholders): the view should find what the URL names.
    exact: bool


def values_for(route: Route, tenant: Tenant) -> URLValues:
    """URL values addressing ``tenant`` and one of its objects of the view's model."""
    view = route.view_class
    model = route.model()
    lookup_field = getattr(view, "lookup_field", "pk")
    lookup_kwarg = getattr(view, "lookup_url_kwarg", None) or lookup_field
    values: dict[str, str] = {}
    object_found, exact = True, True
    for name in route.kwargs:
        if name == "tenant_slug":
            values[name] = tenant.slug
            continue
        obj = None
        if model is not None and name == lookup_kwarg:
            queryset = model._default_manager.all()
            if hasattr(queryset, "for_tenant"):
                obj = queryset.for_tenant(tenant).order_by("pk").first()
            object_found = obj is not None
        if obj is None:
            exact = False
            values[name] = placeholder_for(route, name)
        else:
            values[name] = str(getattr(obj, lookup_field))
    if model is None and set(route.kwargs) - {"tenant_slug"}:
        object_found = False
    return URLValues(values, object_found, exact)


def send(client: APIClient, method: str, url: str) -> Any:
    if method in ("get", "options", "head"):
        return getattr(client, method)(url)
    return getattr(client, method)(url, {}, format="json")


def numbers_in(value: Any) -> Iterator[int]:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers_in(item)


def assert_no_leak(response: Any, where: str) -> None:
    text = response.content.decode(errors="replace").lower()
    for marker in SECRET_MARKERS:
        assert marker not in text, f"{where} leaked {marker!r}: {text[:300]}"
    if response.content and "json" in response.get("Content-Type", ""):
        assert SECRET_USAGE not in set(numbers_in(response.json())), f"{where} leaked usage"


def test_leak_detector_catches_victim_data(world: World) -> None:
    """A platform admin may read the victim: the detector must flag what they see."""
    staff = User.objects.create_user("root@berth.example", "root@berth.example", "x", is_staff=True)
    client = APIClient()
    client.force_login(staff)
    for path in ("quotas/", "members/"):
        response = client.get(f"/api/v1/tenants/{world.victim.slug}/{path}")
        assert response.status_code == 200
        with pytest.raises(AssertionError):
            assert_no_leak(response, path)


def test_sweep_finds_the_tenant_routes() -> None:
    templates = {r.template for r in ROUTES}
    assert any("members" in t for t in templates)
    assert any("(?P<pk>" in t for t in templates)


@override_settings(BERTH_API_RATE_LIMIT=0)
@pytest.mark.parametrize("route", ROUTES, ids=[r.template for r in ROUTES])
def test_other_tenant_is_invisible_and_untouchable(route: Route, world: World) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {world.admin_token}")
    found = values_for(route, world.victim)
    if not found.object_found:
        warnings.warn(
            f"sweep: no victim object for {route.template}; add a factory in "
            "tests/control/sweep_factories.py",
            stacklevel=1,
        )
    values = found.values
    # Tenant-owned routes must answer 404 (as if nothing existed). Platform routes with
    # ids (e.g. nodes, staff only) may refuse with 403 but never succeed or leak.
    targets_victim = "tenant_slug" in route.kwargs or (bool(route.kwargs) and found.object_found)
    url = route.render(values)
    before = snapshot(world.victim)
    for method in (*READ_METHODS, *WRITE_METHODS):
        response = send(client, method, url)
        where = f"{method.upper()} {url}"
        assert not (200 <= response.status_code < 300 and targets_victim), (
            f"{where} answered {response.status_code} to another tenant's token"
        )
        if targets_victim:
            allowed = {404} if method in ("get", "head") else {404, 405}
            assert response.status_code in allowed, f"{where}: {response.status_code}"
        assert_no_leak(response, where)
    assert snapshot(world.victim) == before, f"{route.template} changed the victim's rows"


@override_settings(BERTH_API_RATE_LIMIT=0)
@pytest.mark.parametrize("route", ROUTES, ids=[r.template for r in ROUTES])
def test_read_scope_token_cannot_write(route: Route, world: World) -> None:
    found = values_for(route, world.attacker)
    # With a placeholder in the URL the object may not exist: then 404 is right too.
    refusals = {403, 405} if found.exact else {403, 404, 405}
    values = found.values
    url = route.render(values)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {world.read_token}")
    before = snapshot(world.attacker)
    for method in WRITE_METHODS:
        response = send(client, method, url)
        where = f"{method.upper()} {url}"
        assert not 200 <= response.status_code < 300, f"{where} let a read token write"
        if "tenant_slug" in route.kwargs:
            assert response.status_code in refusals, f"{where}: {response.status_code}"
    assert snapshot(world.attacker) == before, f"{route.template} changed rows for a read token"
