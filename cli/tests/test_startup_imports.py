"""The CLI's start-up stays light: ``shoal --help`` (and a group's) imports neither the HTTP
client nor pydantic, rich, yaml or the services, and the job verbs never import pydantic.

Each check runs in a fresh interpreter: what counts is what one ``shoal`` process imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from shoal_cli import main as shoal_main

# Each costs tens of milliseconds to import (pydantic with the spec models: over 100).
HEAVY = (
    "httpx",
    "httpcore",
    "pydantic",
    "pydantic_core",
    "rich",
    "yaml",
    "cryptography",
    "structlog",
    "prometheus_client",
    "shoal_common.spec",
    "shoal_common.protocol",
)

_IMPORTED = """
import json, sys
from shoal_cli.main import cli
try:
    cli.main(args=json.loads(sys.argv[1]), prog_name="shoal")
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def imported_by(*args: str, cwd: str | None = None) -> set[str]:
    """Every module a fresh ``shoal <args>`` process has imported when it ends."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED, json.dumps(list(args))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"SHOAL_API_HOST": "127.0.0.1", "SHOAL_API_PORT": "9", "PATH": ""},
    )
    modules: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return set(modules)


def test_importing_the_entry_point_imports_nothing_heavy() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, shoal_cli.main; print(json.dumps(list(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert set(HEAVY).isdisjoint(json.loads(done.stdout))


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["docker", "--help"],
        ["docker", "run", "--help"],
        ["run", "--help"],
        ["run", "python", "--help"],
        ["wasm", "--help"],
        ["wasm", "run", "--help"],
        ["node", "--help"],
        ["get", "--help"],
    ],
)
def test_help_imports_nothing_heavy(args: list[str]) -> None:
    assert set(HEAVY).isdisjoint(imported_by(*args))


def test_a_job_verb_builds_its_spec_without_pydantic(tmp_path: Path) -> None:
    modules = imported_by(
        "run", "python", "--deterministic", "-c", "print(1+1)", "--dry-run", cwd=str(tmp_path)
    )
    assert "shoal_cli.wasm_commands" in modules  # it did run
    assert {"pydantic", "yaml", "shoal_common.spec", "shoal_common.protocol"}.isdisjoint(modules)


def test_lazy_commands_are_listed_as_they_would_be_once_loaded() -> None:
    """`shoal --help` shows serve/devstack/canary from their help text in _LAZY_COMMANDS,
    without importing them: that text must be their own."""
    fresh = shoal_main.ShoalGroup(name="shoal", commands=dict(shoal_main.cli.commands))
    fresh.commands = {n: c for n, c in fresh.commands.items() if n not in shoal_main._LAZY_COMMANDS}
    lazy_help = CliRunner().invoke(fresh, ["--help"], terminal_width=80).output
    for name in shoal_main._LAZY_COMMANDS:
        loaded = fresh.get_command(click.Context(fresh), name)
        assert loaded is not None
        assert name in fresh.commands
        for limit in (30, 45, 60, 200):
            stand_in = click.Command(name, help=shoal_main._LAZY_COMMANDS[name][2])
            assert stand_in.get_short_help_str(limit) == loaded.get_short_help_str(limit)
    assert CliRunner().invoke(fresh, ["--help"], terminal_width=80).output == lazy_help


def test_the_client_imports_no_pydantic() -> None:
    """The job verbs' client (and `shoal get`'s download path) work on wire dicts."""
    code = (
        "import json, sys, shoal_client.client, shoal_client.download;"
        "print(json.dumps(list(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    modules = set(json.loads(done.stdout))
    # (rich may be there: httpx imports its own CLI with it, which only `shoal` itself skips.)
    assert {"pydantic", "yaml", "shoal_common.spec"}.isdisjoint(modules)


def test_the_program_skips_what_httpx_would_import_for_nothing(tmp_path: Path) -> None:
    """`shoal list` against no requester: a clear error, and neither trio (httpcore's
    optional async backend) nor httpx's own CLI (pygments) was imported."""
    code = (
        "import atexit, json, sys\n"
        # Loaded modules only: what main() skips is a None entry.
        "loaded = lambda: sorted(k for k, v in sys.modules.items() if v is not None)\n"
        "atexit.register(lambda: print(json.dumps(loaded()), file=sys.stderr))\n"
        "sys.argv = ['shoal', 'list']\n"
        "from shoal_cli.main import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SHOAL_API_HOST": "127.0.0.1", "SHOAL_API_PORT": "9", "SHOAL_DIR": str(tmp_path)},
    )
    assert done.returncode == 1
    assert "cannot reach the requester" in done.stderr
    assert "Traceback" not in done.stderr
    modules = set(json.loads(done.stderr.strip().splitlines()[-1]))
    assert "httpx" in modules
    assert {"trio", "pygments", "pydantic"}.isdisjoint(modules)
