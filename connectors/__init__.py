"""Connectors: each source's records in the canonical shapes."""
