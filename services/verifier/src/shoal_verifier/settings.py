"""Verifier settings (environment prefix ``SHOAL_VERIFIER_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shoal_common.settings import ServiceSettings


class VerifierSettings(ServiceSettings):
    """Knobs of the verifier service.

    ``decision_timeout``: seconds after the first proposal of a round before a deterministic
    job is decided with what has arrived (missing proposals count as missing votes).
    ``max_escalations`` / ``max_extra_executions``: how often, and by how many executions in
    total, a draw or a missed confidence may be escalated before the job fails.
    ``require_sealed``: refuse deterministic proposals whose result is not sealed to this
    verifier (ADR 0004); turn off only for compute nodes that predate sealing.
    ``sweep_interval``: the longest wait between two deadline sweeps. This verifier's own rounds
    are decided at their deadline; a round opened by another replica sharing the database may
    be decided up to this late if that replica stops.
    """

    model_config = SettingsConfigDict(env_prefix="SHOAL_VERIFIER_", extra="ignore")

    decision_timeout: float = Field(600.0, gt=0)
    max_escalations: int = Field(2, ge=0)
    max_extra_executions: int = Field(4, ge=0)
    require_sealed: bool = True
    sweep_interval: float = Field(10.0, gt=0)
    relay_poll_interval: float = Field(1.0, gt=0)
    durable_name: str = "verifier"
