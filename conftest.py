"""Real servers for every test: NATS (JetStream), Redis and PostgreSQL, never mocks.

Order of preference for each: the URL in the environment (NATS_URL, REDIS_URL, DATABASE_URL), then a
server already listening on its default loopback port, then an embedded one (nats-server and Valkey
from wheels) or a testcontainers container when Docker is there. Each test session gets its own
NATS subject prefix, Redis key prefix and PostgreSQL database, so runs never see each other.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from voicebus.cli.embedded import EmbeddedNats, EmbeddedValkey, reachable

LOCAL_NATS = "nats://127.0.0.1:4222"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    url = os.environ.get("NATS_URL")
    if url:
        yield url
        return
    if reachable(LOCAL_NATS, 4222):
        yield LOCAL_NATS
        return
    server = EmbeddedNats().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if reachable(LOCAL_REDIS, 6379):
        yield LOCAL_REDIS
        return
    server = EmbeddedValkey().start()
    try:
        yield server.url
    finally:
        server.stop()


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _sqlalchemy_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://"):]
    return url


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A PostgreSQL server URL (admin database), from env, loopback, or a testcontainer."""
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith("postgresql"):
        yield _asyncpg_dsn(url)
        return
    if reachable(LOCAL_PG, 5432):
        yield LOCAL_PG
        return
    if shutil.which("docker"):
        try:
            from testcontainers.postgres import PostgresContainer

            with PostgresContainer("postgres:16-alpine", driver=None) as pg:
                yield pg.get_connection_url()
                return
        except Exception as e:  # no engine behind the client
            pytest.skip(f"no PostgreSQL reachable and Docker could not start one: {e}")
    pytest.skip("no PostgreSQL reachable (set DATABASE_URL or run one on 127.0.0.1:5432)")


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session (SQLAlchemy asyncpg URL)."""
    import asyncpg

    name = f"vb_test_{uuid.uuid4().hex[:10]}"
    base = postgres_server_url.rsplit("/", 1)[0]

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _sqlalchemy_url(f"{base}/{name}")
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'voicebus.db'}"


@pytest.fixture
def subject_prefix() -> str:
    """A NATS subject prefix no other test or stack uses."""
    return f"t{uuid.uuid4().hex[:10]}"
