"""Settings every service shares; each service subclasses with its own ``SHOAL_<NAME>_`` prefix."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shoal_common.subjects import check_token


class ServiceSettings(BaseSettings):
    """Common knobs. Subclasses set ``model_config = SettingsConfigDict(env_prefix=...)``."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"  # several: comma-separated (a NATS cluster)
    # Copies of each JetStream stream this service creates: 1 on one server, 3 on a 3-node
    # cluster (deploy/docker-compose.cluster.yml). At most the number of servers.
    nats_stream_replicas: int = Field(1, ge=1, le=5)
    database_url: str | None = None  # default: SQLite under state_dir
    state_dir: Path = Field(default_factory=lambda: Path.home() / ".shoal")
    node_id: str | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0 = no HTTP server for this service
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("node_id")
    @classmethod
    def _node_id_is_subject_safe(cls, value: str | None) -> str | None:
        return check_token(value) if value else value

    def db_url(self, name: str) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.state_dir / (name + '.sqlite')}"
