"""Quota leases on real Redis: limit, expiry without release, renew, release, concurrency."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from voicebus.config.quota import LeaseExpired, Quota, QuotaExceeded


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture
def prefix(subject_prefix: str) -> str:
    return subject_prefix


async def test_limit_enforced_and_release_frees(redis: Redis, prefix: str) -> None:
    q = Quota(redis, prefix, ttl_s=30)
    a = await q.acquire(1, limit=2)
    b = await q.acquire(1, limit=2)
    assert (a.in_use, b.in_use) == (1, 2) and a.lease_id != b.lease_id
    with pytest.raises(QuotaExceeded) as e:
        await q.acquire(1, limit=2)
    assert str(e.value) == "Concurrent call limit reached" and e.value.in_use == 2
    assert (await q.acquire(2, limit=2)).in_use == 1  # organizations are independent
    assert await redis.zcard(f"{prefix}:quota:1") == 2  # the documented key layout

    assert await q.release(1, a.lease_id) is True
    assert await q.release(1, a.lease_id) is False  # idempotent
    assert await q.in_use(1) == 1
    assert (await q.acquire(1, limit=2)).in_use == 2
    with pytest.raises(QuotaExceeded):
        await q.acquire(3, limit=0)  # a limit of 0 admits nothing


async def test_expired_lease_frees_slot_without_release(redis: Redis, prefix: str, helpers: Any) -> None:
    q = Quota(redis, prefix, ttl_s=0.2)
    lease = await q.acquire(7, limit=1)
    with pytest.raises(QuotaExceeded):
        await q.acquire(7, limit=1)

    async def slot_free() -> Any:
        try:
            return await q.acquire(7, limit=1)
        except QuotaExceeded:
            return None

    second = await helpers.eventually(slot_free, timeout=3, what="expired lease to free its slot")
    assert second.lease_id != lease.lease_id
    with pytest.raises(LeaseExpired):
        await q.renew(7, lease.lease_id, limit=1)
    assert await q.live_leases(7) == {second.lease_id}
    await helpers.eventually(lambda: _key_gone(redis, q.key(7)), timeout=3, what="idle quota key to expire")


async def _key_gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_renew_extends_a_live_lease(redis: Redis, prefix: str) -> None:
    q = Quota(redis, prefix, ttl_s=30)
    lease = await q.acquire(5, limit=3)
    key = q.key(5)
    before = await redis.zscore(key, lease.lease_id)
    await redis.zadd(key, {lease.lease_id: before - 20_000})  # pretend 20 s passed
    renewed = await q.renew(5, lease.lease_id, limit=3)
    after = await redis.zscore(key, lease.lease_id)
    assert renewed.lease_id == lease.lease_id and renewed.in_use == 1
    assert after > before - 1000  # pushed a full ttl from now again
    with pytest.raises(LeaseExpired):
        await q.renew(5, uuid.uuid4().hex, limit=3)
    await q.release(5, lease.lease_id)
    with pytest.raises(LeaseExpired):  # a released lease cannot be revived by renewing it
        await q.renew(5, lease.lease_id, limit=3)


async def test_concurrent_acquires_never_exceed_the_limit(redis_url: str, prefix: str) -> None:
    clients = [Redis.from_url(redis_url) for _ in range(4)]  # like 4 config replicas
    quotas = [Quota(c, prefix, ttl_s=30) for c in clients]
    try:
        async def try_acquire(i: int) -> bool:
            try:
                await quotas[i % 4].acquire(9, limit=5)
                return True
            except QuotaExceeded:
                return False

        results = await asyncio.gather(*(try_acquire(i) for i in range(60)))
        assert sum(results) == 5
        assert await quotas[0].in_use(9) == 5
    finally:
        for c in clients:
            await c.aclose()
