"""The job verbs build the Spec in wire form without the pydantic models (start-up time): it
must be exactly what the models would send, keys, values and order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from shoal_cli.main import cli
from shoal_common.spec import Spec, to_wire

CID = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
WAT = '(module (func (export "_start")))'


@pytest.mark.parametrize(
    "args",
    [
        ["run", "python", "--deterministic", "-c", "print(1+1)"],
        [
            "run",
            "python",
            "main.py",
            "-i",
            f"ipfs://{CID}:/data",
            "-o",
            "out:/out",
            "--cpu",
            "500m",
            "--memory",
            "1Gb",
            "--timeout",
            "30",
            "-l",
            "a",
            "--network",
            "HTTP",
            "--domain",
            "x.org",
        ],
        [
            "run",
            "python",
            "-c",
            "x",
            "--context-path",
            "",
            "--concurrency",
            "3",
            "--confidence",
            "2",
            "--min-bids",
            "2",
            "--verifier",
            "deterministic",
            "--publisher",
            "ipfs",
            "-s",
            "env=prod,zone in (a,b)",
        ],
        [
            "run",
            "python",
            "-c",
            "x",
            "-i",
            "https://example.com/a.csv",
            "-i",
            "inline:hi",
            "-i",
            "file:///tmp:/mnt",
            "-i",
            CID,
            "--disk",
            "1Gb",
            "--gpu",
            "0",
        ],
        ["docker", "run", "busybox", "echo", "hi"],
        ["docker", "run", "-e", "A=1", "-w", "/w", "--entrypoint", "sh", "busybox", "-c", "x"],
        ["wasm", "run", "m.wat", "a", "b", "-e", "K=V", "--import-module", f"lib={CID}"],
    ],
)
def test_the_wire_spec_is_what_the_model_sends(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "main.py").write_text("print(1)\n")
    (tmp_path / "m.wat").write_text(WAT)
    env = {"SHOAL_API_HOST": "127.0.0.1", "SHOAL_API_PORT": "9", "SHOAL_DIR": str(tmp_path)}
    result = CliRunner().invoke(cli, [*args, "--dry-run", "--output", "json"], env=env)
    assert result.exit_code == 0, result.output
    wire = json.loads(result.stdout)["Spec"]
    through_model = to_wire(Spec.model_validate(wire))
    assert json.dumps(wire) == json.dumps(through_model)  # same keys in the same order
