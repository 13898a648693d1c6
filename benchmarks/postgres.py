"""A throwaway PostgreSQL server in a temporary folder (the machine's initdb and pg_ctl), for
the catalog benchmark and the tests; it listens on a unix socket in that folder only."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import URL


def server_bindir() -> Path | None:
    """The folder of the server's initdb and pg_ctl, or None where there is none."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if found.returncode == 0:
            candidates.append(Path(found.stdout.strip()))
    # Debian installs the server beside PATH, one folder per major version; newest first.
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def unavailable_reason() -> str | None:
    """Why no throwaway server can run here, or None when one can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install 'ghostmatch[postgresql]'"
    if server_bindir() is None:
        return "no PostgreSQL server here (initdb, pg_ctl); .ci/run installs one with apt"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres user to run the server as"
    return None


@dataclass
class TemporaryServer:
    """A running throwaway server: a superuser ``postgres`` without a password."""

    socket_dir: Path
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str) -> URL:
        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            database=database,
            query={"host": str(self.socket_dir)},
        )

    def new_database(self, prefix: str = "catalog") -> URL:
        """A new, empty database: CREATE DATABASE copies a template in well under a second."""
        import psycopg

        name = f"{prefix}_{next(self._numbers)}"
        with psycopg.connect(
            host=str(self.socket_dir), user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextmanager
def temporary_server(
    prefix: str = "ghostmatch-pg-", durable: bool = False
) -> Iterator[TemporaryServer]:
    """Start a server in a new temporary folder; stop it and delete the folder on exit,
    whatever happened. The server refuses to run as root, so there it runs as the
    ``postgres`` user. ``durable`` keeps a real server's fsync at every commit (for timing
    it); without, nothing is flushed. Check :func:`unavailable_reason` first."""
    bindir = server_bindir()
    if bindir is None:
        raise RuntimeError(unavailable_reason())
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        folder.chmod(0o755)
        if os.geteuid() == 0:
            import pwd

            owner = pwd.getpwnam("postgres")
            os.chown(folder, owner.pw_uid, owner.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        data, log = folder / "data", folder / "server.log"

        def run(*args: str) -> None:
            done = subprocess.run([*as_user, *args], capture_output=True, text=True, cwd=folder)
            if done.returncode != 0:
                server_log = log.read_text() if log.exists() else ""
                raise RuntimeError(f"{args[0]} failed: {done.stderr}{done.stdout}{server_log}")

        initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        run(*initdb, "--no-sync", "--encoding=UTF8", "--locale=C")
        # No TCP listener: the socket is in the folder, so several servers on one machine
        # never clash over a port.
        options = f"-k {folder} -c listen_addresses=''"
        if not durable:
            options += " -F -c full_page_writes=off"
        pg_ctl = str(bindir / "pg_ctl")
        run(pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
        try:
            yield TemporaryServer(folder)
        finally:
            subprocess.run(
                [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                cwd=folder,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
