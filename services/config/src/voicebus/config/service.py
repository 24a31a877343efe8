"""The whole config service as one async context manager.

``voicebus-config serve`` wraps it around uvicorn; tests enter it in-process and talk to ``svc.app``
(ASGI) and to NATS, against the same real servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

import sqlalchemy as sa
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from voicebus.bus.events import ensure_events_stream
from voicebus.bus.subjects import Subjects
from voicebus.config.api import create_app
from voicebus.config.carrier_queries import CarrierQueries
from voicebus.config.consumer import EventConsumer
from voicebus.config.crypto import SecretBox, load_keys
from voicebus.config.db import create_engine, sessionmaker
from voicebus.config.migrate import upgrade
from voicebus.config.nats_api import NatsApi
from voicebus.config.outbound import Outbound
from voicebus.config.quota import Quota
from voicebus.config.reaper import Reaper
from voicebus.config.ringing import RingingLeases
from voicebus.config.settings import ConfigSettings
from voicebus.config.store import Store
from voicebus.kit import Health, connect_nats

log = logging.getLogger("voicebus.config")

HEALTH_TIMEOUT_S = 2.0


def secret_box(settings: ConfigSettings) -> SecretBox:
    raw = settings.secret_key.get_secret_value() if settings.secret_key else None
    return SecretBox(load_keys(raw, settings.secret_key_file))


class ConfigService:
    """Database, Redis, NATS API, event consumer, reaper and the FastAPI app, started and stopped together.

    ``consumer`` and ``reaper`` can be switched off for tests that drive them by hand.
    """

    engine: AsyncEngine
    store: Store
    redis: Redis
    quota: Quota
    nc: NATS
    js: JetStreamContext
    nats_api: NatsApi
    outbound: Outbound
    carrier: CarrierQueries
    consumer: EventConsumer | None
    reaper: Reaper | None
    health: Health
    app: FastAPI

    def __init__(self, settings: ConfigSettings, *, migrate: bool = True, consumer: bool = True,
                 reaper: bool = True) -> None:
        self.settings = settings
        self.subjects = Subjects(prefix=settings.subject_prefix)
        self._migrate = migrate
        self._want_consumer = consumer
        self._want_reaper = reaper
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> ConfigService:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        s = self.settings
        box = secret_box(s)
        self.engine = create_engine(s.database_url)
        self._stack.push_async_callback(self.engine.dispose)
        if self._migrate:
            await upgrade(self.engine)
        self.store = Store(sessionmaker(self.engine), box, s.default_concurrent_calls)

        self.redis = Redis.from_url(s.redis_url)
        self._stack.push_async_callback(self.redis.aclose)
        self.quota = Quota(self.redis, s.subject_prefix, s.quota_lease_ttl_s)

        self.nc = await connect_nats(s.nats_url, name=f"voicebus-config-{s.instance_id or 'local'}")
        self._stack.push_async_callback(self._close_nats)
        self.js = self.nc.jetstream()
        await ensure_events_stream(self.js, self.subjects)

        self.health = Health("config")
        self.health.add("database", self._db_ok)
        self.health.add("redis", self._redis_ok)
        self.health.add("nats", lambda: self.nc.is_connected)
        self.app = create_app(self)

        self.nats_api = NatsApi(self.nc, self.subjects, self.store, self.quota)
        await self.nats_api.start()
        self._stack.push_async_callback(self.nats_api.stop)

        self.outbound = Outbound(self.nc, self.subjects, self.store, self.quota, RingingLeases(self.store, self.quota))
        self.carrier = CarrierQueries(self.nc, self.subjects, self.store, self.settings.public_url)
        self._stack.push_async_callback(self.outbound.stop)

        self.consumer = None
        if self._want_consumer:
            self.consumer = EventConsumer(self.js, self.subjects, self.store, self.quota)
            await self.consumer.start()
            self._stack.push_async_callback(self.consumer.stop)

        self.reaper = Reaper(self.store, self.quota, s.reaper_interval_s, s.run_max_age_s, self.js, self.subjects)
        if self._want_reaper:
            self.reaper.start()
            self._stack.push_async_callback(self.reaper.stop)
        log.info("config service ready (subject prefix %r)", s.subject_prefix)

    async def _close_nats(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()

    # Bounded, so /readyz answers "not ready" quickly instead of hanging on a dead server.
    async def _db_ok(self) -> bool:
        async def probe() -> None:
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))

        await asyncio.wait_for(probe(), HEALTH_TIMEOUT_S)
        return True

    async def _redis_ok(self) -> bool:
        return bool(await asyncio.wait_for(self.redis.ping(), HEALTH_TIMEOUT_S))
