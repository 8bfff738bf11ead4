"""Image sources: registries, OCI layouts and the local configuration they need."""
