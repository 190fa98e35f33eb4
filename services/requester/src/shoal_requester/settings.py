"""Requester settings (environment prefix ``SHOAL_REQUESTER_``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shoal_common.protocol import NODE_LOST_AFTER_S
from shoal_common.settings import ServiceSettings


class ApiAuth(StrEnum):
    """Who may use the API (docs/threat-model.md, "Optional API auth")."""

    # Bacalhau-compatible: reads need nothing; mutations carry their signed envelope.
    OPEN = "open"
    # Private cluster: every API request, reads included, carries a bearer token from
    # ``api_tokens`` or a request signature (shoal_common.request_auth) by a client in
    # ``api_clients``. Health, metrics, version and the OpenAPI document stay open.
    PRIVATE = "private"


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class RequesterSettings(ServiceSettings):
    """Everything the requester can be tuned with; no global instance (pass it around)."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_REQUESTER_", extra="ignore")

    node_id: str | None = "requester"

    # --- API ---
    # Requests above this are refused with 413 before they are parsed.
    max_body_bytes: int = Field(10 * 1024**2, gt=0)
    # stdout/stderr returned by the API are cut at this many bytes (the reference system's
    # MaxStdoutReturnLength); the full text stays in the published results.
    max_output_bytes: int = Field(2048, ge=0)
    # The publisher's content store, proxied at /api/v1/content (shoal get / shoal put).
    publisher_url: str | None = None

    # Client ids allowed to approve executions that nodes hold under their "wait" approval
    # policy (POST /requester/approve). Empty: each job's owner approves its own.
    approver_clients: list[str] = Field(default_factory=list)

    # --- optional API auth (private clusters) ---
    api_auth: ApiAuth = ApiAuth.OPEN
    # Comma-separated in the environment (SHOAL_REQUESTER_API_TOKENS=t1,t2); never logged.
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Client ids (sha256 of the key's modulus, as `shoal id` prints) whose signed requests
    # are let in.
    api_clients: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # How far a signed request's timestamp may be from the requester's clock (replay window).
    api_auth_max_skew: float = Field(300.0, gt=0)

    # --- scheduling ---
    # Nodes asked per placement = ceil(max(concurrency, min_bids) x over_ask). 1.0: the
    # requester only asks nodes its own capacity accounting says are free, so bids are nearly
    # always accepted, and a rare refusal costs one more round-trip to the next-ranked node;
    # over-asking would double bid messages and node reservations for every job to save that.
    over_ask: float = Field(1.0, ge=1.0)
    # In clusters larger than this, placement looks at a window of nodes until it holds this
    # many free fitting ones, then ranks those (0: always look at every node). 8 spreads jobs
    # evenly (see the spread test) at a quarter of 32's cost per placement.
    candidate_sample: int = Field(8, ge=0)
    # Placements running at once (a submit only records the job; its placement waits for a
    # lane). Enough to keep the nodes busy; bounded so placements cannot crowd the API out of
    # the event loop under a burst (ADR 0018). A lane is held for a bid round trip and a
    # commit (~15-25 ms under load), so 8 lanes capped placement near 400 jobs/s (ADR 0023).
    placement_parallelism: int = Field(24, ge=1)
    # A placement waits to start while one trip through the event loop takes longer than this
    # (seconds), so the API's requests go first (ADR 0018). 0, the default since ADR 0028,
    # disables the wait: with lanes bounding placements it only delayed jobs (stress -5% mean)
    # and no longer bought the API any latency.
    placement_yield_lag: float = Field(0.0, ge=0)
    # When one node is asked for the one execution a job wants, the ask says ``take``: a yes
    # is already an accepted bid on the node, which stores and queues the execution before it
    # answers, so no separate acceptance follows (ADR 0029). Off: ask, then accept.
    take_single_bids: bool = True
    # SQLite store: while writes come in groups, a group commit starts at least this long
    # after the one before it (ms; 0 = off), like Postgres's commit_delay. Every commit writes
    # a page of each B-tree its group touches, so fuller commits write less: at 500 jobs/s
    # open loop, 4 ms took the WAL from 24 to 16 pages per job and the devstack's CPU down by
    # 14-24%, but a closed loop (stress, concurrency 10) waits for it: mean +9-19% (ADR 0033).
    commit_spacing_ms: float = Field(0.0, ge=0, le=100)
    # Replacement rounds after failed executions or refused bids (0 = never retry).
    max_retries: int = Field(3, ge=0)
    # How long a job may wait in Queued for a node with free capacity.
    queue_timeout: float = Field(600.0, gt=0)
    # Timeout given to jobs that ask for none (seconds; the reference system's default).
    default_job_timeout: float = Field(1800.0, gt=0)
    # Added to a job's own timeout before the requester gives up on it (the node enforces the
    # timeout itself; this covers verification and publishing, and lost messages).
    job_timeout_grace: float = Field(30.0, ge=0)
    # How long to wait for one node's bid answer.
    bid_timeout: float = Field(5.0, gt=0)
    # Timeout of other node calls (bid decisions, cancel, logs).
    rpc_timeout: float = Field(5.0, gt=0)
    # How long an undelivered bid acceptance is sent again (NATS restarting) before the
    # execution is failed and placed elsewhere; a lost node is detected sooner by heartbeats.
    acceptance_delivery_window: float = Field(30.0, gt=0)
    node_lost_after: float = Field(NODE_LOST_AFTER_S, gt=0)
    # Weight nodes by their record (results rejected by the verifier, failures) when ranking
    # them; off: every node that fits counts the same (to measure what reputation buys).
    rank_by_reputation: bool = True

    # --- housekeeping ---
    housekeeping_interval: float = Field(0.5, gt=0)
    reconcile_interval: float = Field(5.0, gt=0)
    # Jobs or executions untouched this long in a transient state are re-driven.
    stuck_after: float = Field(30.0, gt=0)
    # How often a node's last_seen is written to the database (it is live in memory).
    node_persist_interval: float = Field(30.0, gt=0)

    @field_validator("api_tokens", "api_clients", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _csv(value)

    @model_validator(mode="after")
    def _private_needs_credentials(self) -> RequesterSettings:
        if self.api_auth is ApiAuth.PRIVATE and not (self.api_tokens or self.api_clients):
            raise ValueError("api_auth=private needs api_tokens or api_clients (or both)")
        if any(len(t.get_secret_value()) < 16 for t in self.api_tokens):
            raise ValueError("API tokens must be at least 16 characters")
        return self

    @field_validator("publisher_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value
