"""Billing API under /api/v1/tenants/<slug>/billing/ (see docs/billing.md)."""
