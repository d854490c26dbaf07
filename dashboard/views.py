"""Dashboard pages. Views only translate HTTP: they parse forms, call the same services
the API calls (tenants.services, billing.services, workloads.services) and render.

Tenant pages go through :func:`dashboard.access.tenant_page` (membership, role
permission, 404 for other tenants); writes are POST views wrapped in
:func:`dashboard.access.once` so a double-submitted form acts once.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.core import signing
from django.core.exceptions import PermissionDenied
from django.core.mail import send_mail
from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing import services as billing
from billing import stripe_api
from billing.models import Plan
from dashboard import forms as f
from dashboard import queries
from dashboard.access import can, is_htmx, new_idem, once, signed_in, tenant_page
from registry.models import Repository
from tenants import permissions as perms
from tenants import services as tenant_services
from tenants.api import throttling
from tenants.choices import Role
from tenants.errors import BerthError
from tenants.models import APIToken, AuditLog, Invitation, Membership, Tenant, User
from tenants.services import Actor
from workloads.choices import ContainerState, JobState, ServiceState
from workloads.models import BatchJob, Build, Network, Node, Service, Volume
from workloads.services import builds, deploy, jobs, storage
from workloads.services import nodes as nodes_service

# --------------------------------------------------------------------------- helpers


def _page(
    request: HttpRequest, template: str, context: dict[str, Any], status: int = 200
) -> HttpResponse:
    tenant = getattr(request, "tenant", None)
    base: dict[str, Any] = {"tenant": tenant, "role": getattr(request, "role", None)}
    if request.user.is_authenticated:
        base["my_tenants"] = Tenant.objects.for_user(request.user).order_by("slug")
        if tenant is not None:
            base["perm"] = {
                p.split(".")[0] + "_" + p.split(".")[1]: can(request, p)
                for p in (
                    perms.WORKLOADS_MANAGE,
                    perms.MEMBERS_MANAGE,
                    perms.INVITATIONS_MANAGE,
                    perms.BILLING_VIEW,
                    perms.BILLING_MANAGE,
                    perms.AUDIT_VIEW,
                    perms.TOKENS_MANAGE_ALL,
                )
            }
    base.update(context)
    return render(request, template, base, status=status)


#: Session key of a secret to show once (a new token, an invitation link): popped by the
#: next page of the same tenant that renders it, never put in a cookie or a message.
NEW_SECRET_KEY = "dashboard_new_secret"  # noqa: S105 (a session key name, not a secret)


def _pop_secret(request: HttpRequest, tenant: Tenant, kind: str) -> str | None:
    held = request.session.get(NEW_SECRET_KEY)
    if not held or held.get("tenant") != tenant.slug or kind not in held:
        return None
    del request.session[NEW_SECRET_KEY]
    return str(held[kind])


def _form(cls: type[f.IdemForm], request: HttpRequest | None = None, **kwargs: Any) -> Any:
    """A form bound to the POST (keeps what was typed) or fresh with a new idem token."""
    if request is not None and request.method == "POST":
        return cls(request.POST, **kwargs)
    initial = {**kwargs.pop("initial", {}), "idem": new_idem()}
    return cls(initial=initial, **kwargs)


def _refresh_idem(form: Any) -> Any:
    """A form re-shown with errors gets a fresh token (the used one was freed anyway)."""
    data = form.data.copy()
    data["idem"] = new_idem()
    form.data = data
    return form


def _t(name: str, tenant: Tenant, *args: Any) -> str:
    return reverse(f"dashboard:{name}", args=[tenant.slug, *args])


# --------------------------------------------------------------------------- accounts


def home(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return redirect("dashboard:login")
    slug = request.session.get("dashboard_tenant")
    mine = Tenant.objects.for_user(request.user)
    tenant = mine.filter(slug=slug).first() if slug else None
    tenant = tenant or mine.order_by("slug").first()
    if tenant is None:
        if request.user.is_staff:
            return redirect("dashboard:nodes")
        return _page(request, "dashboard/no_tenant.html", {})
    return redirect("dashboard:overview", tenant.slug)


class LoginView(auth_views.LoginView):
    template_name = "dashboard/auth/login.html"
    authentication_form = f.LoginForm
    redirect_authenticated_user = True


def signup(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return _signup_post(request)
    return _page(request, "dashboard/auth/signup.html", {"form": _form(f.SignupForm)})


@once
def _signup_post(request: HttpRequest) -> HttpResponse:
    form = f.SignupForm(request.POST)
    # Every attempt counts against the address, refused ones too (#27 item 7): sign-ups
    # are neither a free slug/email oracle nor a way to mint tenants in bulk.
    wait = throttling.hit(
        f"signup:{throttling.client_address(request)}",
        settings.BERTH_SIGNUPS_PER_ADDRESS_HOUR,
        window_seconds=3600,
    )
    if wait is not None:
        form.is_valid()
        form.add_error(
            None, f"Too many sign-ups from your address: try again in {int(wait) // 60 + 1} min."
        )
        response = _page(request, "dashboard/auth/signup.html", {"form": _refresh_idem(form)}, 429)
        response["Retry-After"] = str(int(wait))
        return response
    if form.is_valid():
        d = form.cleaned_data
        existing = User.objects.filter(email__iexact=d["email"]).first()
        if existing is not None:
            # The same answer as a new sign-up; only the mailbox's owner learns more.
            _send_signup_email(request, d["email"], None)
            return redirect("dashboard:signup_sent")
        try:
            _tenant, owner = tenant_services.create_tenant(
                slug=d["slug"],
                name=d["organisation"],
                owner_email=d["email"],
                owner_password=d["password"],
                actor=Actor(system="signup", ip=request.META.get("REMOTE_ADDR")),
            )
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            # Inactive (no sign-in) until the link sent to the address is opened.
            owner.is_active = False
            owner.save(update_fields=["is_active"])
            _send_signup_email(request, owner.email, owner)
            return redirect("dashboard:signup_sent")
    return _page(request, "dashboard/auth/signup.html", {"form": _refresh_idem(form)}, 400)


#: Signs the email-verification links of sign-ups (valid SIGNUP_LINK_MAX_AGE seconds).
SIGNUP_SALT = "berth.dashboard.signup-verify"
SIGNUP_LINK_MAX_AGE = 3 * 24 * 3600


def _send_signup_email(request: HttpRequest, email: str, owner: User | None) -> None:
    """The verification link for a new account, or, for an address that has an account
    already, a note saying so (the sign-up page answered both the same way)."""
    if owner is None:
        subject = "Your Berth account"
        body = (
            "Someone (you?) tried to sign up for Berth with this address, which has an "
            f"account already. Log in at {request.build_absolute_uri(reverse('dashboard:login'))}"
            " or reset your password there. If it was not you, ignore this message."
        )
    else:
        token = signing.dumps({"u": owner.pk, "e": owner.email}, salt=SIGNUP_SALT)
        link = request.build_absolute_uri(reverse("dashboard:signup_verify", args=[token]))
        subject = "Confirm your Berth sign-up"
        body = (
            f"Open this link to confirm your address and sign in (valid for 3 days):\n\n"
            f"    {link}\n\nIf you did not sign up for Berth, ignore this message."
        )
    send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [email])


def signup_sent(request: HttpRequest) -> HttpResponse:
    return _page(request, "dashboard/auth/signup_sent.html", {})


def signup_verify(request: HttpRequest, token: str) -> HttpResponse:
    """The link in the sign-up email: activate the account (once) and sign in."""
    try:
        data = signing.loads(token, salt=SIGNUP_SALT, max_age=SIGNUP_LINK_MAX_AGE)
        user = User.objects.get(pk=data["u"], email=data["e"])
    except (signing.BadSignature, KeyError, TypeError, User.DoesNotExist):
        user = None
    # Only an account never used: an old link never re-activates one an admin deactivated.
    if user is None or user.is_active or user.last_login is not None:
        problem = "This link is invalid, expired or used already: log in, or sign up again."
        return _page(request, "dashboard/auth/signup_sent.html", {"problem": problem}, 400)
    user.is_active = True
    user.save(update_fields=["is_active"])
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    tenant = Tenant.objects.for_user(user).order_by("pk").first()
    if tenant is None:
        return redirect("dashboard:home")
    messages.success(request, f"Welcome to Berth: {tenant.name} is ready.")
    return redirect("dashboard:overview", tenant.slug)


def accept_invitation(request: HttpRequest, key: str) -> HttpResponse:
    """The link in an invitation email: join (logged in as the invitee) or set a password."""
    try:
        invitation = tenant_services.find_invitation(key)
    except BerthError as exc:
        return _page(request, "dashboard/auth/invitation.html", {"problem": exc.message}, 404)
    form = _form(f.AcceptInvitationForm, request)
    context: dict[str, Any] = {"invitation": invitation, "form": form}
    if invitation.state != "pending":
        context["problem"] = f"This invitation is {invitation.state}."
        return _page(request, "dashboard/auth/invitation.html", context, 410)
    if request.method == "POST":
        user = request.user if request.user.is_authenticated else None
        try:
            if user is not None and user.email.lower() == invitation.email.lower():
                tenant_services.accept_invitation(key, user, actor=Actor.from_request(request))
            else:
                if not form.is_valid():
                    raise _FormInvalid
                membership, _ = tenant_services.accept_invitation_with_password(
                    key, form.cleaned_data["password"], ip=request.META.get("REMOTE_ADDR")
                )
                user = membership.user
                login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        except _FormInvalid:
            pass
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            messages.success(request, f"You joined {invitation.tenant.name}.")
            return redirect("dashboard:overview", invitation.tenant.slug)
        return _page(request, "dashboard/auth/invitation.html", context, 400)
    return _page(request, "dashboard/auth/invitation.html", context)


class _FormInvalid(Exception):
    pass


# --------------------------------------------------------------------------- overview


@tenant_page(perms.TENANT_VIEW)
def overview(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    services = (
        Service.objects.for_tenant(tenant)
        .exclude(state=ServiceState.DELETED)
        .annotate(running=Count("containers", filter=Q(containers__state=ContainerState.RUNNING)))
    )
    active_jobs = BatchJob.objects.for_tenant(tenant).filter(
        state__in=[JobState.QUEUED, JobState.RUNNING]
    )
    quotas = [
        {**row, "percent": min(100, round(100 * row["used"] / row["limit"])) if row["limit"] else 0}
        for row in tenant_services.quota_report(tenant)
        if not row["per_container"]
    ]
    estimate = billing.estimate(tenant) if can(request, perms.BILLING_VIEW) else None
    return _page(
        request,
        "dashboard/overview.html",
        {"services": services, "jobs": active_jobs[:20], "quotas": quotas, "estimate": estimate},
    )


# --------------------------------------------------------------------------- services


def _service(tenant: Tenant, name: str) -> Service:
    return get_object_or_404(
        Service.objects.for_tenant(tenant).exclude(state=ServiceState.DELETED), name=name
    )


@tenant_page(perms.WORKLOADS_VIEW)
def services(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    rows = (
        Service.objects.for_tenant(tenant)
        .exclude(state=ServiceState.DELETED)
        .annotate(running=Count("containers", filter=Q(containers__state=ContainerState.RUNNING)))
    )
    return _page(request, "dashboard/services.html", {"services": rows})


@tenant_page(perms.WORKLOADS_MANAGE, methods=("GET", "POST"))
@once
def service_new(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = _form(f.ServiceForm, request)
    if request.method == "POST":
        if form.is_valid():
            try:
                service = deploy.create_service(
                    tenant,
                    name=form.cleaned_data["name"],
                    data=form.spec(),
                    replicas=form.cleaned_data["replicas"],
                    actor=request.actor,  # type: ignore[attr-defined]
                )
            except BerthError as exc:
                f.add_service_error(form, exc)
            else:
                messages.success(request, f"Service {service.name} created.")
                return redirect(_t("service", tenant, service.name))
        return _page(request, "dashboard/service_new.html", {"form": _refresh_idem(form)}, 400)
    return _page(request, "dashboard/service_new.html", {"form": form})


def _service_page(
    request: HttpRequest,
    service: Service,
    *,
    deploy_form: Any = None,
    scale_form: Any = None,
    status: int = 200,
) -> HttpResponse:
    cpu, memory = queries.usage_charts(service)
    return _page(
        request,
        "dashboard/service.html",
        {
            "service": service,
            "containers": queries.live_containers(service),
            "deployments": service.deployments.all()[:5],
            "cpu_chart": cpu,
            "memory_chart": memory,
            "deploy_form": deploy_form
            or _form(
                f.DeployForm,
                initial={
                    "image": service.image,
                    "command": f.format_command(service.command),
                    "env": f.format_pairs(service.env),
                },
            ),
            "scale_form": scale_form or _form(f.ScaleForm, initial={"replicas": service.replicas}),
            "restart_idem": new_idem(),
        },
        status,
    )


@tenant_page(perms.WORKLOADS_VIEW)
def service(request: HttpRequest, tenant: Tenant, name: str) -> HttpResponse:
    return _service_page(request, _service(tenant, name))


@tenant_page(perms.WORKLOADS_VIEW)
def service_status(request: HttpRequest, tenant: Tenant, name: str) -> HttpResponse:
    """htmx fragment: replicas and their states, polled every few seconds."""
    svc = _service(tenant, name)
    return render(
        request,
        "dashboard/partials/service_status.html",
        {
            "tenant": tenant,
            "service": svc,
            "containers": queries.live_containers(svc),
            "deployments": svc.deployments.all()[:5],
        },
    )


@tenant_page(perms.WORKLOADS_VIEW)
def service_logs(request: HttpRequest, tenant: Tenant, name: str) -> HttpResponse:
    """htmx fragment: the last lines of every replica."""
    lines, problems = queries.service_logs(_service(tenant, name))
    return render(request, "dashboard/partials/logs.html", {"lines": lines, "problems": problems})


@tenant_page(perms.WORKLOADS_VIEW)
def service_charts(request: HttpRequest, tenant: Tenant, name: str) -> HttpResponse:
    cpu, memory = queries.usage_charts(_service(tenant, name))
    return render(
        request, "dashboard/partials/charts.html", {"cpu_chart": cpu, "memory_chart": memory}
    )


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def service_deploy(request: HttpRequest, tenant: Tenant, name: str) -> HttpResponse:
    svc = _service(tenant, name)
    form = f.DeployForm(request.POST)
    if form.is_valid():
        try:
            deployment = deploy.deploy_service(svc, form.spec(), actor=request.actor)  # type: ignore[attr-defined]
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            messages.success(request, f"Deploying generation {deployment.generation}.")
            return redirect(_t("service", tenant, svc.name))
    return _service_page(request, svc, deploy_form=_refresh_idem(form), status=400)


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def service_scale(request: HttpRequest, tenant: Tenant, name: str) -> HttpResponse:
    svc = _service(tenant, name)
    form = f.ScaleForm(request.POST)
    if form.is_valid():
        try:
            svc = deploy.scale_service(svc, form.cleaned_data["replicas"], actor=request.actor)  # type: ignore[attr-defined]
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            messages.success(request, f"Scaled {svc.name} to {svc.replicas} replica(s).")
            return redirect(_t("service", tenant, svc.name))
    return _service_page(request, svc, scale_form=_refresh_idem(form), status=400)


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def service_action(request: HttpRequest, tenant: Tenant, name: str, action: str) -> HttpResponse:
    svc = _service(tenant, name)
    handlers = {
        "restart": deploy.restart_service,
        "stop": deploy.stop_service,
        "start": deploy.start_service,
        "delete": deploy.delete_service,
    }
    if action not in handlers:
        raise Http404(action)
    try:
        handlers[action](svc, actor=request.actor)  # type: ignore[attr-defined]
    except BerthError as exc:
        messages.error(request, exc.message)
        return redirect(_t("service", tenant, svc.name))
    messages.success(request, f"{action.capitalize()}: {svc.name}.")
    if action == "delete":
        return redirect(_t("services", tenant))
    return redirect(_t("service", tenant, svc.name))


# --------------------------------------------------------------------------- jobs


def _job(tenant: Tenant, pk: int) -> BatchJob:
    return get_object_or_404(BatchJob.objects.for_tenant(tenant), pk=pk)


@tenant_page(perms.WORKLOADS_VIEW)
def job_list(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    rows = BatchJob.objects.for_tenant(tenant).order_by("-created_at")[:100]
    return _page(request, "dashboard/jobs.html", {"jobs": rows})


@tenant_page(perms.WORKLOADS_MANAGE, methods=("GET", "POST"))
@once
def job_new(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = _form(f.JobForm, request)
    if request.method == "POST":
        if form.is_valid():
            try:
                job = jobs.submit_job(tenant, form.spec(), actor=request.actor)  # type: ignore[attr-defined]
            except BerthError as exc:
                f.add_service_error(form, exc)
            else:
                messages.success(request, f"Job {job.name} submitted.")
                return redirect(_t("job", tenant, job.pk))
        return _page(request, "dashboard/job_new.html", {"form": _refresh_idem(form)}, 400)
    return _page(request, "dashboard/job_new.html", {"form": form})


def _job_context(request: HttpRequest, job: BatchJob, index: int) -> dict[str, Any]:
    return {
        "can_manage": can(request, perms.WORKLOADS_MANAGE),
        "cancel_idem": new_idem(),
        "job": job,
        "counts": jobs.job_counts(job),
        "runs": job.runs.order_by("index", "-attempt")[:200],
        "index": index,
        "logs": queries.job_logs(job, index),
        "finished": job.state not in (JobState.QUEUED, JobState.RUNNING),
    }


def _index(request: HttpRequest, job: BatchJob) -> int:
    try:
        index = int(request.GET.get("index", "0"))
    except ValueError:
        return 0
    return index if 0 <= index < job.array_size else 0


@tenant_page(perms.WORKLOADS_VIEW)
def job(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    item = _job(tenant, pk)
    context = _job_context(request, item, _index(request, item))
    return _page(request, "dashboard/job.html", context)


@tenant_page(perms.WORKLOADS_VIEW)
def job_live(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    item = _job(tenant, pk)
    context = {"tenant": tenant, **_job_context(request, item, _index(request, item))}
    response = render(request, "dashboard/partials/job_live.html", context)
    if context["finished"]:
        response.status_code = 286  # htmx: swap this last state, then stop polling
    return response


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def job_cancel(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    item = _job(tenant, pk)
    try:
        jobs.cancel_job(item, actor=request.actor)  # type: ignore[attr-defined]
    except BerthError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Job {item.name} cancelled.")
    return redirect(_t("job", tenant, item.pk))


# --------------------------------------------------------------------------- images, nodes


@tenant_page(perms.WORKLOADS_VIEW)
def images(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    repos = (
        Repository.objects.for_tenant(tenant).prefetch_related("tags__manifest").order_by("name")
    )
    return _page(request, "dashboard/images.html", {"repositories": repos})


@signed_in
def nodes(request: HttpRequest) -> HttpResponse:
    """The fleet: platform admins only (the API's ``PlatformAdminOnly``)."""
    if not request.user.is_staff:
        return refused(request, PermissionDenied("Nodes are for platform admins only."))
    rows = Node.objects.annotate(
        running=Count("containers", filter=Q(containers__state=ContainerState.RUNNING))
    ).order_by("name")
    return _page(
        request,
        "dashboard/nodes.html",
        {"nodes": rows, "transitions": nodes_service.ADMIN_TRANSITIONS, "idem": new_idem()},
    )


@signed_in
@require_POST
@once
def node_state(request: HttpRequest, pk: str) -> HttpResponse:
    """Cordon, drain or make ready (platform admins), through ``set_node_state``."""
    if not request.user.is_staff:
        return refused(request, PermissionDenied("Nodes are for platform admins only."))
    node = get_object_or_404(Node, pk=pk)
    try:
        nodes_service.set_node_state(
            node, request.POST.get("state", ""), actor=Actor.from_request(request)
        )
    except BerthError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Node {node.name} is now {request.POST['state']}.")
    return redirect("dashboard:nodes")


# --------------------------------------------------------------------------- members


def _members_page(
    request: HttpRequest, tenant: Tenant, *, invite_form: Any = None, status: int = 200
) -> HttpResponse:
    members = Membership.objects.for_tenant(tenant).select_related("user").order_by("id")
    invitations = Invitation.objects.for_tenant(tenant).filter(
        accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
    )
    roles = _assignable(request)
    return _page(
        request,
        "dashboard/members.html",
        {
            "members": members,
            "invitations": invitations,
            "invite_form": invite_form or _form(f.InviteForm, roles=roles),
            "roles": roles,
            "new_invitation_link": _pop_secret(request, tenant, "invitation"),
            "seats_after_release": _seats_after_release(request, tenant),
            "idem": new_idem(),
        },
        status,
    )


def _seats_after_release(request: HttpRequest, tenant: Tenant) -> int | None:
    """The seat count the remove form's "drop the freed seat" box leads to; None hides
    the box (the role may not change billing, or no seat would be dropped)."""
    if not billing.may_change_seats(request.role):  # type: ignore[attr-defined]
        return None
    after = billing.seats_after_releasing_one_member(tenant)
    return after if after < tenant.seats else None


def _assignable(request: HttpRequest) -> list[tuple[str, str]]:
    allowed = perms.ASSIGNABLE_ROLES.get(request.role, frozenset())  # type: ignore[attr-defined]
    return [(value, label) for value, label in Role.choices if value in allowed]


@tenant_page(perms.MEMBERS_VIEW)
def members(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    return _members_page(request, tenant)


@tenant_page(perms.INVITATIONS_MANAGE, methods=("POST",))
@once
def invite(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = f.InviteForm(request.POST, roles=_assignable(request))
    if form.is_valid():
        try:
            invitation, key = tenant_services.invite_member(
                tenant,
                form.cleaned_data["email"],
                form.cleaned_data["role"],
                actor=request.actor,  # type: ignore[attr-defined]
                actor_role=request.role,  # type: ignore[attr-defined]
            )
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            link = request.build_absolute_uri(reverse("dashboard:accept", args=[key]))
            request.session[NEW_SECRET_KEY] = {"tenant": tenant.slug, "invitation": link}
            messages.success(request, f"Invitation sent to {invitation.email}.")
            return redirect(_t("members", tenant))
    return _members_page(request, tenant, invite_form=_refresh_idem(form), status=400)


@tenant_page(perms.INVITATIONS_MANAGE, methods=("POST",))
@once
def invitation_revoke(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    invitation = get_object_or_404(Invitation.objects.for_tenant(tenant), pk=pk)
    try:
        tenant_services.revoke_invitation(invitation, actor=request.actor)  # type: ignore[attr-defined]
    except BerthError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Invitation of {invitation.email} revoked.")
    return redirect(_t("members", tenant))


@tenant_page(perms.MEMBERS_MANAGE, methods=("POST",))
@once
def member_role(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    membership = get_object_or_404(Membership.objects.for_tenant(tenant), pk=pk)
    form = f.RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose a role.")
        return redirect(_t("members", tenant))
    try:
        tenant_services.change_role(
            membership,
            form.cleaned_data["role"],
            actor=request.actor,  # type: ignore[attr-defined]
            actor_role=request.role,  # type: ignore[attr-defined]
        )
    except BerthError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"{membership.user.email} is now {form.cleaned_data['role']}.")
    return redirect(_t("members", tenant))


@tenant_page(perms.MEMBERS_MANAGE, methods=("POST",))
@once
def member_remove(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    """Remove a member; with the "drop the freed seat" box ticked, also release their seat
    (both or neither, as ``DELETE …/members/<id>/?release_seat=true``)."""
    membership = get_object_or_404(Membership.objects.for_tenant(tenant), pk=pk)
    form = f.MemberRemoveForm(request.POST)
    release = form.is_valid() and form.cleaned_data["release_seat"]
    actor, role = request.actor, request.role  # type: ignore[attr-defined]
    email = membership.user.email
    try:
        if release:
            outcome = billing.remove_member_releasing_seat(membership, actor=actor, actor_role=role)
        else:
            tenant_services.remove_member(membership, actor=actor, actor_role=role)
    except BerthError as exc:
        messages.error(request, exc.message)
    else:
        if not release:
            messages.success(request, f"{email} removed.")
        elif outcome.released:
            messages.success(
                request, f"{email} removed; seats {outcome.previous_seats} → {outcome.seats}."
            )
        else:
            messages.success(
                request,
                f"{email} removed; seats stay at {outcome.seats} (the plan minimum, comped "
                "seats or open invitations need them).",
            )
    return redirect(_t("members", tenant))


# --------------------------------------------------------------------------- tokens


def _visible_tokens(request: HttpRequest, tenant: Tenant) -> Any:
    rows = APIToken.objects.for_tenant(tenant).select_related("user").order_by("-id")
    if not can(request, perms.TOKENS_MANAGE_ALL):
        rows = rows.filter(user=request.user)
    return rows


def _tokens_page(
    request: HttpRequest, tenant: Tenant, *, form: Any = None, status: int = 200
) -> HttpResponse:
    return _page(
        request,
        "dashboard/tokens.html",
        {
            "tokens": _visible_tokens(request, tenant)[:200],
            "form": form or _form(f.TokenForm),
            "max_scope": perms.MAX_TOKEN_SCOPE[request.role],  # type: ignore[attr-defined]
            "new_token": _pop_secret(request, tenant, "token"),
            "idem": new_idem(),
        },
        status,
    )


@tenant_page(perms.TOKENS_MANAGE_OWN)
def tokens(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    return _tokens_page(request, tenant)


@tenant_page(perms.TOKENS_MANAGE_OWN, methods=("POST",))
@once
def token_create(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = f.TokenForm(request.POST)
    if form.is_valid():
        days = form.cleaned_data["expires_days"]
        try:
            token, secret = tenant_services.create_api_token(
                tenant,
                request.user,  # type: ignore[arg-type]
                name=form.cleaned_data["name"],
                scope=form.cleaned_data["scope"],
                expires_at=timezone.now() + timedelta(days=days) if days else None,
                actor=request.actor,  # type: ignore[attr-defined]
            )
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            # Shown once: kept server-side in the session until the next tokens page pops it.
            request.session[NEW_SECRET_KEY] = {"tenant": tenant.slug, "token": secret}
            messages.success(request, f"Token {token.prefix}… created.")
            return redirect(_t("tokens", tenant))
    return _tokens_page(request, tenant, form=_refresh_idem(form), status=400)


@tenant_page(perms.TOKENS_MANAGE_OWN, methods=("POST",))
@once
def token_revoke(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    token = get_object_or_404(_visible_tokens(request, tenant), pk=pk)
    tenant_services.revoke_api_token(token, actor=request.actor)  # type: ignore[attr-defined]
    messages.success(request, f"Token {token.prefix}… revoked.")
    return redirect(_t("tokens", tenant))


# --------------------------------------------------------------------------- billing


def _billing_url(request: HttpRequest, tenant: Tenant, query: str = "") -> str:
    return request.build_absolute_uri(_t("billing", tenant)) + query


def _paid_plans() -> list[tuple[str, str]]:
    return [
        (p.code, f"{p.name} — ${p.seat_price_cents / 100:.0f}/seat/month")
        for p in Plan.objects.filter(is_public=True, seat_price_cents__gt=0).order_by("sort_order")
    ]


def _billing_page(
    request: HttpRequest,
    tenant: Tenant,
    *,
    checkout_form: Any = None,
    seats_form: Any = None,
    cap_form: Any = None,
    status: int = 200,
) -> HttpResponse:
    account = billing.account_for(tenant)
    invoices: list[dict[str, Any]] = []
    invoice_problem = ""
    if account.stripe_customer_id:
        try:
            invoices = stripe_api.list_invoices(account.stripe_customer_id)
        except (stripe_api.StripeUnavailable, stripe_api.StripeRequestError) as exc:
            invoice_problem = f"Invoices are unavailable right now: {exc}"
    cap = account.spend_cap_cents
    return _page(
        request,
        "dashboard/billing.html",
        {
            "account": account,
            "members_count": tenant.memberships.count(),
            "estimate": billing.estimate(tenant),
            "invoices": invoices,
            "invoice_problem": invoice_problem,
            "checkout_form": checkout_form
            or _form(
                f.CheckoutForm,
                plans=_paid_plans(),
                initial={"seats": max(tenant.seats, tenant.memberships.count())},
            ),
            "seats_form": seats_form or _form(f.SeatsForm, initial={"seats": tenant.seats}),
            "cap_form": cap_form
            or _form(
                f.SpendCapForm,
                initial={"cap_dollars": Decimal(cap) / 100 if cap is not None else None},
            ),
            "portal_idem": new_idem(),
            "checkout_state": request.GET.get("checkout", ""),
        },
        status,
    )


@tenant_page(perms.BILLING_VIEW)
def billing_page(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    return _billing_page(request, tenant)


def billing_return(request: HttpRequest, slug: str) -> HttpResponse:
    """Stripe sends people back to ``/billing/<slug>/`` (billing's URLs): show the page."""
    query = request.META.get("QUERY_STRING", "")
    return HttpResponseRedirect(
        reverse("dashboard:billing", args=[slug]) + (f"?{query}" if query else "")
    )


@tenant_page(perms.BILLING_MANAGE, methods=("POST",))
@once
def billing_checkout(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = f.CheckoutForm(request.POST, plans=_paid_plans())
    if form.is_valid():
        try:
            session = billing.start_checkout(
                tenant,
                form.cleaned_data["plan"],
                form.cleaned_data["seats"],
                actor=request.actor,  # type: ignore[attr-defined]
                success_url=_billing_url(request, tenant, "?checkout=success"),
                cancel_url=_billing_url(request, tenant, "?checkout=canceled"),
            )
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            return HttpResponseRedirect(session["url"])
    return _billing_page(request, tenant, checkout_form=_refresh_idem(form), status=400)


@tenant_page(perms.BILLING_MANAGE, methods=("POST",))
@once
def billing_seats(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = f.SeatsForm(request.POST)
    if form.is_valid():
        try:
            billing.change_seats(tenant, form.cleaned_data["seats"], actor=request.actor)  # type: ignore[attr-defined]
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            messages.success(request, f"Seats: {form.cleaned_data['seats']}.")
            return redirect(_t("billing", tenant))
    return _billing_page(request, tenant, seats_form=_refresh_idem(form), status=400)


@tenant_page(perms.BILLING_MANAGE, methods=("POST",))
@once
def billing_cap(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = f.SpendCapForm(request.POST)
    if form.is_valid():
        dollars = form.cleaned_data["cap_dollars"]
        cents = int(dollars * 100) if dollars is not None else None
        try:
            billing.set_spend_cap(tenant, cents, actor=request.actor)  # type: ignore[attr-defined]
        except BerthError as exc:
            exc.details = {**(exc.details or {}), "field": "cap_dollars"}
            f.add_service_error(form, exc)
        else:
            messages.success(request, "Spend cap saved.")
            return redirect(_t("billing", tenant))
    return _billing_page(request, tenant, cap_form=_refresh_idem(form), status=400)


@tenant_page(perms.BILLING_MANAGE, methods=("POST",))
def billing_portal(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    try:
        url = billing.portal_link(tenant, return_url=_billing_url(request, tenant))
    except BerthError as exc:
        messages.error(request, exc.message)
        return redirect(_t("billing", tenant))
    return HttpResponseRedirect(url)


# --------------------------------------------------------------------------- audit


@tenant_page(perms.AUDIT_VIEW)
def audit(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    rows = AuditLog.objects.for_tenant(tenant)
    action = request.GET.get("action", "").strip()
    if action:
        rows = rows.filter(action__startswith=action)
    return _page(request, "dashboard/audit.html", {"rows": rows[:200], "action": action})


# --------------------------------------------------------------------------- errors


def refused(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """403 page for dashboard URLs (the role may not do this)."""
    if is_htmx(request):
        return HttpResponse(str(exception or "Refused"), status=403)
    return render(
        request,
        "dashboard/refused.html",
        {"message": str(exception) if exception else "You may not do this."},
        status=403,
    )


# --------------------------------------------------------------------------- volumes, networks


def _storage_page(
    request: HttpRequest,
    tenant: Tenant,
    *,
    volume_form: Any = None,
    network_form: Any = None,
    status: int = 200,
) -> HttpResponse:
    volumes = [
        (v, storage.services_using(tenant, volume=v.name))
        for v in Volume.objects.for_tenant(tenant).select_related("node").order_by("name")
    ]
    networks = [
        (n, storage.services_using(tenant, network=n.name))
        for n in Network.objects.for_tenant(tenant).order_by("name")
    ]
    return _page(
        request,
        "dashboard/storage.html",
        {
            "volumes": volumes,
            "networks": networks,
            "volume_form": volume_form or _form(f.VolumeForm),
            "network_form": network_form or _form(f.NetworkForm),
            "idem": new_idem(),
        },
        status,
    )


@tenant_page(perms.WORKLOADS_VIEW)
def storage_page(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    return _storage_page(request, tenant)


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def volume_create(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = f.VolumeForm(request.POST)
    if form.is_valid():
        try:
            volume = storage.create_volume(
                tenant,
                name=form.cleaned_data["name"],
                size_gib=form.cleaned_data["size_gib"],
                actor=request.actor,  # type: ignore[attr-defined]
            )
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            messages.success(request, f"Volume {volume.name} created ({volume.size_gib} GiB).")
            return redirect(_t("storage", tenant))
    return _storage_page(request, tenant, volume_form=_refresh_idem(form), status=400)


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def network_create(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = f.NetworkForm(request.POST)
    if form.is_valid():
        try:
            network = storage.create_network(
                tenant,
                name=form.cleaned_data["name"],
                actor=request.actor,  # type: ignore[attr-defined]
            )
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            messages.success(request, f"Network {network.name} created.")
            return redirect(_t("storage", tenant))
    return _storage_page(request, tenant, network_form=_refresh_idem(form), status=400)


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def volume_delete(request: HttpRequest, tenant: Tenant, name: str) -> HttpResponse:
    volume = get_object_or_404(Volume.objects.for_tenant(tenant), name=name)
    try:
        storage.delete_volume(volume, actor=request.actor)  # type: ignore[attr-defined]
    except BerthError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Volume {name} deleted.")
    return redirect(_t("storage", tenant))


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def network_delete(request: HttpRequest, tenant: Tenant, name: str) -> HttpResponse:
    network = get_object_or_404(Network.objects.for_tenant(tenant), name=name)
    try:
        storage.delete_network(network, actor=request.actor)  # type: ignore[attr-defined]
    except BerthError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Network {name} deleted.")
    return redirect(_t("storage", tenant))


# --------------------------------------------------------------------------- builds


def _build(tenant: Tenant, pk: str) -> Build:
    return get_object_or_404(Build.objects.for_tenant(tenant), pk=pk)


def _builds_page(
    request: HttpRequest, tenant: Tenant, *, form: Any = None, status: int = 200
) -> HttpResponse:
    rows = Build.objects.for_tenant(tenant).order_by("-created_at")[:100]
    return _page(
        request,
        "dashboard/builds.html",
        {"builds": rows, "form": form or _form(f.BuildForm)},
        status,
    )


@tenant_page(perms.WORKLOADS_VIEW)
def build_list(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    return _builds_page(request, tenant)


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def build_create(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = f.BuildForm(request.POST, request.FILES)
    if form.is_valid():
        upload = form.cleaned_data["context"]
        d = form.cleaned_data
        try:
            context = builds.store_context(upload.chunks(), declared_size=upload.size)
            build = builds.create_build(
                tenant,
                context=context,
                tag=d["tag"],
                dockerfile=d["dockerfile"] or None,
                build_args=d["build_args"],
                target=d["target"] or None,
                no_cache=d["no_cache"],
                actor=request.actor,  # type: ignore[attr-defined]
            )
        except BerthError as exc:
            f.add_service_error(form, exc)
        else:
            messages.success(request, f"Build of {build.tag} queued.")
            return redirect(_t("build", tenant, build.pk))
    return _builds_page(request, tenant, form=_refresh_idem(form), status=400)


def _build_context(request: HttpRequest, item: Build) -> dict[str, Any]:
    return {
        "build": item,
        "finished": item.state in builds.TERMINAL,
        "can_manage": can(request, perms.WORKLOADS_MANAGE),
        "cancel_idem": new_idem(),
    }


@tenant_page(perms.WORKLOADS_VIEW)
def build(request: HttpRequest, tenant: Tenant, pk: str) -> HttpResponse:
    item = _build(tenant, pk)
    return _page(
        request,
        "dashboard/build.html",
        _build_context(request, item),
    )


@tenant_page(perms.WORKLOADS_VIEW)
def build_live(request: HttpRequest, tenant: Tenant, pk: str) -> HttpResponse:
    """htmx fragment: state and the kept tail of the log; polling stops once it ended."""
    item = _build(tenant, pk)
    response = render(
        request,
        "dashboard/partials/build_live.html",
        {"tenant": tenant, **_build_context(request, item)},
    )
    if item.state in builds.TERMINAL:
        response.status_code = 286  # htmx: stop polling
    return response


@tenant_page(perms.WORKLOADS_MANAGE, methods=("POST",))
@once
def build_cancel(request: HttpRequest, tenant: Tenant, pk: str) -> HttpResponse:
    item = _build(tenant, pk)
    try:
        builds.cancel_build(item, actor=request.actor)  # type: ignore[attr-defined]
    except BerthError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "Build cancelled.")
    return redirect(_t("build", tenant, item.pk))
