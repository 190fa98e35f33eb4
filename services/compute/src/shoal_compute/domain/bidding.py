"""Bid strategies: small, composable yes/no rules a node applies to an ask for a bid.

Each strategy looks at one aspect of a job (engine, storage, resources, timeout, ...) and answers
yes, no with a reason, or "wait" (hold for approval). :class:`AllOf` chains them; the first no
wins, so cheap checks go first and expensive ones (an executor inspecting an image) last.
Capacity is not a strategy: it is committed atomically by the node after every strategy agrees.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from shoal_common.errors import ShoalError
from shoal_common.protocol import Capacity
from shoal_common.spec import (
    Engine,
    Job,
    NetworkType,
    PublisherType,
    Spec,
    StorageSourceType,
    StorageSpec,
    VerifierType,
)
from shoal_compute.executors.base import Executor
from shoal_compute.settings import ApprovalPolicy, Locality


class BidStrategyError(ShoalError):
    """A strategy could not decide (a misbehaving node, an engine that errored)."""

    code = "bid_strategy_error"
    http_status = 500
    retryable = True


@dataclass(frozen=True)
class BidRequest:
    """What the strategies see of an ask: the job plus values the node already derived."""

    execution_id: str
    job: Job
    resources: Capacity  # with defaults applied (behaviour 27)
    timeout: float  # effective seconds (job's own, else the node's default)
    requester_id: str = ""

    @property
    def spec(self) -> Spec:
        return self.job.spec


@dataclass(frozen=True)
class BidOutcome:
    accepted: bool
    reason: str = ""
    wait: bool = False  # approval policy holds the execution; the answer comes later

    @classmethod
    def yes(cls) -> BidOutcome:
        return _YES

    @classmethod
    def no(cls, reason: str) -> BidOutcome:
        return cls(accepted=False, reason=reason)


_YES = BidOutcome(accepted=True)


class BidStrategy(Protocol):
    """One rule. ``decide`` may raise :class:`BidStrategyError` when it cannot decide."""

    async def decide(self, request: BidRequest) -> BidOutcome: ...


# --- what a job needs ------------------------------------------------------------------------


# Where a Language job's context is mounted when JobContext.path does not say (the working
# directory of `shoal run python` jobs; the executors use the same default).
DEFAULT_JOB_CONTEXT_PATH = "/job"


def job_inputs(spec: Spec) -> list[StorageSpec]:
    """What is mounted read-only for the job: its inputs, plus a Language job's context."""
    specs = list(spec.inputs or [])
    context = spec.language.job_context if spec.language is not None else None
    if context is not None:
        specs.append(context.model_copy(update={"path": context.path or DEFAULT_JOB_CONTEXT_PATH}))
    return specs


def job_storage_specs(spec: Spec) -> list[StorageSpec]:
    """Every storage spec the node must fetch: inputs (and job context) plus WASM modules."""
    specs = job_inputs(spec)
    if spec.wasm is not None:
        if spec.wasm.entry_module is not None:
            specs.append(spec.wasm.entry_module)
        specs.extend(spec.wasm.import_modules or [])
    return specs


def job_cids(spec: Spec) -> list[str]:
    return [
        s.cid
        for s in job_storage_specs(spec)
        if s.cid and (s.storage_source in (None, StorageSourceType.IPFS))
    ]


def job_wants_network(spec: Spec) -> bool:
    return spec.network is not None and spec.network.type in (NetworkType.FULL, NetworkType.HTTP)


# --- strategies ------------------------------------------------------------------------------


class EngineSupported:
    """``engines`` is read at each decision: an engine that becomes ready later (the Python
    runtime compiles for minutes at first start) is bid on from then on."""

    def __init__(self, engines: Collection[Engine]) -> None:
        self._engines = engines

    async def decide(self, request: BidRequest) -> BidOutcome:
        engine = request.spec.engine
        if engine is None:
            return BidOutcome.no("the job names no engine")
        if engine not in self._engines:
            return BidOutcome.no(f"engine {engine.value} is not available on this node")
        return BidOutcome.yes()


class StorageSupported:
    def __init__(self, sources: Iterable[StorageSourceType]) -> None:
        self._sources = frozenset(sources)

    async def decide(self, request: BidRequest) -> BidOutcome:
        for spec in job_storage_specs(request.spec):
            source = spec.storage_source or (StorageSourceType.IPFS if spec.cid else None)
            if source is None:
                return BidOutcome.no(f"input {spec.name or spec.path or '?'} has no source")
            if source not in self._sources:
                return BidOutcome.no(f"storage source {source.value} is not supported here")
        return BidOutcome.yes()


class PublisherSupported:
    def __init__(self, publishers: Iterable[PublisherType]) -> None:
        self._publishers = frozenset(publishers)

    async def decide(self, request: BidRequest) -> BidOutcome:
        wanted = request.spec.effective_publisher
        if wanted not in self._publishers:
            return BidOutcome.no(f"publisher {wanted.value} is not supported here")
        return BidOutcome.yes()


class VerifierSupported:
    def __init__(self, verifiers: Iterable[VerifierType]) -> None:
        self._verifiers = frozenset(verifiers)

    async def decide(self, request: BidRequest) -> BidOutcome:
        wanted = request.spec.effective_verifier
        if wanted not in self._verifiers:
            return BidOutcome.no(f"verifier {wanted.value} is not supported here")
        return BidOutcome.yes()


class ResourcesWithinLimits:
    """A job above the per-job maximum (or bigger than the node) is not bid on (behaviour 27)."""

    def __init__(self, per_job_max: Capacity) -> None:
        self._max = per_job_max

    async def decide(self, request: BidRequest) -> BidOutcome:
        need, limit = request.resources, self._max
        for name, wanted, allowed in (
            ("CPU", need.cpu, limit.cpu),
            ("memory", need.memory, limit.memory),
            ("disk", need.disk, limit.disk),
            ("GPU", need.gpu, limit.gpu),
        ):
            if wanted > allowed + (1e-9 if name == "CPU" else 0):
                return BidOutcome.no(f"job asks for {name} {wanted} above this node's {allowed}")
        return BidOutcome.yes()


class TimeoutWithinBounds:
    """Timeouts outside [min, max] are refused unless the client is on the bypass list."""

    def __init__(self, minimum: float, maximum: float, bypass: Iterable[str]) -> None:
        self._min, self._max = minimum, maximum
        self._bypass = frozenset(bypass)

    async def decide(self, request: BidRequest) -> BidOutcome:
        if request.job.metadata.client_id in self._bypass:
            return BidOutcome.yes()
        if request.timeout > self._max:
            return BidOutcome.no(
                f"timeout {request.timeout:g}s is above this node's maximum {self._max:g}s"
            )
        if request.timeout < self._min:
            return BidOutcome.no(
                f"timeout {request.timeout:g}s is below this node's minimum {self._min:g}s"
            )
        return BidOutcome.yes()


class NetworkingAllowed:
    def __init__(self, allowed: bool) -> None:
        self._allowed = allowed

    async def decide(self, request: BidRequest) -> BidOutcome:
        if job_wants_network(request.spec) and not self._allowed:
            return BidOutcome.no("this node does not run jobs that need networking")
        return BidOutcome.yes()


class DataLocality:
    """``local``: bid only if every CID input is cached here; optionally refuse stateless jobs."""

    def __init__(
        self, locality: Locality, reject_stateless: bool, has_cid: Callable[[str], bool]
    ) -> None:
        self._locality = locality
        self._reject_stateless = reject_stateless
        self._has = has_cid

    async def decide(self, request: BidRequest) -> BidOutcome:
        if self._reject_stateless and not request.spec.inputs:
            return BidOutcome.no("this node only runs jobs with inputs")
        if self._locality is Locality.LOCAL:
            missing = [cid for cid in job_cids(request.spec) if not self._has(cid)]
            if missing:
                return BidOutcome.no(f"input {missing[0]} is not stored on this node")
        return BidOutcome.yes()


class ExecutorAccepts:
    """Engine-specific admission: image platform (behaviour 33), module validity, ..."""

    def __init__(self, executors: Mapping[Engine, Executor]) -> None:
        self._executors = executors

    async def decide(self, request: BidRequest) -> BidOutcome:
        engine = request.spec.engine
        executor = self._executors.get(engine) if engine is not None else None
        if executor is None:
            return BidOutcome.no("no executor for this engine")
        try:
            check = await executor.check(request.job)
        except ShoalError as exc:
            return BidOutcome.no(exc.detail)
        except Exception as exc:  # an engine bug must not take the bid handler down
            return BidOutcome.no(f"{engine} executor check failed: {exc}")
        return BidOutcome.yes() if check.ok else BidOutcome.no(check.reason or "refused")


class Misbehaviour:
    """Test knobs: ``bad_bids`` raises (a broken strategy), ``reject_bids`` always says no."""

    def __init__(self, *, bad_bids: bool, reject_bids: bool) -> None:
        self._bad, self._reject = bad_bids, reject_bids

    async def decide(self, request: BidRequest) -> BidOutcome:
        if self._bad:
            raise BidStrategyError("bid strategy error (node configured with bad_bids)")
        if self._reject:
            return BidOutcome.no("node configured to reject bids")
        return BidOutcome.yes()


class Approval:
    """Policy ``wait`` holds an otherwise acceptable execution until someone approves it."""

    def __init__(self, policy: ApprovalPolicy) -> None:
        self._policy = policy

    async def decide(self, request: BidRequest) -> BidOutcome:
        if self._policy is ApprovalPolicy.WAIT:
            return BidOutcome(accepted=False, reason="waiting for approval", wait=True)
        return BidOutcome.yes()


class AllOf:
    """Every strategy must say yes; the first no (or wait) is the answer."""

    def __init__(self, strategies: Sequence[BidStrategy]) -> None:
        self.strategies = list(strategies)

    async def decide(self, request: BidRequest) -> BidOutcome:
        for strategy in self.strategies:
            outcome = await strategy.decide(request)
            if not outcome.accepted:
                return outcome
        return BidOutcome.yes()
