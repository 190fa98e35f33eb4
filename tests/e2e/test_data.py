"""Job inputs on a devstack with real Docker: CIDs, URLs, inline data, local directories and
data locality (behaviours 30 and 32; issue 3's "every bad input gets a clear error").

URL inputs come from a loopback HTTP server run by the tests, so nothing leaves the machine.
"""

from __future__ import annotations

import base64
import io
import tarfile
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from shoal_cli.devstack import DevstackConfig
from shoal_client.client import ShoalClient, ShoalClientError
from shoal_common.natsserver import free_port
from shoal_common.selectors import parse_selector
from shoal_common.spec import (
    Deal,
    DockerSpec,
    Engine,
    Job,
    JobState,
    Spec,
    StorageSourceType,
    StorageSpec,
)
from tests.conftest import StackFactory
from tests.support import DevstackThread, count, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.docker]

IMAGE = "shoal-test/busybox:latest"
DEADLINE = 60.0


def require_docker() -> None:
    """Fail (never skip) without an engine and the test image: CI provides both."""
    try:
        engine = docker.from_env()
        try:
            engine.ping()
            engine.images.get(IMAGE)
        finally:
            engine.close()
    except (docker.errors.DockerException, OSError) as exc:
        pytest.fail(
            f"Docker Engine or test image missing ({exc}): run scripts/docker-setup.sh",
            pytrace=False,
        )


def busybox(
    script: str,
    *,
    inputs: list[StorageSpec] | None = None,
    outputs: dict[str, str] | None = None,
    concurrency: int = 1,
    selector: str | None = None,
) -> Spec:
    return Spec(
        Engine=Engine.DOCKER,
        Docker=DockerSpec(Image=IMAGE, Entrypoint=["sh", "-c", script]),
        inputs=inputs,
        outputs=[
            StorageSpec(StorageSource=StorageSourceType.IPFS, Name=name, path=path)
            for name, path in (outputs or {}).items()
        ]
        or None,
        Deal=Deal(Concurrency=concurrency),
        NodeSelectors=parse_selector(selector) if selector else None,
    )


def cid_input(cid: str, path: str) -> StorageSpec:
    return StorageSpec(StorageSource=StorageSourceType.IPFS, CID=cid, path=path)


def url_input(url: str, path: str) -> StorageSpec:
    return StorageSpec(StorageSource=StorageSourceType.URL_DOWNLOAD, URL=url, path=path)


def inline_input(data: bytes, path: str) -> StorageSpec:
    url = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
    return StorageSpec(StorageSource=StorageSourceType.INLINE, URL=url, path=path)


def local_input(source: Path | str, path: str) -> StorageSpec:
    return StorageSpec(
        StorageSource=StorageSourceType.LOCAL_DIRECTORY, SourcePath=str(source), path=path
    )


def run(client: ShoalClient, spec: Spec, timeout: float = DEADLINE) -> JobState:
    return client.wait(client.submit(spec).metadata.id, timeout=timeout)


def comments(client: ShoalClient, job_id: str) -> str:
    return "\n".join(h.comment for h in client.events(job_id))


def stdout_of(state: JobState) -> str:
    [done] = [e for e in state.executions if e.state.value == "Completed"]
    assert done.run_output is not None
    return done.run_output.stdout


def completed_on(state: JobState) -> list[str]:
    return sorted(e.node_id for e in state.executions if e.state.value == "Completed")


def submit_or_refusal(client: ShoalClient, spec: Spec) -> Job | ShoalClientError:
    try:
        return client.submit(spec)
    except ShoalClientError as exc:
        return exc


def assert_refused(client: ShoalClient, spec: Spec, *words: str) -> str:
    """Refused at submit (4xx), or the job ends in Error saying ``words``; never a hang."""
    submitted = submit_or_refusal(client, spec)
    if isinstance(submitted, ShoalClientError):
        assert 400 <= submitted.status < 500, submitted
        reason = submitted.message
    else:
        state = client.wait(submitted.metadata.id, timeout=DEADLINE)
        reason = comments(client, state.job_id)
        assert state.state.value == "Error", reason
        assert count(state, "Completed") == 0
    for word in words:
        assert word.lower() in reason.lower(), reason
    return reason


# --- a loopback HTTP server for URL inputs ------------------------------------------------------


@dataclass
class Route:
    body: bytes
    fail_first: int = 0  # answer 503 this many times before serving
    barrier: threading.Barrier | None = None  # wait for this many concurrent requests


@dataclass
class Loopback:
    """What the test server serves and what it saw."""

    base_url: str = ""
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, name: str, body: bytes, **options: Any) -> str:
        path = f"/{uuid.uuid4().hex[:8]}/{name}"
        self.routes[path] = Route(body, **options)
        return self.base_url + path

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.hits[request.path] += 1
            hit = self.hits[request.path]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            route = self.routes.get(request.path)
            if route is None:
                request.send_error(404)
                return
            if hit <= route.fail_first:
                request.send_error(503, "flaky on purpose")
                return
            if route.barrier is not None:
                try:
                    route.barrier.wait()
                except threading.BrokenBarrierError:
                    # Downloads came one at a time: refuse (404 is not retried) so it shows.
                    request.send_error(404, "downloads were not parallel")
                    return
            request.send_response(200)
            request.send_header("Content-Length", str(len(route.body)))
            request.end_headers()
            request.wfile.write(route.body)
        finally:
            with self.lock:
                self.in_flight -= 1


def _handler(state: Loopback) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def loopback() -> Iterator[Loopback]:
    state = Loopback()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(10)


# --- the shared stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The only host directory nodes may mount (with a file, and a link leading out)."""
    root = tmp_path_factory.mktemp("local-data")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "greeting.txt").write_text("hello from the host\n")
    (root / "secret.txt").write_text("not for jobs\n")
    (allowed / "way-out").symlink_to(root / "secret.txt")
    return allowed


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, allowed_dir: Path) -> Iterator[DevstackThread]:
    require_docker()
    config = DevstackConfig(
        state_dir=tmp_path_factory.mktemp("data-stack"),
        compute_nodes=2,
        noop=False,
        allow_local_dirs=[str(allowed_dir)],
    )
    running = DevstackThread(config).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack: DevstackThread, tmp_path_factory: pytest.TempPathFactory) -> ShoalClient:
    return stack.client(tmp_path_factory.mktemp("key"))


# --- URL inputs (behaviour 32) ------------------------------------------------------------------


def test_several_urls_download_in_parallel(client: ShoalClient, loopback: Loopback) -> None:
    """The server holds each answer until all three requests are in: sequential downloads
    would break the barrier and be refused."""
    barrier = threading.Barrier(3, timeout=10)
    urls = [loopback.serve(f"part-{i}.txt", f"part {i}\n".encode(), barrier=barrier) for i in "abc"]
    spec = busybox(
        "cat /inputs/a /inputs/b /inputs/c",
        inputs=[url_input(url, f"/inputs/{n}") for url, n in zip(urls, "abc", strict=True)],
    )
    state = run(client, spec)
    assert state.state.value == "Completed", comments(client, state.job_id)
    assert stdout_of(state) == "part a\npart b\npart c\n"
    assert loopback.max_in_flight >= 3


def test_flaky_url_succeeds_through_retries(client: ShoalClient, loopback: Loopback) -> None:
    url = loopback.serve("flaky.txt", b"third time lucky\n", fail_first=2)
    state = run(
        client, busybox("cat /inputs/flaky.txt", inputs=[url_input(url, "/inputs/flaky.txt")])
    )
    assert state.state.value == "Completed", comments(client, state.job_id)
    assert stdout_of(state) == "third time lucky\n"
    assert count(state, "Failed") == 0, "the node retried the download itself"
    assert loopback.hits[url.removeprefix(loopback.base_url)] == 3


def test_cid_and_url_inputs_combine(
    client: ShoalClient, loopback: Loopback, tmp_path: Path
) -> None:
    folder = tmp_path / "dataset"
    (folder / "nested").mkdir(parents=True)
    (folder / "nested" / "numbers.txt").write_text("1\n2\n3\n")
    cid = client.put(folder)
    url = loopback.serve("extra.txt", b"4\n5\n")
    spec = busybox(
        "cat /data/nested/numbers.txt /extra/extra.txt | awk '{s += $1} END {print s}'",
        inputs=[cid_input(cid, "/data"), url_input(url, "/extra/extra.txt")],
    )
    state = run(client, spec)
    assert state.state.value == "Completed", comments(client, state.job_id)
    assert stdout_of(state) == "15\n"


def test_unreachable_url_is_a_clear_error(client: ShoalClient) -> None:
    closed = f"http://127.0.0.1:{free_port()}/nothing-listens-here.txt"
    assert_refused(client, busybox("true", inputs=[url_input(closed, "/inputs/x")]), "download")


def test_missing_url_is_a_clear_error(client: ShoalClient, loopback: Loopback) -> None:
    missing = loopback.base_url + "/no/such/file.txt"
    assert_refused(client, busybox("true", inputs=[url_input(missing, "/inputs/x")]), "404")


# --- CID inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["not-a-cid", "QmNotACid", "ipfs://QmT78zSuBmuS4z925WZfrqQ1"])
def test_bad_cid_is_a_clear_error(client: ShoalClient, bad: str) -> None:
    assert_refused(client, busybox("true", inputs=[cid_input(bad, "/inputs")]), "CID")


def test_cid_stored_nowhere_is_a_clear_error(client: ShoalClient, tmp_path: Path) -> None:
    """A well-formed CID no store holds: the job fails saying so (no hang, no endless retry)."""
    from shoal_common.cid import cid_of_path

    never_uploaded = tmp_path / "never-uploaded.txt"
    never_uploaded.write_text(f"{uuid.uuid4()}\n")
    cid = cid_of_path(never_uploaded)
    assert_refused(client, busybox("true", inputs=[cid_input(cid, "/inputs")]), cid)


# --- inline data --------------------------------------------------------------------------------


def test_inline_data_is_mounted(client: ShoalClient) -> None:
    spec = busybox(
        "cat /inputs/note.txt", inputs=[inline_input(b"inline bytes\n", "/inputs/note.txt")]
    )
    state = run(client, spec)
    assert state.state.value == "Completed", comments(client, state.job_id)
    assert stdout_of(state) == "inline bytes\n"


def test_oversized_inline_data_is_a_clear_error(client: ShoalClient) -> None:
    """Above the node's inline limit (1 MiB by default), though under the API's body limit."""
    too_big = b"x" * (1024**2 + 1)
    reason = assert_refused(client, busybox("true", inputs=[inline_input(too_big, "/inputs/x")]))
    assert "inline" in reason.lower(), reason
    assert "limit" in reason.lower(), reason


# --- local directories --------------------------------------------------------------------------


def test_allow_listed_local_directory_is_mounted_read_only(
    client: ShoalClient, allowed_dir: Path
) -> None:
    spec = busybox(
        "cat /host/greeting.txt; "
        "touch /host/written 2>/dev/null && echo WRITABLE || echo read-only",
        inputs=[local_input(allowed_dir, "/host")],
    )
    state = run(client, spec)
    assert state.state.value == "Completed", comments(client, state.job_id)
    assert stdout_of(state) == "hello from the host\nread-only\n"
    assert not (allowed_dir / "written").exists()


@pytest.mark.parametrize(
    "source",
    [
        "/etc",
        "{allowed}/../secret.txt",  # '..' out of the allowed folder
        "{allowed}/way-out",  # a symlink inside it that leads out
        "relative/path",
    ],
    ids=["outside", "dotdot", "symlink", "relative"],
)
def test_local_path_outside_the_allow_list_is_refused(
    client: ShoalClient, allowed_dir: Path, source: str
) -> None:
    spec = busybox(
        "cat /host/* /host", inputs=[local_input(source.format(allowed=allowed_dir), "/host")]
    )
    reason = assert_refused(client, spec)
    assert any(w in reason.lower() for w in ("outside", "absolute", "allow")), reason
    assert "not for jobs" not in reason


# --- content uploads ----------------------------------------------------------------------------


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buffer.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../escaped.txt"),
        tarfile.TarInfo("/tmp/shoal-absolute-escape.txt"),
        _symlink("link", "/etc/passwd"),
        _symlink("link", "../../../../etc/passwd"),
    ],
    ids=["dotdot", "absolute", "absolute-symlink", "relative-symlink"],
)
def test_uploaded_tar_entries_cannot_escape(
    stack: DevstackThread, tmp_path: Path, member: tarfile.TarInfo
) -> None:
    """``shoal put`` of a folder sends a tar: entries leading out of it are refused (4xx)."""
    body = _tar_with(member, b"escaped\n")
    response = httpx.post(
        f"{stack.api_url}/api/v1/content",
        params={"kind": "directory"},
        content=body,
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text
    assert "refused" in response.text, response.text
    assert not Path("/tmp/shoal-absolute-escape.txt").exists()
    publisher_dir = stack.config.state_dir / "publisher"
    assert not list(publisher_dir.parent.glob("**/escaped.txt"))


# --- data locality (behaviour 30) ---------------------------------------------------------------


def cache_result_on(client: ShoalClient, nodes: list[str], tag: str) -> str:
    """Run one deterministic job on each of ``nodes``: its results folder (the same bytes, so
    the same CID everywhere) is then in those nodes' local content. Returns that CID."""
    spec = busybox(
        f"echo {tag} > /outputs/data.txt",
        outputs={"outputs": "/outputs"},
        concurrency=len(nodes),
        selector=f"name in ({','.join(nodes)})",
    )
    state = run(client, spec)
    assert state.state.value == "Completed", comments(client, state.job_id)
    assert completed_on(state) == sorted(nodes)
    cids = {r["Data"]["CID"] for r in client.results(state.job_id)}
    assert len(cids) == 1, f"deterministic job, different results: {cids}"
    return str(cids.pop())


def test_locality_local_runs_only_where_the_data_is(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Data on 2 of 3 nodes, every node ``locality=local``, concurrency 3: exactly 2 run,
    on the nodes holding the data; the third declines to bid."""
    require_docker()
    local = {"locality": "local"}
    stack = make_devstack(noop=False, compute_nodes=3, node_settings={0: local, 1: local, 2: local})
    client = stack.client(tmp_path / "key")
    cid = cache_result_on(client, ["compute-0", "compute-1"], "local-only")

    state = run(
        client,
        busybox("cat /inputs/outputs/data.txt", inputs=[cid_input(cid, "/inputs")], concurrency=3),
    )
    assert state.state.value == "CompletedPartially", comments(client, state.job_id)
    assert completed_on(state) == ["compute-0", "compute-1"]
    for execution in state.executions:
        if execution.state.value == "Completed":
            assert execution.run_output is not None
            assert execution.run_output.stdout == "local-only\n"
    declined = [e for e in state.executions if e.node_id == "compute-2"]
    assert declined, "compute-2 was asked"
    assert all(e.state.value == "AskForBidRejected" for e in declined)
    assert "not stored on this node" in comments(client, state.job_id)


def test_node_holding_the_data_is_preferred(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 30: with the input cached on one of 3 nodes (locality ``anywhere``), jobs over
    it go to that node. By chance alone, 6 jobs all landing there has odds of 1 in 729."""
    require_docker()
    stack = make_devstack(noop=False, compute_nodes=3)
    client = stack.client(tmp_path / "key")
    cid = cache_result_on(client, ["compute-1"], "only-on-compute-1")
    # The requester learns what a node holds from its next heartbeat.
    wait_until(lambda: cid in client.node("compute-1").get("local_cids", []), what="heartbeat")
    placed = []
    for i in range(6):
        spec = busybox(f"cat /inputs/outputs/data.txt # {i}", inputs=[cid_input(cid, "/inputs")])
        state = run(client, spec)
        assert state.state.value == "Completed", comments(client, state.job_id)
        placed.extend(completed_on(state))
    assert placed == ["compute-1"] * 6


def test_node_refusing_stateless_jobs(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 30: a node with ``reject_stateless`` never runs a job without inputs, and does
    run jobs that have some."""
    require_docker()
    stack = make_devstack(
        noop=False, compute_nodes=2, node_settings={0: {"reject_stateless": True}}
    )
    client = stack.client(tmp_path / "key")

    assert_refused(client, busybox("echo pinned", selector="name=compute-0"), "inputs")
    for i in range(4):
        state = run(client, busybox(f"echo stateless {i}"))
        assert state.state.value == "Completed", comments(client, state.job_id)
        assert completed_on(state) == ["compute-1"]
    with_input = busybox(
        "cat /inputs/x",
        inputs=[inline_input(b"stateful\n", "/inputs/x")],
        selector="name=compute-0",
    )
    state = run(client, with_input)
    assert state.state.value == "Completed", comments(client, state.job_id)
    assert completed_on(state) == ["compute-0"]
    assert stdout_of(state) == "stateful\n"
