"""Reusable REST API foundation (auth, permissions, tenant scoping, errors, pagination,
rate limits) and the tenants endpoints. See docs/control-plane.md."""
