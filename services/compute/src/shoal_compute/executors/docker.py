"""The Docker executor: one container per execution, through the Docker Engine API.

Per run it makes five API calls: create, attach, start, wait (answered at once: the attach stream
ends when the container exits) and remove. After a normal exit the removal runs in the background
(the container has stopped and let go of its mounts): the run's result does not wait for it, and
:meth:`DockerExecutor.settled` / ``close`` do. The attach stream is read on the event loop itself
(the hijacked socket is handed to asyncio), so a running job holds no thread; the other calls are
short and run on this executor's own small thread pool. Logs are attached before start and the
container's log driver is ``none``: output is copied once, straight into the results folder and
the live log sink, and never piles up in the daemon's json-file logs.

Nothing is pulled: there is no registry in a Shoal cluster's contract, so an image must already
be on the node (``check`` refuses jobs whose image is missing or built for another platform).
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

import docker
import docker.errors
import structlog
from docker.transport import UnixHTTPAdapter
from docker.types import DeviceRequest, HostConfig, LogConfig
from docker.types import Mount as DockerMount
from docker.utils.socket import read as blocking_socket_read

from shoal_common.spec import Engine, Job, NetworkType, parse_gpu
from shoal_compute.executors.base import (
    BidCheck,
    ExecutionRequest,
    LogSink,
    LogStream,
    RunResult,
    write_exit_code,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

LABEL_MANAGED = "shoal.managed"
LABEL_EXECUTION = "shoal.execution_id"
LABEL_EXECUTOR = "shoal.executor"  # one value per DockerExecutor instance, for close()
LABEL_NODE = "shoal.node_id"
# Node ids are only unique within a cluster (every devstack has a "compute-0"), so leftovers are
# matched on the node's state directory too: one daemon can serve many clusters' nodes.
LABEL_NODE_HOME = "shoal.node_home"

# Docker's default capability set minus what a batch job has no business with (MKNOD, NET_RAW,
# SETFCAP, SETPCAP, SYS_CHROOT, AUDIT_WRITE). What is kept lets ordinary images work: root
# writing into output folders the node created as another user (DAC_OVERRIDE, FOWNER), and
# images that drop to an unprivileged user at start (SETUID, SETGID, CHOWN).
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
)

EXIT_CODE_NOT_RUN = -1  # the container never ran (image missing, bad config, start failed)
_READ_SIZE = 256 * 1024
_DRAIN_AFTER_KILL = 10.0  # seconds to wait for the output stream to end once killed
EXIT_CODE_SIGKILL = 137  # 128 + SIGKILL: what the OOM killer (among others) leaves
# Seconds a SIGKILLed run waits for Docker's OOMKilled flag (cgroup v2): 1 s was too short for
# the full suite on 2 cores (the flag came later, 2026-12-05); only unexplained SIGKILLs wait.
_OOM_FLAG_WAIT = 3.0

_GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "arm": "arm",
    "i386": "386",
    "i686": "386",
    "386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def go_arch(machine: str | None = None) -> str:
    """Docker/Go's name for an architecture (``x86_64`` -> ``amd64``); default: this machine's."""
    name = (machine if machine is not None else platform.machine()).lower()
    return _GO_ARCH.get(name, name)


@dataclass
class _Running:
    """What cancel() and close() need to reach a run in flight."""

    container_id: str | None = None
    cancelled: bool = False
    closing: bool = False
    exited: bool = False  # it ended on its own, the daemon says: it holds nothing now
    done: asyncio.Event = field(default_factory=asyncio.Event)


class _RunnerError(Exception):
    """The sandbox could not run the job; the message is the RunResult's runner_error."""


class _OnePoolUnixAdapter(UnixHTTPAdapter):  # type: ignore[misc]
    """docker-py's Unix-socket adapter with one connection pool instead of one per request URL.

    docker-py keys its pools by the full URL (``.../containers/<id>/start``) and keeps 25, closing
    the least recently used; with many containers at once it closes pools that other threads are
    still using, and a request fails with ``'NoneType' object has no attribute 'qsize'``. Every
    request goes to the same socket, so one pool, sized to the executor's threads, is right.
    """

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        return super().get_connection("http+docker://localhost", proxies)


def docker_client(max_pool_size: int) -> Any:
    """A ``docker.DockerClient`` from the environment whose Unix-socket requests share one pool."""
    client = docker.from_env(max_pool_size=max_pool_size)
    adapter = client.api.get_adapter("http+docker://localhost")
    if isinstance(adapter, UnixHTTPAdapter):
        one_pool = _OnePoolUnixAdapter(
            "http+unix://" + adapter.socket_path, adapter.timeout, max_pool_size=max_pool_size
        )
        client.api.mount("http+docker://", one_pool)
        client.api._custom_adapter = one_pool
        adapter.close()
    return client


class DockerExecutor:
    """Runs Docker jobs on the local Docker Engine.

    Args:
        node_arch: this node's architecture, Go style (``amd64``, ``arm64``); see :func:`go_arch`.
        allow_networking: whether this node runs jobs that ask for networking at all.
        gpus: the GPU ids this node declares (nvidia-smi indexes or UUIDs); executions get a
            subset in ``Limits.gpu_ids``.
        client_factory: makes the ``docker.DockerClient`` (default :func:`docker_client`);
            called once, lazily, on a worker thread.
        node_id: labels containers so a restarted node can find its own leftovers.
        node_home: a digest of the node's state directory, labelled alongside ``node_id``.
        cap_add: capabilities kept after dropping all of them.
        image_cache_ttl: seconds an image inspection is reused by ``check``.
        max_threads: size of the pool that runs the (short) blocking Docker API calls.
    """

    engine: Engine = Engine.DOCKER

    def __init__(
        self,
        node_arch: str,
        allow_networking: bool = False,
        gpus: Sequence[str] = (),
        client_factory: Callable[[], Any] | None = None,
        *,
        node_id: str = "",
        node_home: str = "",
        cap_add: Sequence[str] = DEFAULT_CAPABILITIES,
        image_cache_ttl: float = 5.0,
        max_threads: int = 16,
        gpu_devices: bool = True,
    ) -> None:
        self.node_arch = go_arch(node_arch)
        # False for GPUs that are only declared (tests, demos): the assignment is passed as
        # NVIDIA_VISIBLE_DEVICES but no device is requested from a driver that is not there.
        self.gpu_devices = gpu_devices
        self.allow_networking = allow_networking
        self.gpus = list(gpus)
        self.node_id = node_id
        self.node_home = node_home
        self.instance_id = uuid.uuid4().hex[:16]
        # One more connection than threads: the pool is never full, so no connection is dropped.
        self._client_factory = client_factory or partial(docker_client, max_threads + 1)
        self._cap_add = list(cap_add)
        self._image_cache_ttl = image_cache_ttl
        self._image_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="shoal-docker")
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._running: dict[str, _Running] = {}
        self._removals: set[asyncio.Future[bool]] = set()
        self._closed = False

    # --- plumbing ---------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking docker-py call on the pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(fn, *args, **kwargs))

    async def _api(self) -> Any:
        """The low-level ``docker.APIClient`` (created on first use: it talks to the daemon)."""
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await self._call(self._client_factory)
        return self._client.api

    # --- Executor protocol ------------------------------------------------------------------

    async def is_available(self) -> bool:
        """Whether the Docker daemon answers a ping."""
        if self._closed:
            return False
        try:
            api = await self._api()
            return bool(await self._call(api.ping))
        except Exception as exc:
            log.info("docker_unavailable", error=str(exc))
            return False

    async def check(self, job: Job) -> BidCheck:
        """Admission: the image is on this node and built for its platform; GPUs and network fit."""
        if self._closed:
            return BidCheck(False, "the Docker executor is shut down")
        spec = job.spec.docker
        image = spec.image.strip() if spec else ""
        if not image:
            return BidCheck(False, "the job has no Docker image")
        network = job.spec.network
        if (
            network is not None
            and network.type not in (None, NetworkType.NONE)
            and not self.allow_networking
        ):
            return BidCheck(False, "this node does not run jobs that need networking")
        resources = job.spec.resources
        try:
            wanted_gpus = parse_gpu(resources.gpu if resources else None) or 0
        except ValueError as exc:
            return BidCheck(False, str(exc))
        if wanted_gpus > len(self.gpus):
            return BidCheck(
                False, f"the job needs {wanted_gpus} GPU(s), this node has {len(self.gpus)}"
            )
        try:
            attrs = await self._inspect_image(image)
        except Exception as exc:
            return BidCheck(False, f"cannot inspect image {image}: {_explain(exc)}")
        if attrs is None:
            return BidCheck(False, f"image {image} not found on this node")
        image_os = str(attrs.get("Os") or "linux").lower()
        image_arch = go_arch(str(attrs.get("Architecture") or ""))
        if image_os != "linux" or image_arch != self.node_arch:
            return BidCheck(
                False,
                f"image {image} is {image_os}/{image_arch}, this node is linux/{self.node_arch}",
            )
        return BidCheck(True)

    async def run(self, request: ExecutionRequest) -> RunResult:
        """Run one container to its end; see the module docstring for the call sequence."""
        eid = request.execution_id
        if self._closed:
            return RunResult(EXIT_CODE_NOT_RUN, runner_error="the Docker executor is shut down")
        if eid in self._running:
            return RunResult(EXIT_CODE_NOT_RUN, runner_error=f"execution {eid} is already running")
        state = _Running()
        self._running[eid] = state
        files: tuple[IO[bytes], IO[bytes]] | None = None
        result = RunResult(EXIT_CODE_NOT_RUN, runner_error="the run did not finish")
        try:
            files = await self._call(_open_log_files, request.results_dir)
            result = await self._run(request, state, files)
        except _RunnerError as exc:
            result = RunResult(EXIT_CODE_NOT_RUN, runner_error=str(exc))
        except Exception as exc:
            # The daemon went away mid-run, the results folder is unwritable, ...: a result the
            # node can record, not an exception that unwinds it.
            log.exception("docker_run_failed", execution_id=eid)
            result = RunResult(EXIT_CODE_NOT_RUN, runner_error=f"docker: {_explain(exc)}")
        finally:
            # Shielded: even if this task is being cancelled, the pool thread still removes the
            # container (a thread cannot be interrupted).
            api = self._client.api if self._client is not None else None
            container_id = state.container_id
            if api is not None and container_id is not None and state.exited:
                # Exited: removing it is housekeeping, off the job's critical path (~30 ms).
                removal = asyncio.ensure_future(self._call(_remove_container, api, container_id))
                self._removals.add(removal)
                removal.add_done_callback(self._removals.discard)
                container_id = None
            cleanup = self._call(
                _finish, api, container_id, files, request.results_dir, result.exit_code
            )
            try:
                await asyncio.shield(cleanup)
            finally:
                self._running.pop(eid, None)
                state.done.set()
        log.debug(
            "docker_run_finished",
            execution_id=eid,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            cancelled=result.cancelled,
            runner_error=result.runner_error or None,
        )
        return result

    async def cancel(self, execution_id: str) -> None:
        """Kill the execution's container; its ``run`` returns with ``cancelled=True``."""
        state = self._running.get(execution_id)
        if state is None:
            return
        state.cancelled = True
        if state.container_id is not None:
            await self._kill(state.container_id)

    async def settled(self) -> None:
        """Wait for the removals of finished runs' containers still in progress."""
        while self._removals:
            await asyncio.wait(set(self._removals))

    async def close(self) -> None:
        """Remove every container this executor instance made, running or not, and let go."""
        if self._closed:
            return
        self._closed = True
        for state in self._running.values():
            state.closing = True
        if self._client is not None:
            await self.settled()
            try:
                await self._remove_labelled({LABEL_EXECUTOR: self.instance_id})
            except Exception as exc:
                log.warning("docker_close_cleanup_failed", error=_explain(exc))
            pending = [asyncio.ensure_future(s.done.wait()) for s in self._running.values()]
            if pending:
                # Runs end on their own once their containers are gone; give them a moment.
                _done, still = await asyncio.wait(pending, timeout=_DRAIN_AFTER_KILL)
                for task in still:
                    task.cancel()
            await self._call(self._client.close)
        self._pool.shutdown(wait=False)

    # --- extras for the compute node --------------------------------------------------------

    async def remove_leftovers(self) -> int:
        """Remove containers a previous process of this node left behind (same ``node_id``).

        Call at node start-up. Only containers labelled with this node's id and another executor
        instance are touched, so nodes sharing one Docker daemon (devstack) leave each other be.
        """
        if not self.node_id:
            return 0
        api = await self._api()
        found = await self._call(
            api.containers,
            all=True,
            filters={"label": [f"{LABEL_MANAGED}=true", *self._node_labels()]},
        )
        stale = [
            c["Id"]
            for c in found
            if (c.get("Labels") or {}).get(LABEL_EXECUTOR) != self.instance_id
        ]
        await asyncio.gather(*(self._call(_remove_container, api, cid) for cid in stale))
        return len(stale)

    def _node_labels(self) -> list[str]:
        found = [f"{LABEL_NODE}={self.node_id}"]
        if self.node_home:
            found.append(f"{LABEL_NODE_HOME}={self.node_home}")
        return found

    # --- internals --------------------------------------------------------------------------

    async def _run(
        self, request: ExecutionRequest, state: _Running, files: tuple[IO[bytes], IO[bytes]]
    ) -> RunResult:
        eid = request.execution_id
        api = await self._api()
        config = self._container_config(request, api.api_version)
        image = config["image"]
        try:
            created = await self._call(api.create_container, **config)
        except docker.errors.ImageNotFound:
            raise _RunnerError(f"image {image} not found on this node") from None
        except docker.errors.APIError as exc:
            raise _RunnerError(f"could not create the container: {_explain(exc)}") from None
        state.container_id = cid = str(created["Id"])
        if state.cancelled or state.closing or self._closed:
            return self._stopped_before_start(state)

        # Attached before start, so no output can be missed; see _AttachStream for the socket.
        attached = await self._call(api.attach_socket, cid, dict(_ATTACH_PARAMS))
        stream = _AttachStream(attached, self._pool)
        pump: asyncio.Task[None] | None = None
        try:
            try:
                await self._call(api.start, cid)
            except docker.errors.APIError as exc:
                raise _RunnerError(f"could not start the container: {_explain(exc)}") from None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + request.timeout if request.timeout else None
            if state.cancelled or state.closing:  # cancel() raced with start
                await self._kill(cid)

            pump = asyncio.create_task(_pump(stream, files, request.log_sink, self._pool))
            timed_out = not await _wait_until(pump, deadline)
            if timed_out:
                await self._kill(cid)
                await _wait_until(pump, loop.time() + _DRAIN_AFTER_KILL)
            if pump.done() and (error := pump.exception()) is not None:
                log.warning("docker_log_stream_failed", execution_id=eid, error=str(error))

            # The stream ended, so the container has (almost always) exited and this returns at
            # once; if the stream broke early it still honours the deadline.
            waiter = asyncio.ensure_future(self._call(api.wait, cid))
            if not timed_out and not await _wait_until(waiter, deadline):
                timed_out = True
                await self._kill(cid)
            if timed_out and not await _wait_until(waiter, loop.time() + _DRAIN_AFTER_KILL):
                # Killed yet not exiting: give up on the exit code; the forced removal in run()
                # still ends it (and with it this wait).
                waiter.add_done_callback(_ignore_outcome)
                raise _RunnerError(f"timed out after {request.timeout:g}s; the kill did not take")
            try:
                status = await waiter
            except Exception as exc:
                raise _RunnerError(f"lost track of the container: {_explain(exc)}") from None
            # A run that ended on its own; a killed one is removed before run() returns.
            state.exited = not (timed_out or state.cancelled or state.closing)
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
            stream.close()

        exit_code = int(status.get("StatusCode", EXIT_CODE_NOT_RUN))
        if timed_out:
            assert request.timeout is not None
            return RunResult(
                exit_code,
                runner_error=f"timed out after {request.timeout:g}s",
                timed_out=True,
                cancelled=state.cancelled,
            )
        if state.cancelled:
            return RunResult(exit_code, cancelled=True)
        if state.closing:
            return RunResult(exit_code, runner_error="the compute node shut down during the run")
        # Any failure, not just 137: the OOM killer may have picked a child the job outlived.
        if exit_code != 0 and await self._oom_killed(cid, killed=exit_code == EXIT_CODE_SIGKILL):
            return RunResult(
                exit_code,
                runner_error=(
                    f"out of memory: the job exceeded its memory limit of "
                    f"{request.limits.memory} bytes"
                ),
            )
        return RunResult(exit_code)

    def _stopped_before_start(self, state: _Running) -> RunResult:
        if state.cancelled:
            return RunResult(EXIT_CODE_NOT_RUN, cancelled=True)
        return RunResult(EXIT_CODE_NOT_RUN, runner_error="the compute node shut down")

    def _container_config(self, request: ExecutionRequest, api_version: str) -> dict[str, Any]:
        """The create_container arguments for one execution (no API call)."""
        spec = request.job.spec.docker
        image = spec.image.strip() if spec else ""
        if spec is None or not image:
            raise _RunnerError("the job has no Docker image")
        if request.network and not self.allow_networking:
            raise _RunnerError("the job asks for networking, which this node does not allow")
        undeclared = [g for g in request.limits.gpu_ids if g not in self.gpus]
        if undeclared:
            raise _RunnerError(f"GPU(s) {', '.join(undeclared)} are not declared on this node")

        env: dict[str, str] = {}
        for item in spec.environment_variables or []:
            key, sep, value = item.partition("=")
            if sep and key:
                env[key] = value
        env.update(request.env)

        limits = request.limits
        mounts = [
            DockerMount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only)
            for m in (*request.inputs, *request.outputs)
        ]
        device_requests = (
            [
                DeviceRequest(
                    driver="nvidia", device_ids=list(limits.gpu_ids), capabilities=[["gpu"]]
                )
            ]
            if limits.gpu_ids and self.gpu_devices
            else None
        )
        if limits.gpu_ids:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(limits.gpu_ids)
        memory = limits.memory if limits.memory > 0 else None
        host_config = HostConfig(
            version=api_version,
            network_mode="bridge" if request.network else "none",
            privileged=False,
            cap_drop=["ALL"],
            cap_add=self._cap_add or None,
            security_opt=["no-new-privileges"],
            nano_cpus=int(limits.cpu * 1e9) if limits.cpu > 0 else None,
            mem_limit=memory,
            memswap_limit=memory,  # no swap beyond the limit: the limit means what it says
            pids_limit=limits.pids if limits.pids > 0 else None,
            mounts=mounts or None,
            device_requests=device_requests,
            log_config=LogConfig(type="none"),
        )
        labels = {
            LABEL_MANAGED: "true",
            LABEL_EXECUTION: request.execution_id,
            LABEL_EXECUTOR: self.instance_id,
        }
        if self.node_id:
            labels[LABEL_NODE] = self.node_id
        if self.node_home:
            labels[LABEL_NODE_HOME] = self.node_home
        return {
            "image": image,
            # Like the reference system: the job's command replaces the image's entrypoint
            # (and with it the image's CMD); empty means run the image's defaults.
            "entrypoint": list(spec.entrypoint) if spec.entrypoint else None,
            "environment": [f"{k}={v}" for k, v in env.items()] or None,
            "working_dir": spec.working_directory or None,
            "labels": labels,
            "host_config": host_config,
            "network_disabled": not request.network,
            "detach": True,
            "stdin_open": False,
            "tty": False,
        }

    async def _inspect_image(self, image: str) -> dict[str, Any] | None:
        now = time.monotonic()
        cached = self._image_cache.get(image)
        if cached is not None and cached[0] > now:
            return cached[1]
        api = await self._api()
        attrs: dict[str, Any] | None
        try:
            attrs = await self._call(api.inspect_image, image)
        except docker.errors.ImageNotFound:
            attrs = None
        self._image_cache[image] = (now + self._image_cache_ttl, attrs)
        return attrs

    async def _kill(self, container_id: str) -> None:
        api = await self._api()
        try:
            await self._call(api.kill, container_id)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: not running any more, which is what we wanted
                log.warning("docker_kill_failed", container=container_id[:12], error=_explain(exc))

    async def _oom_killed(self, container_id: str, *, killed: bool) -> bool:
        """Whether the OOM killer ended the container (Docker's ``State.OOMKilled``).

        With cgroup v2 the daemon learns of the OOM from an event that can arrive after the
        exit (nomad#13119 saw the same): a SIGKILLed run (``killed``) that we did not kill
        ourselves is looked at again for up to ``_OOM_FLAG_WAIT`` before it counts as not OOM.
        """
        api = await self._api()
        deadline = asyncio.get_running_loop().time() + (_OOM_FLAG_WAIT if killed else 0.0)
        while True:
            try:
                info = await self._call(api.inspect_container, container_id)
            except docker.errors.APIError:
                return False
            if (info.get("State") or {}).get("OOMKilled"):
                return True
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def _remove_labelled(self, labels: dict[str, str]) -> None:
        api = await self._api()
        selectors = [f"{LABEL_MANAGED}=true", *(f"{k}={v}" for k, v in labels.items())]
        found = await self._call(api.containers, all=True, filters={"label": selectors})
        await asyncio.gather(*(self._call(_remove_container, api, c["Id"]) for c in found))


_ATTACH_PARAMS = {"stdout": 1, "stderr": 1, "stream": 1}


class _AttachStream:
    """The hijacked attach connection, read without holding a thread where possible.

    docker-py hands back the raw socket under the HTTP response. A plain (unix or TCP) socket is
    switched to non-blocking and read with ``loop.sock_recv``; TLS, SSH and named pipes fall
    back to blocking reads on the pool. We attach before the container starts, so the daemon has
    sent nothing beyond the 101 response and http.client's read buffer holds no frame bytes.
    """

    def __init__(self, sock: Any, pool: ThreadPoolExecutor) -> None:
        self._sock = sock
        self._pool = pool
        raw = getattr(sock, "_sock", sock)
        self._raw: socket.socket | None = None
        if isinstance(raw, socket.socket) and not isinstance(raw, ssl.SSLSocket):
            raw.setblocking(False)
            self._raw = raw

    async def read(self) -> bytes:
        loop = asyncio.get_running_loop()
        if self._raw is not None:
            return await loop.sock_recv(self._raw, _READ_SIZE)
        data = await loop.run_in_executor(self._pool, blocking_socket_read, self._sock, _READ_SIZE)
        return data if isinstance(data, bytes) else b""

    def close(self) -> None:
        response = getattr(self._sock, "_response", None)
        for closer in (
            getattr(response, "close", None),
            self._sock.close,
            getattr(self._raw, "close", None),
        ):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer()


class _Demuxer:
    """Splits Docker's multiplexed stream (8-byte header: stream id, 0, 0, 0, size BE32).

    Consecutive frames of the same stream are joined, so a burst of small writes reaches the
    files and the log sink as one chunk.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[LogStream, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[LogStream, bytearray]] = []
        pos, end = 0, len(buf)
        while end - pos >= 8:
            size = int.from_bytes(buf[pos + 4 : pos + 8], "big")
            if end - pos - 8 < size:
                break
            # 1 = stdout; 2 = stderr and 3 = the daemon's own errors, both shown as stderr.
            stream = LogStream.STDOUT if buf[pos] == 1 else LogStream.STDERR
            payload = buf[pos + 8 : pos + 8 + size]
            if out and out[-1][0] is stream:
                out[-1][1].extend(payload)
            elif payload:
                out.append((stream, payload))
            pos += 8 + size
        del buf[:pos]
        return [(stream, bytes(chunk)) for stream, chunk in out]


async def _pump(
    stream: _AttachStream,
    files: tuple[IO[bytes], IO[bytes]],
    sink: LogSink,
    pool: ThreadPoolExecutor,
) -> None:
    """Copy the container's output to the results files and the live log sink until EOF."""
    loop = asyncio.get_running_loop()
    demux = _Demuxer()
    sink_ok = True
    while True:
        data = await stream.read()
        if not data:
            return
        parts = demux.feed(data)
        if not parts:
            continue
        await loop.run_in_executor(pool, _write_parts, files, parts)
        if sink_ok:
            for which, chunk in parts:
                try:
                    await sink(which, chunk)
                except Exception as exc:
                    # Live logs are a convenience; the results files stay complete regardless.
                    log.warning("log_sink_failed", error=str(exc))
                    sink_ok = False
                    break


async def _wait_until(fut: Awaitable[Any], deadline: float | None) -> bool:
    """Wait for ``fut`` without cancelling it; False if ``deadline`` (loop time) passed first."""
    loop = asyncio.get_running_loop()
    timeout = None if deadline is None else max(0.0, deadline - loop.time())
    done, _ = await asyncio.wait({asyncio.ensure_future(fut)}, timeout=timeout)
    return bool(done)


def _ignore_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _open_log_files(results_dir: Path) -> tuple[IO[bytes], IO[bytes]]:
    results_dir.mkdir(parents=True, exist_ok=True)
    out = (results_dir / "stdout").open("wb")
    try:
        err = (results_dir / "stderr").open("wb")
    except BaseException:
        out.close()
        raise
    return out, err


def _write_parts(files: tuple[IO[bytes], IO[bytes]], parts: list[tuple[LogStream, bytes]]) -> None:
    out, err = files
    for which, chunk in parts:
        (out if which is LogStream.STDOUT else err).write(chunk)


def _finish(
    api: Any,
    container_id: str | None,
    files: tuple[IO[bytes], IO[bytes]] | None,
    results_dir: Path,
    exit_code: int,
) -> None:
    """Everything a run must do however it ended, in one pool hop."""
    if api is not None and container_id is not None:
        _remove_container(api, container_id)
    if files is not None:
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
    with contextlib.suppress(OSError):
        write_exit_code(results_dir, exit_code)


def _remove_container(api: Any, container_id: str) -> bool:
    """Remove (killing if needed); False if the daemon refused. Never raises: cleanup is
    best effort here, and close() / remove_leftovers() sweep by label for what slips through."""
    try:
        # force: kill first if still running; v: drop anonymous volumes the image declared.
        api.remove_container(container_id, force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        # 409 "removal already in progress" (close() and run() racing) is fine too.
        if exc.status_code != 409:
            log.error("docker_remove_failed", container=container_id[:12], error=_explain(exc))
            return False
    except Exception as exc:
        log.error("docker_remove_failed", container=container_id[:12], error=_explain(exc))
        return False
    return True


def _explain(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__
