"""Alembic environment of the compute node."""

from shoal_common.db import run_alembic_env
from shoal_compute.store.tables import metadata

run_alembic_env(metadata)
