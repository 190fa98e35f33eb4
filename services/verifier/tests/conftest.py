"""Fixtures of the verifier's tests: real NATS and databases from shoal_common.testing."""

from shoal_common.testing import database_url, nats_server, postgres_url

__all__ = ["database_url", "nats_server", "postgres_url"]
