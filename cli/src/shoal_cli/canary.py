"""``shoal canary``: what an operator runs every few minutes to know the cluster works.

Runs the scenarios of behaviour 41 against the configured requester, as a user would through the
client SDK: list the 10 newest jobs; submit ``echo <msg>``; submit and describe (job, state,
events); submit and get (stdout equals the message); submit with concurrency 3; and a job that
mounts a known file by CID and prints its md5. Every canary job carries the annotation
``shoal-canary`` so it stays out of users' ``shoal list``.

Each scenario records its outcome and latency as Prometheus metrics (served with
``--metrics-port``; the alert rules in deploy/prometheus/alerts.yml read them). A scenario that
works but takes longer than ``--max-latency`` counts as ``slow``, which is a failure too.
``--once`` exits 1 if any scenario failed, so CI can run it against a devstack.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import click
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shoal_cli import jobspec
from shoal_client.client import JobDetails, Progress
from shoal_common.spec import (
    DockerSpec,
    Engine,
    ExecutionStateType,
    Job,
    JobState,
    JobStateType,
    Spec,
)

log = structlog.get_logger(__name__)

CANARY_ANNOTATION = "shoal-canary"
DEFAULT_IMAGE = "shoal-test/busybox:latest"
INPUT_FILE = "canary.txt"
# Known input for the CID scenario: deterministic, so its CID and md5 never change.
INPUT_CONTENT = b"".join(b"shoal canary input line %04d\n" % i for i in range(2048))
INPUT_MD5 = hashlib.md5(INPUT_CONTENT).hexdigest()

SCENARIOS = (
    "list",
    "submit",
    "submit_describe",
    "submit_get",
    "submit_concurrency",
    "cid_input",
)

OUTCOME_SUCCESS = "success"
OUTCOME_FAILURE = "failure"
OUTCOME_SLOW = "slow"

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class CanaryClient(Protocol):
    """What the canary needs from :class:`shoal_client.client.ShoalClient` (a fake in tests)."""

    def list_jobs(
        self,
        *,
        limit: int = 10,
        return_all: bool = False,
        include_tags: list[str] | None = None,
        exclude_tags: list[str] | None = None,
        newest_first: bool = True,
        job_id: str | None = None,
    ) -> list[dict[str, Any]]: ...

    def submit(self, spec: Spec) -> Job: ...

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_change: Callable[[JobState], None] | None = None,
    ) -> JobState: ...

    def describe(self, job_id: str) -> JobDetails: ...

    def results(self, job_id: str) -> list[dict[str, Any]]: ...

    def download(self, cid: str, dest: Path, *, progress: Progress | None = None) -> Path: ...

    def put(self, path: Path, *, progress: Progress | None = None) -> str: ...


class CanaryFailure(Exception):
    """A scenario's check did not hold; the message says what was expected and what came."""


@dataclass
class CanaryConfig:
    image: str = DEFAULT_IMAGE
    max_latency: float = 60.0  # seconds; above it a working scenario counts as slow
    job_timeout: float = 120.0  # seconds to wait for one job to end
    concurrency: int = 3
    publisher: str | None = None  # None = the cluster's default (Local)
    scenarios: tuple[str, ...] = SCENARIOS


@dataclass
class ScenarioResult:
    scenario: str
    outcome: str
    latency: float
    error: str = ""
    job_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == OUTCOME_SUCCESS


class CanaryMetrics:
    """The canary's Prometheus metrics, in their own registry (one per runner)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.runs = Counter(
            "shoal_canary_runs_total",
            "Canary scenario runs by outcome (success, failure, slow)",
            ["scenario", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "shoal_canary_latency_seconds",
            "Canary scenario latency, start to verified result",
            ["scenario"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.last_success = Gauge(
            "shoal_canary_last_run_success",
            "1 if the scenario's last run succeeded in time, else 0",
            ["scenario"],
            registry=self.registry,
        )
        self.last_latency = Gauge(
            "shoal_canary_last_latency_seconds",
            "Latency of the scenario's last run",
            ["scenario"],
            registry=self.registry,
        )
        self.last_run = Gauge(
            "shoal_canary_last_run_timestamp_seconds",
            "Unix time the scenario last ran",
            ["scenario"],
            registry=self.registry,
        )
        self.max_latency = Gauge(
            "shoal_canary_max_latency_seconds",
            "The configured latency threshold (--max-latency)",
            registry=self.registry,
        )

    def record(self, result: ScenarioResult) -> None:
        self.runs.labels(result.scenario, result.outcome).inc()
        self.latency.labels(result.scenario).observe(result.latency)
        self.last_success.labels(result.scenario).set(1 if result.ok else 0)
        self.last_latency.labels(result.scenario).set(result.latency)
        self.last_run.labels(result.scenario).set(time.time())

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when absent); for tests and the summary line."""
        got = self.registry.get_sample_value(name, labels)
        return float(got or 0.0)


@dataclass
class CanaryRunner:
    """Runs the scenarios against ``client``; knows nothing of click or HTTP."""

    client: CanaryClient
    config: CanaryConfig = field(default_factory=CanaryConfig)
    metrics: CanaryMetrics = field(default_factory=CanaryMetrics)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.metrics.max_latency.set(self.config.max_latency)
        unknown = set(self.config.scenarios) - set(SCENARIOS)
        if unknown:
            raise ValueError(f"unknown canary scenario(s): {', '.join(sorted(unknown))}")

    def run_all(self) -> list[ScenarioResult]:
        return [self.run(name) for name in self.config.scenarios]

    def run(self, scenario: str) -> ScenarioResult:
        step: Callable[[], str | None] = getattr(self, f"_scenario_{scenario}")
        start = self.clock()
        job_id: str | None = None
        try:
            job_id = step()
        except Exception as exc:  # any failure of any layer is the canary's finding
            latency = self.clock() - start
            error = str(exc) or type(exc).__name__
            result = ScenarioResult(scenario, OUTCOME_FAILURE, latency, error, _job_of(exc))
        else:
            latency = self.clock() - start
            if latency > self.config.max_latency:
                error = f"took {latency:.1f}s, over the {self.config.max_latency:g}s threshold"
                result = ScenarioResult(scenario, OUTCOME_SLOW, latency, error, job_id)
            else:
                result = ScenarioResult(scenario, OUTCOME_SUCCESS, latency, "", job_id)
        self.metrics.record(result)
        log.info(
            "canary_scenario_ran",
            scenario=scenario,
            outcome=result.outcome,
            latency_s=round(result.latency, 3),
            job_id=result.job_id,
            error=result.error or None,
        )
        return result

    # --- scenarios (each returns the job id it used, raises CanaryFailure when a check fails) ---

    def _scenario_list(self) -> str | None:
        # What `shoal list` asks: the 10 newest jobs, canary jobs left out.
        jobs = self.client.list_jobs(limit=10, newest_first=True, exclude_tags=[CANARY_ANNOTATION])
        if not isinstance(jobs, list):
            raise CanaryFailure(f"list answered {type(jobs).__name__}, not a list")
        if len(jobs) > 10:
            raise CanaryFailure(f"list of 10 newest returned {len(jobs)} jobs")
        shown = [j for j in jobs if CANARY_ANNOTATION in _annotations(j)]
        if shown:
            raise CanaryFailure(f"list shows {len(shown)} canary job(s) despite exclude_tags")
        return None

    def _scenario_submit(self) -> str | None:
        job_id, _ = self._submit_and_wait(["echo", _message()])
        return job_id

    def _scenario_submit_describe(self) -> str | None:
        job_id, _ = self._submit_and_wait(["echo", _message()])
        details = self.client.describe(job_id)
        if details.state.job_id != job_id or details.job.metadata.id not in ("", job_id):
            raise _failure(job_id, f"describe returned another job ({details.state.job_id})")
        if details.state.state != JobStateType.COMPLETED:
            raise _failure(job_id, f"describe says {details.state.state.value}, not Completed")
        if not details.history:
            raise _failure(job_id, "describe returned no events")
        return job_id

    def _scenario_submit_get(self) -> str | None:
        message = _message()
        job_id, _ = self._submit_and_wait(["echo", message])
        stdout = self._first_stdout(job_id)
        if stdout.rstrip("\n") != message:
            raise _failure(job_id, f"stdout is {stdout[:80]!r}, expected {message!r}")
        return job_id

    def _scenario_submit_concurrency(self) -> str | None:
        n = self.config.concurrency
        job_id, state = self._submit_and_wait(["echo", _message()], concurrency=n)
        done = [e for e in state.executions if e.state == ExecutionStateType.COMPLETED]
        if len(done) < n:
            raise _failure(job_id, f"{len(done)} of {n} executions completed")
        return job_id

    def _scenario_cid_input(self) -> str | None:
        with tempfile.TemporaryDirectory(prefix="shoal-canary-") as tmp:
            folder = Path(tmp) / "input"
            folder.mkdir()
            (folder / INPUT_FILE).write_bytes(INPUT_CONTENT)
            cid = self.client.put(folder)
        job_id, _ = self._submit_and_wait(
            ["md5sum", f"/inputs/{INPUT_FILE}"], inputs=(f"ipfs://{cid}:/inputs",)
        )
        stdout = self._first_stdout(job_id)
        got = stdout.split()[0] if stdout.split() else ""
        if got != INPUT_MD5:
            raise _failure(job_id, f"md5 of the CID input is {got or stdout!r}, not {INPUT_MD5}")
        return job_id

    # --- helpers ---------------------------------------------------------------------------------

    def spec(
        self, command: list[str], *, concurrency: int = 1, inputs: tuple[str, ...] = ()
    ) -> Spec:
        """A canary job: the configured image running ``command``, tagged ``shoal-canary``."""
        spec = Spec(
            Engine=Engine.DOCKER,
            Docker=DockerSpec(Image=self.config.image, Entrypoint=command),
            **jobspec.common_spec(
                inputs=inputs,
                concurrency=concurrency,
                timeout=self.config.job_timeout,
                publisher=self.config.publisher,
                labels=(CANARY_ANNOTATION,),
                default_output=False,
            ),
        )
        return jobspec.check_spec(spec)

    def _submit_and_wait(
        self, command: list[str], *, concurrency: int = 1, inputs: tuple[str, ...] = ()
    ) -> tuple[str, JobState]:
        job = self.client.submit(self.spec(command, concurrency=concurrency, inputs=inputs))
        job_id = job.metadata.id
        if not job_id:
            raise CanaryFailure("submit returned a job without an id")
        try:
            state = self.client.wait(job_id, timeout=self.config.job_timeout)
        except Exception as exc:
            raise _failure(job_id, f"waiting for the job failed: {exc}") from exc
        if state.state != JobStateType.COMPLETED:
            why = "; ".join(e.status for e in state.executions if e.status)
            raise _failure(job_id, f"job ended {state.state.value}" + (f": {why}" if why else ""))
        return job_id, state

    def _first_stdout(self, job_id: str) -> str:
        results = self.client.results(job_id)
        cids = [str((r.get("Data") or {}).get("CID") or "") for r in results]
        cids = [c for c in cids if c]
        if not cids:
            raise _failure(job_id, "the job has no published result")
        with tempfile.TemporaryDirectory(prefix="shoal-canary-") as tmp:
            dest = self.client.download(cids[0], Path(tmp) / "result")
            stdout = dest / "stdout"
            if not stdout.is_file():
                raise _failure(job_id, "the result has no stdout file")
            return stdout.read_text(errors="replace")


def _annotations(job: dict[str, Any]) -> list[str]:
    """A listed job's annotations; the legacy list nests the job as ``{"Job": {...}, ...}``."""
    nested = job.get("Job")
    inner: dict[str, Any] = nested if isinstance(nested, dict) else job
    spec = inner.get("Spec") or inner.get("spec") or {}
    found = spec.get("Annotations") if isinstance(spec, dict) else None
    return [str(a) for a in found] if isinstance(found, list) else []


def _message() -> str:
    return f"shoal-canary-{uuid.uuid4().hex[:12]}"


def _failure(job_id: str, message: str) -> CanaryFailure:
    exc = CanaryFailure(f"job {job_id}: {message}")
    exc.job_id = job_id  # type: ignore[attr-defined]
    return exc


def _job_of(exc: BaseException) -> str | None:
    job_id = getattr(exc, "job_id", None)
    return job_id if isinstance(job_id, str) else None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """``300``, ``30s``, ``5m``, ``1h``, ``500ms`` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 5m, 1h)")
    value = float(match.group(1))
    unit = match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def _seconds(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """click callback: a duration flag's text into seconds."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT end the loop between rounds (a container stop is not a failure)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _report(results: list[ScenarioResult]) -> None:
    for r in results:
        mark = "ok  " if r.ok else r.outcome.upper()[:4]
        job = f"  job={r.job_id}" if r.job_id else ""
        error = f"  {r.error}" if r.error else ""
        click.echo(f"{mark} {r.scenario:<20} {r.latency:7.2f}s{job}{error}", err=True)
    failed = sum(not r.ok for r in results)
    click.echo(f"canary: {len(results) - failed} passed, {failed} failed", err=True)


@click.command()
@click.option("--once", "mode", flag_value="once", help="Run every scenario once and exit.")
@click.option(
    "--every",
    default=None,
    metavar="DURATION",
    callback=_seconds,
    help="Run every scenario on this period (e.g. 5m) until stopped.",
)
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Image for canary jobs.")
@click.option(
    "--max-latency",
    default="60s",
    metavar="DURATION",
    callback=_seconds,
    show_default=True,
    help="A scenario slower than this counts as failed (slow).",
)
@click.option(
    "--job-timeout",
    default="120s",
    metavar="DURATION",
    callback=_seconds,
    show_default=True,
    help="Give up on a canary job after this long.",
)
@click.option("--concurrency", type=int, default=3, show_default=True)
@click.option("--publisher", default=None, help="Publisher for canary jobs (default: cluster's).")
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice(SCENARIOS),
    help="Run only these scenarios (repeat); default all.",
)
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port.")
@click.option("--metrics-host", default="0.0.0.0", show_default=True)
@click.pass_context
def canary(
    ctx: click.Context,
    mode: str | None,
    every: float | None,
    image: str,
    max_latency: float,
    job_timeout: float,
    concurrency: int,
    publisher: str | None,
    scenarios: tuple[str, ...],
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run the canary scenarios against the cluster (``--once`` or ``--every 5m``)."""
    from shoal_client.client import ShoalClient, api_base_url

    if (mode == "once") == (every is not None):
        raise click.UsageError("give exactly one of --once or --every DURATION")
    if every is not None and every <= 0:
        raise click.BadParameter("must be positive", param_hint="--every")
    base_url = (ctx.obj or {}).get("base_url") if isinstance(ctx.obj, dict) else None
    config = CanaryConfig(
        image=image,
        max_latency=max_latency,
        job_timeout=job_timeout,
        concurrency=concurrency,
        publisher=publisher,
        scenarios=scenarios or SCENARIOS,
    )
    metrics = CanaryMetrics()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)
    with ShoalClient(base_url or api_base_url()) as client:
        runner = CanaryRunner(client, config, metrics)
        if every is None:
            results = runner.run_all()
            _report(results)
            if not all(r.ok for r in results):
                ctx.exit(1)
            return
        stop = threading.Event()
        with _stop_on_signals(stop):
            while not stop.is_set():
                started = time.monotonic()
                _report(runner.run_all())
                stop.wait(max(0.0, every - (time.monotonic() - started)))
