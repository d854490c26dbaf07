"""Tenants: organisations, members, invitations, API tokens, quotas, audit log."""
