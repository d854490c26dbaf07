"""Dashboard pages through Django's test client on the real Postgres and Redis: role
permissions as in the API, other tenants' objects are 404, bad input keeps what was typed,
expired sessions come back after logging in, double submits act once, CSRF is enforced."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.core import mail
from django.test import Client

from tenants.choices import Role
from tenants.models import APIToken, AuditLog, Invitation, Tenant, User
from tests.dashboard.conftest import PASSWORD
from workloads.models import BatchJob, Service

pytestmark = pytest.mark.django_db

TenantMaker = Callable[..., tuple[Tenant, User]]


def _service(tenant: Tenant, name: str = "web") -> Service:
    from tenants.services import Actor
    from workloads.services.deploy import create_service

    return create_service(
        tenant, name=name, data={"image": "busybox"}, replicas=0, actor=Actor.for_system("t")
    )


def test_signup_creates_the_tenant_and_logs_in(make_tenant: TenantMaker) -> None:
    client = Client()
    page = client.get("/signup/")
    assert page.status_code == 200
    assert b'name="csrfmiddlewaretoken"' in page.content
    idem = page.context["form"].initial["idem"]
    response = client.post(
        "/signup/",
        {
            "email": "Ann@Example.com",
            "password": PASSWORD,
            "organisation": "Ann's",
            "slug": "anns",
            "idem": idem,
        },
    )
    # The address is confirmed first: the account signs in from the emailed link.
    assert response.status_code == 302
    assert response["Location"] == "/signup/sent/"
    tenant = Tenant.objects.get(slug="anns")
    assert tenant.plan.code == "free"
    assert tenant.memberships.get().user.email == "ann@example.com"
    assert client.get("/t/anns/").status_code == 302  # not signed in yet
    (message,) = mail.outbox
    assert message.to == ["ann@example.com"]
    link = re.search(r"http://testserver(/signup/verify/\S+/)", str(message.body))
    assert link is not None, message.body
    verified = client.get(link.group(1))
    assert verified.status_code == 302 and verified["Location"] == "/t/anns/"
    assert client.get("/t/anns/").status_code == 200


def test_signup_errors_are_inline_and_keep_the_input(make_tenant: TenantMaker) -> None:
    make_tenant("taken")
    response = Client().post(
        "/signup/",
        {
            "email": "bob@example.com",
            "password": "short",
            "organisation": "Bob Co",
            "slug": "taken",
        },
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert 'value="bob@example.com"' in body and 'value="Bob Co"' in body
    assert "This password is too short" in body
    assert 'aria-invalid="true"' in body
    fixed = Client().post(
        "/signup/",
        {
            "email": "bob@example.com",
            "password": PASSWORD,
            "organisation": "Bob Co",
            "slug": "taken",
        },
    )
    assert "slug &#x27;taken&#x27; is taken" in fixed.content.decode()
    assert not User.objects.filter(email="bob@example.com").exists()


def test_login_returns_to_next_after_an_expired_session(make_tenant: TenantMaker) -> None:
    _tenant, _owner = make_tenant("acme")
    client = Client()
    response = client.get("/t/acme/services/")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=%2Ft%2Facme%2Fservices%2F"
    # An htmx poll from a page whose session expired: the browser is sent to log in.
    poll = client.get(
        "/t/acme/services/web/status/",
        HTTP_HX_REQUEST="true",
        HTTP_HX_CURRENT_URL="http://testserver/t/acme/services/web/",
    )
    assert poll.status_code == 401
    assert poll["HX-Redirect"] == "/login/?next=%2Ft%2Facme%2Fservices%2Fweb%2F"
    back = client.post(
        "/login/?next=/t/acme/services/",
        {"username": "OWNER@acme.example", "password": PASSWORD, "next": "/t/acme/services/"},
    )
    assert back.status_code == 302
    assert back["Location"] == "/t/acme/services/"


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (Role.OWNER, True),
        (Role.ADMIN, True),
        (Role.DEVELOPER, True),
        (Role.BILLING, False),
        (Role.VIEWER, False),
    ],
)
def test_deploying_follows_the_role_table(
    make_tenant: TenantMaker,
    member: Callable[..., User],
    login: Callable[[User], Client],
    role: str,
    allowed: bool,
) -> None:
    tenant, owner = make_tenant("acme")
    user = owner if role == Role.OWNER else member(tenant, role)
    client = login(user)
    _service(tenant)
    detail = client.get("/t/acme/services/web/").content.decode()
    assert ("Deploy a new image" in detail) is allowed
    assert (">Restart<" in detail) is allowed
    listing = client.get("/t/acme/services/").content.decode()
    assert ("Deploy a service" in listing) is allowed
    response = client.post(
        "/t/acme/services/web/scale/", {"replicas": "0", "idem": uuid.uuid4().hex}
    )
    if allowed:
        assert response.status_code == 302
    else:
        assert response.status_code == 403
        assert "does not allow this" in response.content.decode()
    created = client.post(
        "/t/acme/services/new/",
        {
            "name": "api",
            "image": "busybox",
            "replicas": "0",
            "cpu_millicores": "100",
            "memory_mib": "32",
        },
    )
    assert (created.status_code == 302) is allowed
    assert Service.objects.filter(tenant=tenant, name="api").exists() is allowed


def test_other_tenants_objects_are_404(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    victim, victim_owner = make_tenant("victim")
    _, intruder = make_tenant("intruder")
    _service(victim)
    from tenants.services import Actor, create_api_token, invite_member

    token, _ = create_api_token(
        victim, victim_owner, name="ci", scope="read", actor=Actor.for_system("t")
    )
    invitation, _ = invite_member(
        victim, "x@victim.example", Role.VIEWER, actor=Actor.for_system("t"), actor_role=None
    )
    client = login(intruder)
    for url in (
        "/t/victim/",
        "/t/victim/services/web/",
        "/t/victim/billing/",
        "/t/victim/members/",
        "/t/victim/audit/",
        "/t/nonexistent/",
    ):
        assert client.get(url).status_code == 404, url
    for url, data in (
        ("/t/victim/services/web/scale/", {"replicas": "3"}),
        ("/t/victim/services/web/delete/", {}),
        (f"/t/victim/tokens/{token.pk}/revoke/", {}),
        (f"/t/victim/invitations/{invitation.pk}/revoke/", {}),
    ):
        assert client.post(url, data).status_code == 404, url
    # Through the intruder's own slug, the victim's rows are not found either.
    assert client.post(f"/t/intruder/tokens/{token.pk}/revoke/").status_code == 404
    assert client.post(f"/t/intruder/invitations/{invitation.pk}/revoke/").status_code == 404
    token.refresh_from_db()
    invitation.refresh_from_db()
    assert token.revoked_at is None and invitation.revoked_at is None
    assert Service.objects.get(tenant=victim, name="web").state == "active"


def test_a_double_submitted_form_acts_once(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    tenant, owner = make_tenant("acme")
    client = login(owner)
    form = {
        "image": "busybox",
        "command": "echo hi",
        "array_size": "1",
        "parallelism": "1",
        "max_retries": "0",
        "cpu_millicores": "100",
        "memory_mib": "32",
        "idem": uuid.uuid4().hex,  # tokens live in Redis: unique across test runs
    }
    first = client.post("/t/acme/jobs/new/", form)
    second = client.post("/t/acme/jobs/new/", form)
    assert first.status_code == second.status_code == 302
    assert second["Location"] == first["Location"]
    assert BatchJob.objects.filter(tenant=tenant).count() == 1
    # A new form (new token) submits a new job.
    client.post("/t/acme/jobs/new/", {**form, "idem": uuid.uuid4().hex})
    assert BatchJob.objects.filter(tenant=tenant).count() == 2


def test_invalid_job_keeps_input_and_frees_the_token(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    tenant, owner = make_tenant("acme")
    client = login(owner)
    bad = {
        "image": "busybox",
        "command": "echo 'unclosed",
        "array_size": "0",
        "parallelism": "1",
        "max_retries": "0",
        "cpu_millicores": "100",
        "memory_mib": "999999999",
        "idem": uuid.uuid4().hex,
    }
    response = client.post("/t/acme/jobs/new/", bad)
    assert response.status_code == 400
    body = response.content.decode()
    assert "cannot split the command" in body
    assert "greater than or equal to 1" in body
    assert 'value="echo &#x27;unclosed"' in body
    # Over quota is refused by the service, shown on the form, and nothing is created.
    over = {**bad, "command": "echo hi", "array_size": "1"}
    refused = client.post("/t/acme/jobs/new/", over)
    assert refused.status_code == 400
    assert "memory_mib" in refused.content.decode()
    assert not BatchJob.objects.filter(tenant=tenant).exists()


def test_token_secret_is_shown_once_and_revoke_works(
    make_tenant: TenantMaker, member: Callable[..., User], login: Callable[[User], Client]
) -> None:
    tenant, owner = make_tenant("acme")
    viewer = member(tenant, Role.VIEWER)
    client = login(viewer)
    too_much = client.post("/t/acme/tokens/new/", {"name": "ci", "scope": "write"})
    assert too_much.status_code == 400
    assert "up to scope" in too_much.content.decode()
    created = client.post("/t/acme/tokens/new/", {"name": "ci", "scope": "read"}, follow=True)
    token = APIToken.objects.get(tenant=tenant, user=viewer)
    body = created.content.decode()
    assert f'<code id="new-token" class="secret-value">{token.prefix}_' in body
    assert all(token.prefix + "_" not in m.value for m in client.cookies.values())
    again = client.get("/t/acme/tokens/").content.decode()
    assert 'id="new-token"' not in again and token.prefix in again
    # The viewer only sees and revokes its own tokens.
    from tenants.services import Actor, create_api_token

    other, _ = create_api_token(
        tenant, owner, name="owner", scope="admin", actor=Actor.for_system("t")
    )
    assert other.prefix not in again
    assert client.post(f"/t/acme/tokens/{other.pk}/revoke/").status_code == 404
    assert client.post(f"/t/acme/tokens/{token.pk}/revoke/").status_code == 302
    token.refresh_from_db()
    assert token.state == "revoked"
    assert AuditLog.objects.filter(tenant=tenant, action="token.revoke").count() == 1


def test_invitation_accepted_by_a_new_account(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    tenant, owner = make_tenant("acme")
    client = login(owner)
    sent = client.post(
        "/t/acme/members/invite/", {"email": "new@acme.example", "role": "viewer"}, follow=True
    )
    body = sent.content.decode()
    link = body.split('<code id="invitation-link" class="secret-value">')[1].split("<")[0]
    assert "invitation-link" not in client.get("/t/acme/members/").content.decode()
    assert link.startswith("http://testserver/invitations/inv_")
    guest = Client()
    path = link.removeprefix("http://testserver")
    weak = guest.post(path, {"password": "123"})
    assert weak.status_code == 400 and "too short" in weak.content.decode()
    joined = guest.post(path, {"password": PASSWORD})
    assert joined.status_code == 302 and joined["Location"] == "/t/acme/"
    assert tenant.memberships.get(user__email="new@acme.example").role == "viewer"
    assert Invitation.objects.get(tenant=tenant).state == "accepted"
    assert guest.post(path, {"password": PASSWORD}).status_code == 410


def test_billing_page_for_billing_roles_only(
    make_tenant: TenantMaker, member: Callable[..., User], login: Callable[[User], Client]
) -> None:
    tenant, owner = make_tenant("acme", plan="team", seats=3)
    page = login(owner).get("/t/acme/billing/").content.decode()
    assert "Team" in page and "3 seats, 1 used" in page
    assert login(member(tenant, Role.DEVELOPER)).get("/t/acme/billing/").status_code == 403
    billing_member = login(member(tenant, Role.BILLING))
    assert billing_member.get("/t/acme/billing/").status_code == 200
    cap = billing_member.post("/t/acme/billing/cap/", {"cap_dollars": "1"})
    assert cap.status_code == 400
    assert "the cap must cover the seats" in cap.content.decode()
    assert billing_member.post("/t/acme/billing/cap/", {"cap_dollars": "500"}).status_code == 302
    assert "Open the billing portal" in billing_member.get("/t/acme/billing/").content.decode()
    # Stripe's return URL lands on the page.
    back = billing_member.get("/billing/acme/?checkout=success")
    assert back["Location"] == "/t/acme/billing/?checkout=success"


def test_nodes_only_for_platform_admins(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    _, owner = make_tenant("acme")
    assert login(owner).get("/nodes/").status_code == 403
    owner.is_staff = True
    owner.save()
    assert login(owner).get("/nodes/").status_code == 200


def test_every_form_needs_csrf(make_tenant: TenantMaker) -> None:
    tenant, owner = make_tenant("acme")
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    refused = client.post("/t/acme/tokens/new/", {"name": "ci", "scope": "read"})
    assert refused.status_code == 403
    assert not APIToken.objects.filter(tenant=tenant).exists()
    for url in (
        "/t/acme/",
        "/t/acme/services/new/",
        "/t/acme/jobs/new/",
        "/t/acme/members/",
        "/t/acme/tokens/",
        "/t/acme/billing/",
    ):
        body = client.get(url).content.decode()
        assert body.count('<form method="post"') <= body.count("csrfmiddlewaretoken"), url


def _pages(client: Client, slug: str) -> list[Any]:
    return [
        client.get(f"/t/{slug}/{p}")
        for p in ("", "services/", "jobs/", "images/", "members/", "tokens/", "billing/", "audit/")
    ]


def test_every_page_renders_for_the_owner(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    tenant, owner = make_tenant("acme")
    _service(tenant)
    client = login(owner)
    for response in _pages(client, "acme"):
        assert response.status_code == 200, response.request["PATH_INFO"]
    assert client.get("/t/acme/services/web/").status_code == 200
    assert "service.create" in client.get("/t/acme/audit/?action=service").content.decode()


def test_graphs_are_drawn_from_stored_readings(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from billing.services import record_container_usage
    from tenants.services import Actor
    from workloads.services.deploy import create_service

    tenant, owner = make_tenant("acme")
    service = create_service(
        tenant, name="web", data={"image": "busybox"}, replicas=1, actor=Actor.for_system("t")
    )
    container = service.containers.get()
    start = timezone.now() - timedelta(minutes=5)
    # 0.5 CPU-seconds per 10 s (50 millicores); memory 64 MiB then 96 MiB.
    for step, mib in enumerate([64, 64, 96]):
        record_container_usage(
            tenant,
            node_id="n1",
            container_id=str(container.pk),
            at=start + timedelta(seconds=10 * step),
            cpu_seconds=0.5 * step,
            memory_bytes=mib * 1024 * 1024,
        )
    body = login(owner).get("/t/acme/services/web/charts/").content.decode()
    assert f"{container.agent_name} latest 50 millicores" in body
    assert f"{container.agent_name} latest 96 MiB; peak 96 MiB" in body
    assert body.count("<polyline") == 2
    assert 'points=""' not in body


def test_volumes_and_networks(
    make_tenant: TenantMaker, member: Callable[..., User], login: Callable[[User], Client]
) -> None:
    from workloads.models import Network, Volume

    tenant, owner = make_tenant("acme", plan="team", seats=2)
    client = login(owner)
    too_big = client.post("/t/acme/volumes/new/", {"name": "data", "size_gib": "100000"})
    assert too_big.status_code == 400
    assert 'value="data"' in too_big.content.decode()
    assert not Volume.objects.filter(tenant=tenant).exists()
    assert client.post("/t/acme/volumes/new/", {"name": "data", "size_gib": "2"}).status_code == 302
    assert client.post("/t/acme/networks/new/", {"name": "backend"}).status_code == 302
    page = client.get("/t/acme/storage/").content.decode()
    assert "data" in page and "2 GiB" in page and "backend" in page
    from tenants.services import quota_report

    usage = {row["quota"]: row["used"] for row in quota_report(tenant)}
    assert usage["storage_gib"] == 2
    viewer = login(member(tenant, Role.VIEWER))
    assert "Create volume" not in viewer.get("/t/acme/storage/").content.decode()
    assert viewer.post("/t/acme/volumes/data/delete/").status_code == 403
    _, other_owner = make_tenant("other")
    assert login(other_owner).post("/t/other/volumes/data/delete/").status_code == 404
    assert client.post("/t/acme/volumes/data/delete/").status_code == 302
    assert client.post("/t/acme/networks/backend/delete/").status_code == 302
    assert not Volume.objects.filter(tenant=tenant).exists()
    assert not Network.objects.filter(tenant=tenant).exists()


def test_build_upload_and_live_log(
    make_tenant: TenantMaker, login: Callable[[User], Client], tmp_path: Any, settings: Any
) -> None:
    import io
    import tarfile

    from django.core.files.uploadedfile import SimpleUploadedFile

    from workloads.models import Build

    settings.BERTH_BUILD_CONTEXT_DIR = str(tmp_path)
    tenant, owner = make_tenant("acme")
    client = login(owner)
    not_a_tar = client.post(
        "/t/acme/builds/new/",
        {
            "tag": "web:1",
            "dockerfile": "Dockerfile",
            "context": SimpleUploadedFile("ctx.tar", b"not a tar at all"),
        },
    )
    assert not_a_tar.status_code == 400
    assert "not a readable tar archive" in not_a_tar.content.decode()
    assert 'value="web:1"' in not_a_tar.content.decode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"FROM busybox\nRUN echo built\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    created = client.post(
        "/t/acme/builds/new/",
        {
            "tag": "web:1",
            "dockerfile": "Dockerfile",
            "context": SimpleUploadedFile("ctx.tar", buffer.getvalue()),
        },
    )
    assert created.status_code == 302
    build = Build.objects.get(tenant=tenant)
    assert created["Location"] == f"/t/acme/builds/{build.pk}/"
    Build.objects.filter(pk=build.pk).update(log="Step 1/2 : FROM busybox\n")
    live = client.get(f"/t/acme/builds/{build.pk}/live/", HTTP_HX_REQUEST="true")
    assert live.status_code == 200 and "Step 1/2" in live.content.decode()
    _, other_owner = make_tenant("other")
    assert login(other_owner).get(f"/t/other/builds/{build.pk}/").status_code == 404
    assert client.post(f"/t/acme/builds/{build.pk}/cancel/").status_code == 302
    ended = client.get(f"/t/acme/builds/{build.pk}/live/", HTTP_HX_REQUEST="true")
    assert ended.status_code == 286  # htmx stops polling
    assert "cancelled" in ended.content.decode()


def test_password_reset_and_logout(make_tenant: TenantMaker) -> None:
    from django.core import mail

    make_tenant("acme")
    client = Client()
    sent = client.post("/password-reset/", {"email": "owner@acme.example"})
    assert sent.status_code == 302 and sent["Location"] == "/password-reset/sent/"
    assert len(mail.outbox) == 1
    link = next(line for line in mail.outbox[0].body.splitlines() if "/password-reset/" in line)
    path = link.strip().split("testserver", 1)[1]
    form = client.get(path, follow=True)
    assert "Choose a new password" in form.content.decode()
    done = client.post(
        form.redirect_chain[-1][0],
        {"new_password1": "an0ther-Long-passw0rd", "new_password2": "an0ther-Long-passw0rd"},
    )
    assert done.status_code == 302 and done["Location"] == "/password-reset/complete/"
    logged_in = client.post(
        "/login/", {"username": "owner@acme.example", "password": "an0ther-Long-passw0rd"}
    )
    assert logged_in.status_code == 302
    assert client.get("/t/acme/").status_code == 200
    assert client.post("/logout/")["Location"] == "/login/"
    assert client.get("/t/acme/").status_code == 302


def test_switcher_lists_only_my_organisations(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    _, owner = make_tenant("first")
    second, _ = make_tenant("second")
    make_tenant("stranger")
    from tenants.models import Membership

    Membership.objects.create(tenant=second, user=owner, role=Role.DEVELOPER)
    page = login(owner).get("/t/second/").content.decode()
    switcher = page.split('id="tenant-switcher"')[1].split("</select>")[0]
    assert 'value="/t/first/"' in switcher and 'value="/t/second/" selected' in switcher
    assert "stranger" not in switcher
    assert "developer" in page  # the role in this organisation


def test_roles_are_changed_within_what_the_actor_may_assign(
    make_tenant: TenantMaker, member: Callable[..., User], login: Callable[[User], Client]
) -> None:
    from tenants.models import Membership

    tenant, owner = make_tenant("acme")
    admin = member(tenant, Role.ADMIN)
    developer = member(tenant, Role.DEVELOPER)
    dev_membership = Membership.objects.get(tenant=tenant, user=developer)
    as_admin = login(admin)
    page = as_admin.get("/t/acme/members/").content.decode()
    assert '<option value="owner"' not in page  # admins cannot hand out owner
    refused = as_admin.post(
        f"/t/acme/members/{dev_membership.pk}/role/", {"role": "owner"}, follow=True
    )
    assert "owner" not in Membership.objects.get(pk=dev_membership.pk).role
    assert refused.status_code == 200
    as_admin.post(f"/t/acme/members/{dev_membership.pk}/role/", {"role": "viewer"})
    assert Membership.objects.get(pk=dev_membership.pk).role == "viewer"
    # A developer manages nobody.
    as_dev = login(developer)
    assert "Change role" not in as_dev.get("/t/acme/members/").content.decode()
    owner_membership = Membership.objects.get(tenant=tenant, user=owner)
    assert as_dev.post(f"/t/acme/members/{owner_membership.pk}/remove/").status_code == 403


def test_service_stop_start_and_delete(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    tenant, owner = make_tenant("acme")
    _service(tenant)
    client = login(owner)
    assert client.post("/t/acme/services/web/stop/").status_code == 302
    assert Service.objects.get(tenant=tenant, name="web").state == "stopped"
    again = client.post("/t/acme/services/web/stop/", follow=True)
    assert again.status_code == 200
    assert client.post("/t/acme/services/web/start/").status_code == 302
    conflict = client.post("/t/acme/services/web/start/", follow=True).content.decode()
    assert "is not stopped" in conflict
    assert client.post("/t/acme/services/web/explode/").status_code == 404
    deleted = client.post("/t/acme/services/web/delete/")
    assert deleted["Location"] == "/t/acme/services/"
    assert client.get("/t/acme/services/web/").status_code == 404
    actions = list(
        AuditLog.objects.filter(tenant=tenant, action__startswith="service.")
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions[-3:] == ["service.stop", "service.start", "service.delete"]


def test_platform_admin_cordons_a_node(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    from tenants.services import Actor
    from workloads.models import Node
    from workloads.services.nodes import create_join_token, join_node

    _, secret = create_join_token(actor=Actor.for_system("t"))
    node, _ = join_node(
        secret, name="n1", capacity={"cpu_millicores": 1000, "memory_mib": 1024}, labels={}
    )
    _, owner = make_tenant("acme")
    client = login(owner)
    assert client.post(f"/nodes/{node.pk}/state/", {"state": "cordoned"}).status_code == 403
    owner.is_staff = True
    owner.save()
    client = login(owner)
    page = client.get("/nodes/").content.decode()
    assert 'Cordoned<span class="sr-only"> n1</span>' in page
    assert 'Draining<span class="sr-only"> n1</span>' in page
    assert client.post(f"/nodes/{node.pk}/state/", {"state": "cordoned"}).status_code == 302
    assert Node.objects.get(pk=node.pk).state == "cordoned"
    bad = client.post(f"/nodes/{node.pk}/state/", {"state": "down"}, follow=True)
    assert "cannot become down" in bad.content.decode()


def test_a_signed_in_invitee_accepts_with_one_click(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    from tenants.services import Actor, invite_member

    tenant, _ = make_tenant("acme")
    _, someone = make_tenant("other")  # owner@other.example has an account already
    _, key = invite_member(
        tenant, someone.email, Role.DEVELOPER, actor=Actor.for_system("t"), actor_role=None
    )
    stranger = login(make_tenant("third")[1])
    wrong = stranger.get(f"/invitations/{key}/").content.decode()
    assert 'name="password"' in wrong  # not the invitee: must prove the invited account
    client = login(someone)
    page = client.get(f"/invitations/{key}/").content.decode()
    assert "Join acme" in page and 'name="password"' not in page
    joined = client.post(f"/invitations/{key}/")
    assert joined["Location"] == "/t/acme/"
    assert tenant.memberships.get(user=someone).role == "developer"
    assert Client().get("/invitations/inv_unknown/").status_code == 404


def test_a_repeat_while_the_first_is_in_flight_goes_back_to_the_form(
    make_tenant: TenantMaker, login: Callable[[User], Client]
) -> None:
    from django.core.cache import cache

    tenant, owner = make_tenant("acme")
    client = login(owner)
    token = uuid.uuid4().hex
    cache.add(f"dashboard:once:{owner.pk}:{token}", "", 60)  # the first is still running
    repeat = client.post(
        "/t/acme/jobs/new/",
        {"image": "busybox", "idem": token},
        HTTP_REFERER="http://testserver/t/acme/jobs/new/",
    )
    assert repeat["Location"] == "http://testserver/t/acme/jobs/new/"
    assert not BatchJob.objects.filter(tenant=tenant).exists()
    elsewhere = client.post(
        "/t/acme/jobs/new/", {"image": "busybox", "idem": token}, HTTP_REFERER="http://evil/"
    )
    assert elsewhere["Location"] == "/"
