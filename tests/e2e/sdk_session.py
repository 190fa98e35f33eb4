"""Drives a Shoal requester with Bacalhau's own Python SDK, unchanged (run in a subprocess:
the SDK reads BACALHAU_* at import time and keeps its key in module globals).

Prints one JSON object with what each call returned, for the test to check.
"""

from __future__ import annotations

import json
import sys
import time

from bacalhau_apiclient.models.deal import Deal
from bacalhau_apiclient.models.job_spec_docker import JobSpecDocker
from bacalhau_apiclient.models.job_spec_language import JobSpecLanguage
from bacalhau_apiclient.models.publisher_spec import PublisherSpec
from bacalhau_apiclient.models.spec import Spec
from bacalhau_apiclient.models.storage_spec import StorageSpec
from bacalhau_sdk.api import cancel, events, list, results, states, submit
from bacalhau_sdk.config import get_client_id

TERMINAL = {"Completed", "Error", "Cancelled", "CompletedPartially"}


def job_payload(delay_tag: str) -> dict:
    return dict(
        APIVersion="V1beta1",
        ClientID=get_client_id(),
        Spec=Spec(
            engine="Noop",
            verifier="Noop",
            publisher_spec=PublisherSpec(type="IPFS"),
            docker=JobSpecDocker(image="ubuntu", entrypoint=["echo", "Hello World!"]),
            language=JobSpecLanguage(job_context=None),
            wasm=None,
            resources=None,
            timeout=1800,
            outputs=[StorageSpec(storage_source="IPFS", name="outputs", path="/outputs")],
            deal=Deal(concurrency=1),
            do_not_track=False,
            annotations=[delay_tag],
        ),
    )


def main() -> None:
    report: dict = {}
    submitted = submit(job_payload("sdk-compat"))
    job_id = submitted.job.metadata.id
    report["submit_id"] = job_id
    report["submit_client_id"] = submitted.job.metadata.client_id
    deadline = time.time() + 30
    state = None
    while time.time() < deadline:
        state = states(job_id).state.state
        if state in TERMINAL:
            break
        time.sleep(0.05)
    report["state"] = state
    evs = events(job_id).events
    report["events"] = [(e.type, e.job_state.new if e.job_state else None) for e in evs]
    res = results(job_id).results
    report["results"] = [{"node": r.node_id, "cid": r.data.cid} for r in res]
    listed = list()
    report["listed"] = [j.job.metadata.id for j in listed.jobs]
    # A second job, cancelled while the slow node holds it.
    second = submit(job_payload("to-cancel")).job.metadata.id
    cancelled = cancel(second)
    report["cancelled_state"] = cancelled.state.state
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
