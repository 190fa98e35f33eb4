"""Alembic environment of the publisher's database."""

from shoal_common.db import run_alembic_env
from shoal_publisher.store.tables import metadata

run_alembic_env(metadata)
