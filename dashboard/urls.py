"""Dashboard URLs, mounted at the site root. Tenant pages live under ``t/<slug>/``."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path, reverse_lazy

from dashboard import views

app_name = "dashboard"

_reset = {
    "password_reset": auth_views.PasswordResetView.as_view(
        template_name="dashboard/auth/password_reset_form.html",
        email_template_name="dashboard/auth/password_reset_email.txt",
        subject_template_name="dashboard/auth/password_reset_subject.txt",
        success_url=reverse_lazy("dashboard:password_reset_done"),
    ),
    "password_reset_done": auth_views.PasswordResetDoneView.as_view(
        template_name="dashboard/auth/password_reset_done.html"
    ),
    "password_reset_confirm": auth_views.PasswordResetConfirmView.as_view(
        template_name="dashboard/auth/password_reset_confirm.html",
        success_url=reverse_lazy("dashboard:password_reset_complete"),
    ),
    "password_reset_complete": auth_views.PasswordResetCompleteView.as_view(
        template_name="dashboard/auth/password_reset_complete.html"
    ),
}

urlpatterns = [
    path("", views.home, name="home"),
    path("signup/", views.signup, name="signup"),
    path("signup/sent/", views.signup_sent, name="signup_sent"),
    path("signup/verify/<str:token>/", views.signup_verify, name="signup_verify"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard:login"), name="logout"),
    path("password-reset/", _reset["password_reset"], name="password_reset"),
    path("password-reset/sent/", _reset["password_reset_done"], name="password_reset_done"),
    path(
        "password-reset/<uidb64>/<token>/",
        _reset["password_reset_confirm"],
        name="password_reset_confirm",
    ),
    path(
        "password-reset/complete/",
        _reset["password_reset_complete"],
        name="password_reset_complete",
    ),
    path("invitations/<str:key>/", views.accept_invitation, name="accept"),
    path("nodes/", views.nodes, name="nodes"),
    path("nodes/<uuid:pk>/state/", views.node_state, name="node_state"),
    path("billing/<str:slug>/", views.billing_return, name="billing_return"),
    path("t/<str:slug>/", views.overview, name="overview"),
    path("t/<str:slug>/services/", views.services, name="services"),
    path("t/<str:slug>/services/new/", views.service_new, name="service_new"),
    path("t/<str:slug>/services/<str:name>/", views.service, name="service"),
    path("t/<str:slug>/services/<str:name>/status/", views.service_status, name="service_status"),
    path("t/<str:slug>/services/<str:name>/logs/", views.service_logs, name="service_logs"),
    path("t/<str:slug>/services/<str:name>/charts/", views.service_charts, name="service_charts"),
    path("t/<str:slug>/services/<str:name>/deploy/", views.service_deploy, name="service_deploy"),
    path("t/<str:slug>/services/<str:name>/scale/", views.service_scale, name="service_scale"),
    path(
        "t/<str:slug>/services/<str:name>/<str:action>/",
        views.service_action,
        name="service_action",
    ),
    path("t/<str:slug>/jobs/", views.job_list, name="jobs"),
    path("t/<str:slug>/jobs/new/", views.job_new, name="job_new"),
    path("t/<str:slug>/jobs/<int:pk>/", views.job, name="job"),
    path("t/<str:slug>/jobs/<int:pk>/live/", views.job_live, name="job_live"),
    path("t/<str:slug>/jobs/<int:pk>/cancel/", views.job_cancel, name="job_cancel"),
    path("t/<str:slug>/images/", views.images, name="images"),
    path("t/<str:slug>/builds/", views.build_list, name="builds"),
    path("t/<str:slug>/builds/new/", views.build_create, name="build_create"),
    path("t/<str:slug>/builds/<uuid:pk>/", views.build, name="build"),
    path("t/<str:slug>/builds/<uuid:pk>/live/", views.build_live, name="build_live"),
    path("t/<str:slug>/builds/<uuid:pk>/cancel/", views.build_cancel, name="build_cancel"),
    path("t/<str:slug>/storage/", views.storage_page, name="storage"),
    path("t/<str:slug>/volumes/new/", views.volume_create, name="volume_create"),
    path("t/<str:slug>/volumes/<str:name>/delete/", views.volume_delete, name="volume_delete"),
    path("t/<str:slug>/networks/new/", views.network_create, name="network_create"),
    path("t/<str:slug>/networks/<str:name>/delete/", views.network_delete, name="network_delete"),
    path("t/<str:slug>/members/", views.members, name="members"),
    path("t/<str:slug>/members/invite/", views.invite, name="invite"),
    path("t/<str:slug>/members/<int:pk>/role/", views.member_role, name="member_role"),
    path("t/<str:slug>/members/<int:pk>/remove/", views.member_remove, name="member_remove"),
    path(
        "t/<str:slug>/invitations/<int:pk>/revoke/",
        views.invitation_revoke,
        name="invitation_revoke",
    ),
    path("t/<str:slug>/tokens/", views.tokens, name="tokens"),
    path("t/<str:slug>/tokens/new/", views.token_create, name="token_create"),
    path("t/<str:slug>/tokens/<int:pk>/revoke/", views.token_revoke, name="token_revoke"),
    path("t/<str:slug>/billing/", views.billing_page, name="billing"),
    path("t/<str:slug>/billing/checkout/", views.billing_checkout, name="billing_checkout"),
    path("t/<str:slug>/billing/seats/", views.billing_seats, name="billing_seats"),
    path("t/<str:slug>/billing/cap/", views.billing_cap, name="billing_cap"),
    path("t/<str:slug>/billing/portal/", views.billing_portal, name="billing_portal"),
    path("t/<str:slug>/audit/", views.audit, name="audit"),
]
