"""Non-API billing routes: the Stripe webhook endpoint."""

from __future__ import annotations

from django.urls import path

from billing.webhooks import stripe_webhook

urlpatterns = [
    path("stripe/webhook", stripe_webhook, name="stripe-webhook"),
]
