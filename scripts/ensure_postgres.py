"""Print the URL of a reachable Postgres for the tests, starting one if there is none.

Order: $SHOAL_TEST_DATABASE_URL; a server on 127.0.0.1:5432 (this machine's); Debian's
postgresql package (installed and started when running as root); the pgserver wheel's embedded
server (as a normal user, kept in .state/pg).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

LOCAL = "postgresql://postgres@127.0.0.1:5432/test"


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_debian_postgres() -> bool:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    if not Path("/etc/postgresql").exists():
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env, stdout=sys.stderr
        )
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    hba = Path(f"/etc/postgresql/{version}/main/pg_hba.conf")
    if "shoal-trust" not in hba.read_text():
        hba.write_text(
            "# shoal-trust\nhost all all 127.0.0.1/32 trust\nlocal all all trust\n"
            + hba.read_text()
        )
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
        check=False,
        stdout=sys.stderr,
        stderr=sys.stderr,
    )
    for _ in range(100):
        if listening("127.0.0.1", 5432):
            subprocess.run(
                ["su", "postgres", "-c", "createdb test"], check=False, stderr=subprocess.DEVNULL
            )
            return True
        time.sleep(0.1)
    return False


def main() -> None:
    if url := os.environ.get("SHOAL_TEST_DATABASE_URL"):
        print(url)
        return
    if listening("127.0.0.1", 5432) or start_debian_postgres():
        print(LOCAL)
        return
    import pgserver

    server = pgserver.get_server(Path(".state/pg").resolve(), cleanup_mode=None)
    print(server.get_uri())


if __name__ == "__main__":
    main()
