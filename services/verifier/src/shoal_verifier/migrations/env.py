"""Alembic environment of the verifier's database."""

from shoal_common.db import run_alembic_env
from shoal_verifier.store.tables import metadata

run_alembic_env(metadata)
