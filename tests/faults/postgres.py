"""A private Postgres for fault tests (never the machine's shared one on 5432): Debian's
binaries, a throwaway data directory, a free port. It can be crashed (``pg_ctl stop -m
immediate``: no checkpoint, recovery on the next start) and started again."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shoal_common.natsserver import free_port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@dataclass
class PrivatePostgres:
    port: int = field(default_factory=free_port)
    data: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="shoal-pg-")))

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        bin_dir = _bin_dir()
        assert bin_dir is not None
        command = [str(bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:  # postgres refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> PrivatePostgres:
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data / "db"), "-U", "postgres", "-A", "trust")
        return self.start()

    def start(self) -> PrivatePostgres:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.data / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data / "db"), "-o", options, "-l", log, "-w", "start")
        return self

    def crash(self) -> None:
        """Stop at once, as a crash would: every connection dropped, no checkpoint."""
        self._run("pg_ctl", "-D", str(self.data / "db"), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.crash()
        shutil.rmtree(self.data, ignore_errors=True)


def private_postgres() -> PrivatePostgres:
    if _bin_dir() is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip(
            "needs Debian's postgresql binaries (/usr/lib/postgresql/*/bin) and runuser; "
            "make postgres installs them"
        )
    return PrivatePostgres().init()
