"""Relational-suite fixtures: the same tests on SQLite and on a real PostgreSQL server.

`database_url` is parametrised ["sqlite", "postgresql"]. The PostgreSQL case creates a fresh, uniquely named
database in the shared server (ZHILIAN_TEST_PG_ADMIN, default host=127.0.0.1 port=5432 user=postgres) and drops it
afterwards. A machine without a running server (a fresh one: scripts/setup.sh installs the Debian package but
starts nothing) gets one private cluster for the whole session instead (`PrivatePostgres`). Only when neither is
possible do the PostgreSQL cases fail under CI=true and skip (saying why) elsewhere.

`PrivatePostgres` runs a throw-away cluster of its own (initdb + pg_ctl on a free loopback port) for tests that
must stop and restart the server.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.prerequisites import missing
from zhilian.broker import free_port

PG_ADMIN = os.environ.get("ZHILIAN_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
CONNECT_TIMEOUT_S = 5


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)


@functools.cache
def shared_server_problem() -> str | None:
    try:
        with _admin() as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL ({PG_ADMIN}) is not reachable: {exc}".strip()
    return None


def _url_for(conninfo: str, dbname: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    user = params.get("user", "postgres")
    return f"postgresql+psycopg://{user}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{dbname}"


def drop_database(conninfo: str, name: str) -> None:
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def fresh_database(conninfo: str = PG_ADMIN) -> Iterator[str]:
    """CREATE DATABASE zl_test_<random>; yields its SQLAlchemy URL; terminates its sessions and drops it."""
    name = f"zl_test_{secrets.token_hex(6)}"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _url_for(conninfo, name)
    finally:
        drop_database(conninfo, name)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    """Admin conninfo of a PostgreSQL server for this session: the shared one if it answers, else a private one."""
    problem = shared_server_problem()
    if problem is None:
        yield PG_ADMIN
        return
    try:
        cluster = PrivatePostgres().start()
    except (FileNotFoundError, RuntimeError) as exc:
        missing("PostgreSQL", f"{problem}; and no private cluster either: {exc}")
    try:
        yield cluster.admin_conninfo
    finally:
        cluster.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A registry database URL: a SQLite file in tmp_path, or a fresh database in a real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    admin = request.getfixturevalue("postgres_admin")
    with fresh_database(admin) as url:
        yield url


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


class PrivatePostgres:
    """A PostgreSQL cluster of its own in a temporary directory, on a free loopback port; stop/start at will.

    initdb refuses to run as root, so as root the cluster belongs to (and runs as) the `postgres` system user.
    """

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            raise FileNotFoundError("initdb not found (Debian package postgresql)")
        self.bindir = bindir
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise FileNotFoundError("running as root and there is no postgres user to run initdb as") from None
            self.user = "postgres"
        self.root = Path(tempfile.mkdtemp(prefix="zl-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", timeout=120
        )

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [str(self.bindir / tool), *args],
            user=self.user,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n{self.server_log()}")

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def admin_conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def start(self) -> PrivatePostgres:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='{self.root}' "
            "-c fsync=off -c full_page_writes=off -c max_connections=40 -c shared_buffers=16MB"
        )
        # -l: the server must not inherit our pipes, or capturing pg_ctl's output would wait for the server's end.
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options)
        return self

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash (recovery on the next start); `fast` a clean shutdown."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    try:
        cluster = PrivatePostgres()
    except (FileNotFoundError, RuntimeError) as exc:
        missing("PostgreSQL", f"cannot create a private PostgreSQL cluster: {exc}")
    try:
        yield cluster.start()
    finally:
        cluster.close()
