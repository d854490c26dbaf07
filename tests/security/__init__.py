"""Hostile-tenant attacks: each test tries what a tenant could do and fails if it works."""
