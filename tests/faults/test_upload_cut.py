"""F7: a result download from the compute node to the publisher cut off halfway (a proxy in
front of the node's content endpoint resets the connection after 40 KiB of a ~100 KiB result)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from shoal_common.natsserver import free_port
from shoal_common.spec import PublisherType, Spec
from tests.faults.cluster import FaultCluster, noop_spec
from tests.faults.tcpproxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.xdist_group("processes")]

RESULT_BYTES = 100_000
CUT_AFTER = 40 * 1024


def big_echo(letter: str) -> Spec:
    spec = noop_spec(PublisherType.LOCAL)
    assert spec.docker is not None
    spec.docker.entrypoint = ["echo", letter * RESULT_BYTES]
    return spec


def test_result_download_cut_halfway_is_retried_and_never_half_stored(tmp_path: Path) -> None:
    node_port = free_port()
    proxy = TcpProxy(node_port).start()
    cluster = FaultCluster(
        tmp_path / "cluster",
        compute_nodes=1,
        args_of={"compute-0": ["--port", str(node_port)]},
        env_of={"compute-0": {"SHOAL_COMPUTE_PUBLIC_URL": f"http://{proxy.url_host_port}"}},
    )
    cluster.proxies["content"] = proxy  # stopped with the cluster
    cluster.start()
    try:
        client = cluster.client(tmp_path / "key")

        # Two downloads cut halfway, the third whole: the publisher's retries get it.
        proxy.truncate_responses(CUT_AFTER, times=2)
        done = client.wait(client.submit(big_echo("a")).metadata.id, timeout=40)
        assert done.state.value == "Completed", done
        assert proxy.truncated == 2
        [published] = [e.published_results for e in done.executions if e.published_results]
        assert published.cid is not None
        got = client.download(published.cid, tmp_path / "a")
        assert (got / "stdout").read_text() == "a" * RESULT_BYTES + "\n"

        # Every attempt cut: publishing fails, saying so, and nothing is kept under the CID.
        proxy.truncate_responses(CUT_AFTER, times=1000)
        failed = client.wait(client.submit(big_echo("b")).metadata.id, timeout=40)
        assert failed.state.value == "Error", failed
        [execution] = failed.executions
        assert "publishing failed" in execution.status, execution.status
        assert "gave up after 3 attempts" in execution.status, execution.status
        assert proxy.truncated == 2 + 3
        pubs = httpx.get(f"{cluster.publisher_url}/publisher/jobs/{failed.job_id}").json()
        cid = pubs[0]["result_cid"]
        assert pubs[0]["status"] == "failed"
        assert httpx.get(f"{cluster.publisher_url}/content/{cid}").status_code == 404
        assert httpx.get(f"{cluster.api_url}/api/v1/content/{cid}").status_code == 404
    finally:
        cluster.stop()
