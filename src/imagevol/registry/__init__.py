"""Talking to registries: transport, auth, registries.conf, credentials, egress policy."""
