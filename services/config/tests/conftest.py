"""Fixtures for the config service tests: the real service in-process against real NATS, Redis and
SQLite/PostgreSQL, one fresh subject prefix (and so Redis key prefix and JetStream stream) per test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from cryptography.fernet import Fernet

from voicebus.config import ConfigService, ConfigSettings

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.02)


@pytest.fixture
def secret_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Both supported databases; tests taking this run twice."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


@pytest.fixture
def make_settings(nats_url: str, redis_url: str, subject_prefix: str, secret_key: str,
                  tmp_path: Any) -> Callable[..., ConfigSettings]:
    def make(database_url: str, **overrides: Any) -> ConfigSettings:
        values: dict[str, Any] = dict(
            database_url=database_url, nats_url=nats_url, redis_url=redis_url, subject_prefix=subject_prefix,
            secret_key=secret_key, secret_key_file=str(tmp_path / "secret.key"), quota_lease_ttl_s=30.0,
            reaper_interval_s=5.0, default_concurrent_calls=10,
        )
        values.update(overrides)
        return ConfigSettings(**values)

    return make


@pytest.fixture
async def start_service(make_settings: Callable[..., ConfigSettings]) -> AsyncIterator[Callable[..., Any]]:
    """``async with start_service(db_url, consumer=..., reaper=..., **settings) as svc``; the test's
    JetStream stream is deleted at teardown so test runs leave nothing behind on the NATS server."""
    streams: list[tuple[Any, str]] = []

    @contextlib.asynccontextmanager
    async def start(database_url: str, *, consumer: bool = True, reaper: bool = False,
                    **overrides: Any) -> AsyncIterator[ConfigService]:
        async with ConfigService(make_settings(database_url, **overrides), consumer=consumer, reaper=reaper) as svc:
            streams.append((svc.subjects.events_stream, svc.settings.nats_url))
            yield svc

    yield start
    import nats

    for stream, url in streams:
        nc = await nats.connect(url)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
        await nc.close()


@dataclass
class Org:
    id: int
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
async def svc(start_service: Callable[..., Any], sqlite_url: str) -> AsyncIterator[ConfigService]:
    async with start_service(sqlite_url) as s:
        yield s


@pytest.fixture
async def client(svc: ConfigService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://config") as c:
        yield c


async def new_org(svc: ConfigService, name: str = "Acme", limit: int | None = None) -> Org:
    org, key = await svc.store.create_organization(name, limit)
    return Org(org.id, key)


@pytest.fixture
async def org(svc: ConfigService) -> Org:
    return await new_org(svc)


@pytest.fixture
def helpers() -> Any:
    """Plain helper functions (test modules are imported by path and cannot import each other)."""

    class H:
        eventually = staticmethod(eventually)
        new_org = staticmethod(new_org)

    return H
