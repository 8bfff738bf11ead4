"""Image sources, read side: one `Source` interface for a registry repository, an OCI layout
and the store (the registry transport lives in `registry/`)."""
