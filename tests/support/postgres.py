"""A real PostgreSQL for tests: Debian's ``postgresql`` binaries, a cluster of our own.

``PostgresCluster().start()`` runs ``initdb`` into a fresh temporary directory and
starts ``postgres`` on a free loopback port (TCP on 127.0.0.1 only, its socket in that
directory, trust authentication: nothing leaves the box). PostgreSQL refuses to run as
root, so when the tests run as root the cluster belongs to the ``postgres`` user that
Debian's package creates (and its directory is made outside pytest's root-only
``tmp_path``). :meth:`PostgresCluster.create_database` gives every test gateway a
database of its own, so parallel tests and leftovers never meet.

The ``postgres_cluster`` fixture in ``conftest.py`` starts one per test process;
:func:`shared_cluster` is the same cluster for code that is not a fixture.
``scripts/test`` installs the package when it is missing.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .waiting import free_port, wait_until

__all__ = [
    "PG_BIN",
    "PostgresCluster",
    "close_shared_cluster",
    "postgres_available",
    "shared_cluster",
]


def _bin_dir() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/N/bin`` (Debian's layout), or PATH's."""

    def version(initdb: str) -> int:
        name = Path(initdb).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


PG_BIN = _bin_dir()


def postgres_available() -> bool:
    """Whether PostgreSQL's server binaries are installed."""
    return PG_BIN is not None and (PG_BIN / "postgres").exists()


class PostgresCluster:
    """``initdb`` + ``postgres -D DIR -p PORT -c listen_addresses=127.0.0.1``."""

    _names = itertools.count(1)

    def __init__(self, port: int | None = None) -> None:
        if PG_BIN is None:
            raise RuntimeError("PostgreSQL is not installed: run scripts/test (it installs it)")
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="datorus-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen | None = None
        # PostgreSQL will not run as root: the tests' root runs it as Debian's postgres user
        root = os.geteuid() == 0
        self.owner: pwd.struct_passwd | None = pwd.getpwnam("postgres") if root else None
        if self.owner is not None:
            os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)
        self._initdb()

    # -- running commands as the cluster's owner ----------------------------------------

    def _as_owner(self) -> dict[str, Any]:
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def _run(self, *cmd: str, timeout: float = 60.0) -> str:
        assert PG_BIN is not None
        out = subprocess.run(
            [str(PG_BIN / cmd[0]), *cmd[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.dir,
            check=False,
            **self._as_owner(),
        )
        if out.returncode != 0:
            raise AssertionError(f"{cmd[0]} failed ({out.returncode}): {out.stderr or out.stdout}")
        return out.stdout

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    # -- the server --------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PostgresCluster:
        """Start the server and wait until it accepts connections."""
        assert PG_BIN is not None
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-c",
                "listen_addresses=127.0.0.1",
                # a test cluster: nothing here must survive the machine crashing
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ],
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            **self._as_owner(),
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"postgres exited: {self.log.read_text()[-2000:]}")
            assert PG_BIN is not None
            probe = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
                timeout=10,
            )
            return probe.returncode == 0

        wait_until(up, timeout, 0.05, "postgres accepting connections")
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the server (a fast shutdown; ``kill=True``: SIGKILL, as a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGINT is PostgreSQL's "fast" shutdown (clients are disconnected; SIGTERM's
            # "smart" one would wait for them)
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.logf.close()

    def restart(self, kill: bool = False) -> None:
        """Stop and start again on the same port and data (what a database restart is)."""
        self.stop(kill=kill)
        self.start()

    def destroy(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DATABASE`` (trust: no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run *sql* with ``psql`` (unaligned, tuples only); what it printed."""
        return self._run(
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        )

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty database with a name no other test uses; its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)


_shared: PostgresCluster | None = None


def shared_cluster() -> PostgresCluster:
    """This test process's cluster, started on first use and stopped when it exits."""
    global _shared
    if _shared is None:
        _shared = PostgresCluster().start()
        atexit.register(_shared.destroy)
    return _shared


def close_shared_cluster() -> None:
    """Stop and delete this process's cluster if it was started (conftest calls it when the
    session ends: an xdist worker can leave without running ``atexit``)."""
    global _shared
    if _shared is not None:
        _shared.destroy()
        _shared = None
