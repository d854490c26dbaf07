"""OCI images per tenant: references, manifests, configs, archives, the busybox base."""
