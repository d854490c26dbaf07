"""Per-tenant private image registry: token server, notification receiver, records, GC."""
