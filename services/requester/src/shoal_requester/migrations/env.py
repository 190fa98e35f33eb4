"""Alembic environment of the requester's database (see shoal_common.db.run_alembic_env)."""

from shoal_common.db import run_alembic_env
from shoal_requester.store.tables import metadata

run_alembic_env(metadata)
