"""Registry protocol endpoints (token server, notifications); the REST API is in api/."""

from __future__ import annotations

from django.urls import path

from registry import views

app_name = "registry"

urlpatterns = [
    path("token", views.token, name="token"),
    path("events/", views.events, name="events"),
]
