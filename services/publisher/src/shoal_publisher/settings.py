"""Publisher settings (environment prefix ``SHOAL_PUBLISHER_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shoal_common.settings import ServiceSettings


class PublisherSettings(ServiceSettings):
    """Knobs of the publisher service and its content store.

    ``content_dir``: where the content store lives (default ``<state_dir>/content``).
    ``public_url``: the base URL others reach this service at, put into published results
    (default ``http://<host>:<port>``). ``kubo_rpc_url``: the kubo RPC API the ``ipfs``
    publisher adds and pins on (e.g. ``http://127.0.0.1:5001``); unset, ``Ipfs`` jobs fail
    to publish with a clear error. ``fail_publishers`` / ``fail_nodes``: make publishing fail
    on purpose for these publisher types (``Local``, ``Ipfs``, ``Noop``) or for results from
    these compute nodes (tests and demos of behaviour 38).
    """

    model_config = SettingsConfigDict(env_prefix="SHOAL_PUBLISHER_", extra="ignore")

    content_dir: Path | None = None
    public_url: str | None = None
    kubo_rpc_url: str | None = None
    max_upload_bytes: int = Field(64 * 1024**3, gt=0)
    max_result_bytes: int = Field(64 * 1024**3, gt=0)
    fetch_timeout: float = Field(60.0, gt=0)
    publish_attempts: int = Field(3, ge=1)
    retry_delay: float = Field(0.5, ge=0)
    # How long a result's node may stay unreachable (down, restarting) before its result fails
    # to publish; such waits do not count as attempts. Keep it near the bus's ack wait (30 s):
    # a longer wait holds the ack floor and its events come again (harmless, idempotent).
    unreachable_wait: float = Field(60.0, ge=0)
    max_concurrent_publishes: int = Field(8, ge=1)
    fail_publishers: list[str] = Field(default_factory=list)
    fail_nodes: list[str] = Field(default_factory=list)
    fail_message: str = "failure injected by the publisher's fail_* settings"
    relay_poll_interval: float = Field(1.0, gt=0)
    durable_name: str = "publisher"

    @property
    def content_root(self) -> Path:
        return self.content_dir or self.state_dir / "content"

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        if self.port:
            host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
            return f"http://{host}:{self.port}"
        return ""
