"""WASM jobs through a whole compute node: its module resolver fetches the entry module."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from shoal_common.events import ResultProposed
from shoal_common.spec import Engine, StorageSpec, WasmSpec
from shoal_compute.testing import MakeNode, noop_job

pytestmark = pytest.mark.integration

HELLO = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Hello, world!\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 14))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 64)))))
"""


def wasm_job(module: StorageSpec) -> Any:
    job = noop_job(engine=Engine.WASM)
    job.spec.docker = None
    job.spec.wasm = WasmSpec(EntryModule=module)
    return job


async def test_behaviour_4_hello_world_from_inline_and_cid_modules(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = await make_node("wasm-node", engines=["Wasm", "Noop"])
    assert Engine.WASM in node.service.engines()
    binary = wasmtime.wat2wasm(HELLO)
    inline = StorageSpec(
        StorageSource="Inline",
        Name="hello.wasm",
        URL="data:application/wasm;base64," + base64.b64encode(binary).decode(),
    )
    module_file = tmp_path / "hello.wasm"
    module_file.write_bytes(binary)
    cid = await node.service.cache.put_path(module_file)
    by_cid = StorageSpec(StorageSource="IPFS", CID=cid, Name="hello.wasm")
    for module in (inline, by_cid):
        event = await node.outcome(await node.run(wasm_job(module)), timeout=30)
        assert isinstance(event, ResultProposed), event
        assert event.run_output.stdout == "Hello, world!\n"
        assert event.run_output.exit_code == 0


async def test_invalid_module_is_not_bid_on(make_node: MakeNode) -> None:
    node = await make_node("wasm-node", engines=["Wasm"])
    junk = StorageSpec(
        StorageSource="Inline", URL="data:;base64," + base64.b64encode(b"nope").decode()
    )
    answer = await node.ask(wasm_job(junk))
    assert not answer.accepted
    assert "module" in answer.reason
