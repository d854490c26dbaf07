"""API views. :class:`TenantScopedMixin` / :class:`TenantScopedViewSet` are the base for
every tenant-owned resource in every app (see docs/control-plane.md).

Views only translate HTTP: validate with a serializer, call one service, serialise the
result. Tenant scoping happens in :meth:`TenantScopedMixin.get_queryset`, nowhere else.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, cast

from django.db import transaction
from django.db.models import QuerySet
from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.generics import GenericAPIView
from rest_framework.permissions import SAFE_METHODS, AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from tenants import permissions as perms
from tenants import services
from tenants.api.authentication import PeopleOnly, SessionAuthentication
from tenants.api.permissions import PlatformAdminOnly, TenantPermission, is_platform_admin
from tenants.api.serializers import (
    APITokenCreatedSerializer,
    APITokenCreateSerializer,
    APITokenSerializer,
    AuditLogSerializer,
    InvitationAcceptSerializer,
    InvitationCreatedSerializer,
    InvitationCreateSerializer,
    InvitationSerializer,
    MemberRemovedSerializer,
    MemberRemoveQuerySerializer,
    MembershipSerializer,
    MeSerializer,
    QuotaListSerializer,
    QuotaOverrideUpdateSerializer,
    RoleChangeSerializer,
    TenantSerializer,
    TenantUpdateSerializer,
)
from tenants.models import APIToken, AuditLog, Invitation, Membership, Tenant, User

if TYPE_CHECKING:
    _ViewBase = GenericAPIView
else:
    _ViewBase = object


def current_user(request: Request) -> User:
    """The authenticated user (views using this require authentication)."""
    return cast(User, request.user)


class TenantScopedMixin(_ViewBase):
    """Resolves ``self.tenant`` from the URL and scopes every queryset to it.

    Tenant-scoped routes live under ``/api/v1/tenants/<tenant_slug>/``. The tenant is
    visible to: a token of that tenant; a session user who is a member; a platform admin
    using a session. Everyone else gets 404, exactly as for a slug that does not exist.

    Subclasses declare ``queryset`` (its model's manager must offer ``for_tenant``) and the
    permission each action needs: ``read_permission`` for safe methods,
    ``write_permission`` for the rest, ``action_permissions`` to override per action.
    """

    tenant_url_kwarg = "tenant_slug"
    read_permission: ClassVar[str] = perms.TENANT_VIEW
    write_permission: ClassVar[str] = perms.TENANT_MANAGE
    action_permissions: ClassVar[dict[str, str]] = {}
    #: Writes that stay possible while the tenant is suspended (none by default).
    allow_when_suspended: ClassVar[bool] = False
    permission_classes = [IsAuthenticated, TenantPermission]

    @cached_property
    def tenant(self) -> Tenant:
        slug = self.kwargs.get(self.tenant_url_kwarg, "")
        tenant = Tenant.objects.select_related("plan").filter(slug=slug).first()
        if tenant is None:
            raise Http404
        token = self.request.auth
        if isinstance(token, APIToken):
            if token.tenant_id != tenant.pk:
                raise Http404
        elif self.tenant_role is None and not is_platform_admin(self.request):
            raise Http404
        return tenant

    @cached_property
    def tenant_role(self) -> str | None:
        slug = self.kwargs.get(self.tenant_url_kwarg, "")
        user = self.request.user
        if not user.is_authenticated:
            return None
        return (
            Membership.objects.filter(tenant__slug=slug, user=user)
            .values_list("role", flat=True)
            .first()
        )

    @property
    def actor(self) -> services.Actor:
        return services.Actor.from_request(self.request)

    @property
    def acting_role(self) -> str | None:
        """The role services check against; None means a platform admin (no limit)."""
        if is_platform_admin(self.request) and self.tenant_role != perms.Role.OWNER:
            return None
        return self.tenant_role

    def get_required_permission(self) -> str:
        action = getattr(self, "action", None)
        if action and action in self.action_permissions:
            return self.action_permissions[action]
        if self.request.method in SAFE_METHODS:
            return self.read_permission
        return self.write_permission

    def get_queryset(self) -> QuerySet[Any]:
        queryset: Any = super().get_queryset()
        return cast(QuerySet[Any], queryset.for_tenant(self.tenant))


class TenantScopedViewSet(TenantScopedMixin, viewsets.GenericViewSet):
    """Base viewset for tenant-owned models; add DRF mixins for the actions you need."""


class TenantScopedAPIView(TenantScopedMixin, GenericAPIView):
    """Base for tenant-scoped endpoints that are not model collections."""


# --------------------------------------------------------------------------- me & tenants


class MeView(GenericAPIView):
    """The caller: user, token (when using one) and the tenants they can act in."""

    permission_classes = [IsAuthenticated]
    serializer_class = MeSerializer
    pagination_class = None

    def get(self, request: Request) -> Response:
        token = request.auth if isinstance(request.auth, APIToken) else None
        memberships = Membership.objects.filter(user=current_user(request)).select_related("tenant")
        if token is not None:
            memberships = memberships.filter(tenant_id=token.tenant_id)
        data = {
            "user": request.user,
            "is_platform_admin": is_platform_admin(request),
            "token": token,
            "tenants": [
                {
                    "slug": m.tenant.slug,
                    "name": m.tenant.name,
                    "status": m.tenant.status,
                    "role": m.role,
                }
                for m in memberships.order_by("tenant__slug")
            ],
        }
        return Response(MeSerializer(data).data)


class TenantListView(mixins.ListModelMixin, GenericAPIView):
    """Tenants the caller belongs to (a token: only its own tenant)."""

    permission_classes = [IsAuthenticated]
    serializer_class = TenantSerializer

    def get_queryset(self) -> QuerySet[Tenant]:
        queryset = Tenant.objects.for_user(current_user(self.request)).select_related("plan")
        if isinstance(self.request.auth, APIToken):
            queryset = queryset.filter(pk=self.request.auth.tenant_id)
        return queryset

    def get_serializer_context(self) -> dict[str, Any]:
        roles = dict(
            Membership.objects.filter(user=current_user(self.request)).values_list(
                "tenant_id", "role"
            )
        )
        return {**super().get_serializer_context(), "roles": roles}

    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self.list(request, *args, **kwargs)


class TenantDetailView(TenantScopedAPIView):
    """One tenant. PATCH renames it (owners and admins)."""

    queryset = Tenant.objects.all()
    serializer_class = TenantSerializer
    pagination_class = None

    def _render(self, tenant: Tenant) -> Response:
        context = {"roles": {tenant.pk: self.tenant_role}}
        return Response(TenantSerializer(tenant, context=context).data)

    def get(self, request: Request, tenant_slug: str) -> Response:
        return self._render(self.tenant)

    @extend_schema(request=TenantUpdateSerializer, responses=TenantSerializer)
    def patch(self, request: Request, tenant_slug: str) -> Response:
        body = TenantUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        tenant = services.update_tenant(
            self.tenant, name=body.validated_data["name"], actor=self.actor
        )
        return self._render(tenant)


# --------------------------------------------------------------------------- members


class MembershipViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    TenantScopedViewSet,
):
    """Members of the tenant. PATCH changes a role; DELETE removes the member."""

    queryset = Membership.objects.select_related("user")
    serializer_class = MembershipSerializer
    read_permission = perms.MEMBERS_VIEW
    write_permission = perms.MEMBERS_MANAGE

    @extend_schema(request=RoleChangeSerializer, responses=MembershipSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        membership = self.get_object()
        body = RoleChangeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        membership = services.change_role(
            membership, body.validated_data["role"], actor=self.actor, actor_role=self.acting_role
        )
        return Response(MembershipSerializer(membership).data)

    @extend_schema(
        parameters=[MemberRemoveQuerySerializer],
        responses={204: None, 200: MemberRemovedSerializer},
    )
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Remove the member (204). With ``release_seat=true`` also drop the seat they
        freed, atomically with the removal, and answer 200 with the seat counts."""
        # A plain dict, not the QueryDict: DRF reads an empty form value as "not given",
        # and "?release_seat=" must be refused rather than remove without releasing.
        query = MemberRemoveQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        membership = self.get_object()
        if not query.validated_data["release_seat"]:
            services.remove_member(membership, actor=self.actor, actor_role=self.acting_role)
            return Response(status=status.HTTP_204_NO_CONTENT)
        from billing.services import remove_member_releasing_seat

        outcome = remove_member_releasing_seat(
            membership, actor=self.actor, actor_role=self.acting_role
        )
        return Response(MemberRemovedSerializer(outcome).data)


# --------------------------------------------------------------------------- invitations


class InvitationViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    TenantScopedViewSet,
):
    """Invitations. POST invites (the key is emailed and returned once); DELETE revokes."""

    queryset = Invitation.objects.select_related("invited_by")
    serializer_class = InvitationSerializer
    read_permission = perms.MEMBERS_VIEW
    write_permission = perms.INVITATIONS_MANAGE

    @extend_schema(request=InvitationCreateSerializer, responses=InvitationCreatedSerializer)
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        body = InvitationCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        with transaction.atomic():
            if body.validated_data["buy_seat"] and services.seats_full(self.tenant):
                from billing.services import add_seat_for_invitation

                add_seat_for_invitation(
                    self.tenant, actor=self.actor, actor_role=self.acting_role or "owner"
                )
            invitation, key = services.invite_member(
                self.tenant,
                body.validated_data["email"],
                body.validated_data["role"],
                actor=self.actor,
                actor_role=self.acting_role,
            )
        invitation.key = key  # type: ignore[attr-defined]
        return Response(
            InvitationCreatedSerializer(invitation).data, status=status.HTTP_201_CREATED
        )

    def perform_destroy(self, instance: Invitation) -> None:
        services.revoke_invitation(instance, actor=self.actor)


class InvitationAcceptView(GenericAPIView):
    """Accept an invitation: logged in (browser session) as the invited email, or
    anonymously with a password (creating the account if it does not exist). API tokens
    are refused: one bound to tenant A must not join its holder to tenant B."""

    permission_classes = [AllowAny]
    authentication_classes = [PeopleOnly, SessionAuthentication]
    serializer_class = InvitationAcceptSerializer
    pagination_class = None

    @extend_schema(request=InvitationAcceptSerializer, responses={201: MembershipSerializer})
    def post(self, request: Request) -> Response:
        body = InvitationAcceptSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        key = body.validated_data["key"]
        if request.user.is_authenticated:
            membership = services.accept_invitation(
                key, current_user(request), actor=services.Actor.from_request(request)
            )
        else:
            membership, _ = services.accept_invitation_with_password(
                key, body.validated_data.get("password"), ip=request.META.get("REMOTE_ADDR")
            )
        data = MembershipSerializer(membership).data | {"tenant": membership.tenant.slug}
        return Response(data, status=status.HTTP_201_CREATED)


# --------------------------------------------------------------------------- tokens


class APITokenViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    TenantScopedViewSet,
):
    """API tokens. Members see and revoke their own; owners and admins everyone's.
    POST returns the secret once. DELETE revokes (the row stays, state ``revoked``)."""

    queryset = APIToken.objects.select_related("user")
    serializer_class = APITokenSerializer
    read_permission = perms.TOKENS_MANAGE_OWN
    write_permission = perms.TOKENS_MANAGE_OWN

    def get_queryset(self) -> QuerySet[APIToken]:
        queryset = super().get_queryset()
        can_see_all = perms.has_permission(self.tenant_role, perms.TOKENS_MANAGE_ALL)
        token = self.request.auth
        if isinstance(token, APIToken) and not token.allows(
            perms.scope_for(perms.TOKENS_MANAGE_ALL, write=False)
        ):
            can_see_all = False
        if not (can_see_all or is_platform_admin(self.request)):
            queryset = queryset.filter(user=current_user(self.request))
        return queryset

    @extend_schema(request=APITokenCreateSerializer, responses={201: APITokenCreatedSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        body = APITokenCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        token, secret = services.create_api_token(
            self.tenant,
            current_user(request),
            name=body.validated_data["name"],
            scope=body.validated_data["scope"],
            expires_at=body.validated_data.get("expires_at"),
            actor=self.actor,
        )
        token.token = secret  # type: ignore[attr-defined]
        return Response(APITokenCreatedSerializer(token).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: APIToken) -> None:
        services.revoke_api_token(instance, actor=self.actor)


# --------------------------------------------------------------------------- quotas


class QuotaView(TenantScopedAPIView):
    """Effective quotas and usage. PATCH sets overrides (platform admins only)."""

    queryset = Tenant.objects.all()
    serializer_class = QuotaListSerializer
    pagination_class = None
    read_permission = perms.QUOTAS_VIEW
    write_permission = perms.QUOTAS_MANAGE
    allow_when_suspended = True

    def _render(self) -> Response:
        tenant = Tenant.objects.select_related("plan").get(pk=self.tenant.pk)
        data = {
            "tenant": tenant.slug,
            "plan": tenant.plan.code,
            "seats": tenant.seats,
            "quotas": services.quota_report(tenant),
        }
        return Response(QuotaListSerializer(data).data)

    def get(self, request: Request, tenant_slug: str) -> Response:
        return self._render()

    @extend_schema(request=QuotaOverrideUpdateSerializer, responses=QuotaListSerializer)
    def patch(self, request: Request, tenant_slug: str) -> Response:
        body = QuotaOverrideUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        services.set_quota_overrides(
            self.tenant,
            body.validated_data["overrides"],
            actor=self.actor,
            reason=body.validated_data["reason"],
        )
        return self._render()


# --------------------------------------------------------------------------- audit log


class TenantAuditLogViewSet(mixins.ListModelMixin, TenantScopedViewSet):
    """The tenant's audit log, newest first (owners and admins). ``?action=`` filters."""

    queryset = AuditLog.objects.select_related("actor_user", "actor_token")
    serializer_class = AuditLogSerializer
    read_permission = perms.AUDIT_VIEW
    write_permission = perms.AUDIT_VIEW

    def get_queryset(self) -> QuerySet[AuditLog]:
        queryset = super().get_queryset()
        if action := self.request.query_params.get("action"):
            queryset = queryset.filter(action=action)
        return queryset


class PlatformAuditLogViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Every tenant's audit log (platform admins, session login). ``?tenant=<slug>``
    and ``?action=<action>`` filter."""

    queryset = AuditLog.objects.select_related("actor_user", "actor_token")
    serializer_class = AuditLogSerializer
    permission_classes = [IsAuthenticated, PlatformAdminOnly]

    def get_queryset(self) -> QuerySet[AuditLog]:
        queryset = super().get_queryset()
        if slug := self.request.query_params.get("tenant"):
            queryset = queryset.filter(tenant_slug=slug)
        if action := self.request.query_params.get("action"):
            queryset = queryset.filter(action=action)
        return queryset
