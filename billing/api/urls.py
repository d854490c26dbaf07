"""Mounted at /api/v1/tenants/<tenant_slug>/billing/ by config/urls.py."""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from billing.api import views

router = SimpleRouter()
router.register("seat-ledger", views.SeatLedgerViewSet, basename="billing-seat-ledger")

urlpatterns = [
    path("", views.BillingSummaryView.as_view(), name="billing-summary"),
    path("plan/", views.PlanView.as_view(), name="billing-plan"),
    path("seats/", views.SeatsView.as_view(), name="billing-seats"),
    path("usage/", views.UsageView.as_view(), name="billing-usage"),
    path("invoices/", views.InvoicesView.as_view(), name="billing-invoices"),
    path("upcoming/", views.UpcomingView.as_view(), name="billing-upcoming"),
    path("spend-cap/", views.SpendCapView.as_view(), name="billing-spend-cap"),
    path("checkout/", views.CheckoutView.as_view(), name="billing-checkout"),
    path("portal/", views.PortalView.as_view(), name="billing-portal"),
    path("", include(router.urls)),
]
