"""A real PostgreSQL for tests and benchmarks, with the tagbus migrations applied.

The pytest plugin ``tests/fixtures/postgres_cluster.py`` builds its fixtures on this.

The server is ``TAGBUS_TEST_DATABASE_URL`` when set (a role allowed to create databases and
replication slots on a server with ``wal_level=logical``). Otherwise a throwaway
cluster is started from the PostgreSQL binaries under a temporary directory on a free
port, once per session. Missing binaries fail the run with a clear message: nothing is
skipped silently.

Each test gets its own database cloned from a migrated template, so tests never see
each other's rows. Replication slots are cluster-wide, so fixtures hand out unique
slot names and drop them afterwards.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devtools.ports import free_port

ENV_URL = "TAGBUS_TEST_DATABASE_URL"
ENV_BINDIR = "TAGBUS_PG_BINDIR"
REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DB = "tagbus_test_template"

_BINDIR_CANDIDATES = (
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
)


class ClusterUnavailableError(RuntimeError):
    """No PostgreSQL server could be provided for the tests."""


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``pg_ctl``, or a clear error naming what was tried."""
    tried: list[str] = []
    explicit = os.environ.get(ENV_BINDIR)
    candidates = [explicit] if explicit else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            candidates.append(
                subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
            )
    candidates.extend(_BINDIR_CANDIDATES)
    for candidate in candidates:
        tried.append(candidate)
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise ClusterUnavailableError(
        f"PostgreSQL binaries (initdb, pg_ctl) not found in {tried}; install Debian's postgresql "
        f"package, set {ENV_BINDIR}, or point {ENV_URL} at a server with wal_level=logical"
    )


@dataclass
class TemporaryCluster:
    """A private PostgreSQL cluster in a temporary directory, trust auth on 127.0.0.1."""

    bindir: Path
    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def start(cls) -> TemporaryCluster:
        bindir = find_bindir()
        root = Path(tempfile.mkdtemp(prefix="tagbus-pg-"))
        cluster = cls(bindir=bindir, root=root, port=free_port())
        os.chmod(root, 0o755)
        cluster._chown(root)
        cluster._run("initdb", "-D", str(cluster.datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(cluster.port),
            "unix_socket_directories": f"'{root}'",
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "100",
        }
        with open(cluster.datadir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.writelines(f"{key} = {value}\n" for key, value in conf.items())
        cluster._run("pg_ctl", "-D", str(cluster.datadir), "-l", str(root / "server.log"), "-w", "-t", "60", "start")
        return cluster

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def _as_postgres(self) -> list[str]:
        # initdb and postgres refuse to run as root.
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._as_postgres(), str(self.bindir / tool), *args]
        result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=self.root)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ClusterUnavailableError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{tail}")


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


def sqlalchemy_url(url: str) -> str:
    params = conninfo_to_dict(url)
    user = params.get("user", "postgres")
    password = f":{params['password']}" if params.get("password") else ""
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    return f"postgresql+psycopg://{user}{password}@{host}:{port}/{params.get('dbname', 'postgres')}"


def apply_migrations(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url))
    command.upgrade(cfg, "head")


def create_template(server_url: str) -> None:
    """(Re)create the migrated template database that each test database is cloned from."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    apply_migrations(with_database(server_url, TEMPLATE_DB))


@contextlib.contextmanager
def cloned_database(server_url: str) -> Iterator[str]:
    """A fresh database cloned from the template; dropped (with its slots) on exit."""
    name = f"tagbus_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE_DB))
        )
    try:
        yield with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            # A slot pins its database: drop the slots first, waiting for any tailer to let go.
            deadline = time.monotonic() + 10
            while True:
                try:
                    conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                        (name,),
                    )
                    break
                except psycopg.errors.ObjectInUse:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
