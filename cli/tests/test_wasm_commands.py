"""`shoal wasm run|validate` and `shoal run python`: the specs they build (--dry-run, no cluster),
the job context (.shoalignore, size cap) and local module validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from shoal_cli import main as shoal_main
from shoal_cli.wasm_commands import (
    DEFAULT_PYTHON_IMAGE,
    IgnoreRules,
    collect_context,
    register,
)
from shoal_common.cid import cid_of_path

HELLO_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hi\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 3))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""
LIB_WAT = """
(module
  (func (export "double") (param i32) (result i32) (i32.mul (local.get 0) (i32.const 2))))
"""
CID = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"


@pytest.fixture
def shoal() -> click.Group:
    """A fresh root group, as `shoal_cli.main` builds it, with these commands registered."""
    root = shoal_main.ShoalGroup(
        name="shoal", callback=shoal_main.cli.callback, params=list(shoal_main.cli.params)
    )
    register(root)
    return root


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder: what `shoal run python` sends as the job context by default."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def invoke(shoal: click.Group, *args: str, env: dict[str, str] | None = None) -> Result:
    # An unreachable requester: a dry run must never need one.
    base = {"SHOAL_API_HOST": "127.0.0.1", "SHOAL_API_PORT": "9"}
    return CliRunner().invoke(shoal, list(args), env={**base, **(env or {})})


def dry_spec(shoal: click.Group, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = invoke(shoal, *args, "--dry-run", env=env)
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["APIVersion"] == "V1beta1"
    spec: dict[str, Any] = job["Spec"]
    return spec


def test_register_adds_the_groups(shoal: click.Group) -> None:
    assert {"wasm", "run"} <= set(shoal.commands)
    wasm = shoal.commands["wasm"]
    run = shoal.commands["run"]
    assert isinstance(wasm, click.Group)
    assert isinstance(run, click.Group)
    assert set(wasm.commands) == {"run", "validate"}
    assert set(run.commands) == {"python"}


def test_python_image_matches_the_compute_default() -> None:
    from shoal_compute.executors.python_wasm import DEFAULT_PYTHON_IMAGE as COMPUTE_DEFAULT

    assert DEFAULT_PYTHON_IMAGE == COMPUTE_DEFAULT


# --- shoal wasm run -------------------------------------------------------------------------------


def test_wasm_run_local_module_with_imports_env_and_volumes(
    shoal: click.Group, workdir: Path
) -> None:
    (workdir / "hello.wat").write_text(HELLO_WAT)
    (workdir / "lib.wat").write_text(LIB_WAT)
    spec = dry_spec(
        shoal,
        "wasm",
        "run",
        "-e",
        "B=2",
        "--env",
        "A=1=one",
        "--import-module",
        "lib.wat",
        "--import-module",
        f"util={CID}",
        "-i",
        f"ipfs://{CID}:/data",
        "-o",
        "results:/results",
        "hello.wat",
        "first",
        "--flag",
    )
    assert spec["Engine"] == "Wasm"
    assert spec["Wasm"] == {
        "EntryModule": {
            "StorageSource": "IPFS",
            "CID": cid_of_path(workdir / "hello.wat"),
            "Name": "hello.wat",
        },
        "EntryPoint": "_start",
        "Parameters": ["first", "--flag"],
        "EnvironmentVariables": {"B": "2", "A": "1=one"},
        "ImportModules": [
            {"StorageSource": "IPFS", "CID": cid_of_path(workdir / "lib.wat"), "Name": "lib"},
            {"StorageSource": "IPFS", "CID": CID, "Name": "util"},
        ],
    }
    assert spec["inputs"] == [{"StorageSource": "IPFS", "CID": CID, "path": "/data"}]
    assert spec["outputs"] == [{"StorageSource": "IPFS", "Name": "results", "path": "/results"}]


def test_wasm_run_by_cid_with_entry_point(shoal: click.Group, workdir: Path) -> None:
    spec = dry_spec(shoal, "wasm", "run", "--entry-point", "main", f"ipfs://{CID}")
    assert spec["Wasm"] == {
        "EntryModule": {"StorageSource": "IPFS", "CID": CID},
        "EntryPoint": "main",
    }
    assert spec["outputs"] == [{"StorageSource": "IPFS", "Name": "outputs", "path": "/outputs"}]


def test_wasm_run_refuses_bad_modules_before_submitting(shoal: click.Group, workdir: Path) -> None:
    (workdir / "hello.wat").write_text(HELLO_WAT)
    (workdir / "junk.wasm").write_bytes(b"\0asm\x01\0\0\0garbage")
    cases = {
        ("junk.wasm",): "not a valid WebAssembly module",
        ("--entry-point", "main", "hello.wat"): "does not export the entry point 'main'",
        ("missing.wasm",): "neither a file nor a CID",
        ("--import-module", CID, "hello.wat"): f"NAME={CID}",
        ("-e", "NOVALUE", "hello.wat"): "KEY=VALUE",
    }
    for args, message in cases.items():
        result = invoke(shoal, "wasm", "run", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output


# --- shoal wasm validate --------------------------------------------------------------------------


def test_wasm_validate(shoal: click.Group, workdir: Path) -> None:
    (workdir / "hello.wat").write_text(HELLO_WAT)
    good = invoke(shoal, "wasm", "validate", "hello.wat")
    assert good.exit_code == 0, good.output
    assert "valid WebAssembly module" in good.stdout

    wrong_entry = invoke(shoal, "wasm", "validate", "hello.wat", "--entry-point", "main")
    assert wrong_entry.exit_code == 1
    assert "cannot run as a job" in wrong_entry.stderr
    assert "- hello.wat does not export the entry point 'main'" in wrong_entry.stderr
    assert "_start" in wrong_entry.stderr  # what it does export

    (workdir / "text.wasm").write_text("not a module at all (")
    junk = invoke(shoal, "wasm", "validate", "text.wasm")
    assert junk.exit_code == 1
    assert "neither a WebAssembly binary" in junk.stderr

    missing = invoke(shoal, "wasm", "validate", "nothere.wasm")
    assert missing.exit_code == 2  # click: the path does not exist


# --- shoal run python -----------------------------------------------------------------------------


def expected_context(files: dict[str, str], tmp: Path) -> str:
    """The CID of a folder holding exactly ``files``."""
    folder = tmp / "expected"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return cid_of_path(folder)


def test_run_python_deterministic_command(
    shoal: click.Group, workdir: Path, tmp_path: Path
) -> None:
    (workdir / "data.csv").write_text("a,b\n1,2\n")
    spec = dry_spec(shoal, "run", "python", "--deterministic", "-c", "print(1+1)")
    assert spec["Engine"] == "Language"
    assert spec["Language"] == {
        "Language": "python",
        "LanguageVersion": "3",
        "DeterministicExecution": True,
        "JobContext": {
            "StorageSource": "IPFS",
            "CID": expected_context({"data.csv": "a,b\n1,2\n"}, tmp_path),
            "path": "/job",
        },
        "Command": "print(1+1)",
    }
    assert "Docker" not in spec
    assert spec["Network"] == {"Type": "None"}


def test_run_python_program_in_docker_with_volumes(
    shoal: click.Group, workdir: Path, tmp_path: Path
) -> None:
    (workdir / "main.py").write_text("print(open('/inputs/x').read())\n")
    (workdir / "requirements.txt").write_text("requests\n")
    spec = dry_spec(
        shoal,
        "run",
        "python",
        "-r",
        "requirements.txt",
        "-i",
        f"{CID}:/inputs",
        "-o",
        "out:/out",
        "--network",
        "Full",
        "main.py",
    )
    language = spec["Language"]
    assert language["DeterministicExecution"] is False
    assert language["ProgramPath"] == "main.py"
    assert language["RequirementsPath"] == "requirements.txt"
    assert "Command" not in language
    assert language["JobContext"]["CID"] == expected_context(
        {"main.py": "print(open('/inputs/x').read())\n", "requirements.txt": "requests\n"},
        tmp_path,
    )
    assert spec["Docker"] == {"Image": DEFAULT_PYTHON_IMAGE}
    assert spec["inputs"] == [{"StorageSource": "IPFS", "CID": CID, "path": "/inputs"}]
    assert spec["outputs"] == [{"StorageSource": "IPFS", "Name": "out", "path": "/out"}]


def test_run_python_program_in_a_subfolder_of_another_context(
    shoal: click.Group, workdir: Path
) -> None:
    (workdir / "project" / "src").mkdir(parents=True)
    (workdir / "project" / "src" / "main.py").write_text("print(1)\n")
    spec = dry_spec(
        shoal, "run", "python", "--context-path", "project", "--image", "py:3.12", "src/main.py"
    )
    assert spec["Language"]["ProgramPath"] == "src/main.py"
    assert spec["Docker"] == {"Image": "py:3.12"}
    outside = invoke(shoal, "run", "python", "--context-path", "project", "--dry-run", "x.py")
    assert outside.exit_code == 2
    (workdir / "x.py").write_text("")
    outside = invoke(shoal, "run", "python", "--context-path", "project", "--dry-run", "x.py")
    assert outside.exit_code == 2
    assert "not inside the job context" in outside.stderr


def test_run_python_without_context(shoal: click.Group, workdir: Path) -> None:
    spec = dry_spec(shoal, "run", "python", "--deterministic", "--context-path", "", "-c", "1")
    assert "JobContext" not in spec["Language"]
    needs = invoke(shoal, "run", "python", "--context-path", "", "--dry-run", "main.py")
    assert needs.exit_code == 2
    assert "needs a job context" in needs.stderr


def test_run_python_refusals(shoal: click.Group, workdir: Path) -> None:
    (workdir / "main.py").write_text("print(1)\n")
    (workdir / "requirements.txt").write_text("numpy>=2\nrequests==2.32  # not built in\n")
    cases = {
        (): "main.py) or -c CODE",
        ("-c", "1", "main.py"): "main.py) or -c CODE",
        ("--deterministic", "--network", "Full", "-c", "1"): "no network",
        ("--deterministic", "--gpu", "1", "-c", "1"): "cannot use GPUs",
        ("--deterministic", "--memory", "20Mb", "-c", "1"): "at least 40MiB",
        ("--deterministic", "-r", "requirements.txt", "main.py"): "requests is not built into",
        ("nope.py",): "does not exist",
        ("--context-size-limit", "lots", "main.py"): "--context-size-limit",
    }
    for args, message in cases.items():
        result = invoke(shoal, "run", "python", "--dry-run", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output


def test_deterministic_requirements_that_are_built_in(shoal: click.Group, workdir: Path) -> None:
    (workdir / "main.py").write_text("import numpy\n")
    (workdir / "requirements.txt").write_text("numpy>=2\npandas\n")
    spec = dry_spec(shoal, "run", "python", "--deterministic", "-r", "requirements.txt", "main.py")
    assert spec["Language"]["RequirementsPath"] == "requirements.txt"
    assert spec["Language"]["DeterministicExecution"] is True


def test_shoalignore_decides_what_is_sent(
    shoal: click.Group, workdir: Path, tmp_path: Path
) -> None:
    files = {
        "main.py": "print(1)\n",
        "lib/util.py": "X = 1\n",
        "lib/keep.log": "kept by negation\n",
        "data/big.bin": "x" * 100,
        "data/small.txt": "s\n",
        "notes.log": "ignored\n",
        "build/out.txt": "ignored folder\n",
        "src/build": "a file named build: the rule is for folders only\n",
        "__pycache__/main.cpython-311.pyc": "default exclusion\n",
        ".git/HEAD": "default exclusion\n",
        "deep/a/b/c.tmp": "ignored at any depth via **\n",
        ".shoalignore": (
            "# comments and blank lines are skipped\n\n"
            "*.log\n"
            "!lib/keep.log\n"
            "build/\n"
            "/data/*.bin\n"
            "**/*.tmp\n"
        ),
    }
    for name, text in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)
    sent = collect_context(workdir, 10 * 1024 * 1024)
    assert sent.files == [
        ".shoalignore",
        "data/small.txt",
        "lib/keep.log",
        "lib/util.py",
        "main.py",
        "src/build",
    ]
    spec = dry_spec(shoal, "run", "python", "main.py")
    kept = {name: files[name] for name in sent.files}
    # folders emptied by the rules are still sent (as `ipfs add -r` would)
    expected_dir = tmp_path / "expected"
    expected_dir.mkdir()
    (expected_dir / "deep" / "a" / "b").mkdir(parents=True)
    for name, text in kept.items():
        (expected_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (expected_dir / name).write_text(text)
    assert spec["Language"]["JobContext"]["CID"] == cid_of_path(expected_dir)

    (workdir / ".shoalignore").write_text("main.py\n")
    excluded = invoke(shoal, "run", "python", "--dry-run", "main.py")
    assert excluded.exit_code == 2
    assert "main.py is excluded by" in excluded.stderr


def test_ignore_rules() -> None:
    rules = IgnoreRules.parse(
        ["/top.txt", "docs/**/draft*", "a?c", "[0-9]*.csv", "cache/", "!cache/keep", "\\#x"]
    )
    assert rules.ignored("top.txt", is_dir=False)
    assert not rules.ignored("sub/top.txt", is_dir=False)  # anchored to the root
    assert rules.ignored("docs/draft1", is_dir=False)
    assert rules.ignored("docs/x/y/draft2.md", is_dir=False)
    assert not rules.ignored("other/docs/draft1", is_dir=False)
    assert rules.ignored("x/abc", is_dir=False)
    assert not rules.ignored("x/abbc", is_dir=False)
    assert rules.ignored("2024.csv", is_dir=False)
    assert not rules.ignored("data.csv", is_dir=False)
    assert rules.ignored("cache", is_dir=True)
    assert not rules.ignored("cache", is_dir=False)
    assert rules.ignored("#x", is_dir=False)


def test_context_size_cap(shoal: click.Group, workdir: Path) -> None:
    (workdir / "main.py").write_text("print(1)\n")
    (workdir / "dataset.bin").write_bytes(b"\0" * 3000)
    too_big = invoke(shoal, "run", "python", "--context-size-limit", "2KiB", "--dry-run", "main.py")
    assert too_big.exit_code == 2
    message = " ".join(too_big.stderr.split())
    assert "over the 2.0 KiB limit" in message
    assert "dataset.bin (2.9 KiB)" in message
    assert ".shoalignore" in message

    by_env = invoke(
        shoal, "run", "python", "--dry-run", "main.py", env={"SHOAL_CONTEXT_SIZE_LIMIT": "2KiB"}
    )
    assert by_env.exit_code == 2
    assert "limit" in by_env.stderr

    (workdir / ".shoalignore").write_text("*.bin\n")
    spec = dry_spec(shoal, "run", "python", "--context-size-limit", "2KiB", "main.py")
    assert spec["Language"]["ProgramPath"] == "main.py"


def test_upload_to_an_unreachable_requester_is_a_clear_error(
    shoal: click.Group, workdir: Path
) -> None:
    (workdir / "hello.wat").write_text(HELLO_WAT)
    result = invoke(shoal, "wasm", "run", "hello.wat")
    assert result.exit_code == 1
    assert "cannot upload hello.wat to the requester at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.output
