"""Concurrent-call quota as Redis leases that expire unless renewed.

One sorted set per organization: member = lease id, score = expiry in ms (Redis server time, so
replicas with skewed clocks agree). Every operation is one Lua script, so "purge expired, count,
add if below the limit" is atomic and concurrent acquires can never overshoot. A holder that
crashes simply stops renewing and its slot frees itself; nothing has to clean up after it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Keep the key itself alive exactly as long as its longest lease, so idle organizations leave nothing.
_EXPIRE_KEY = """
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if top[2] then redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(top[2])) + 1000) end
"""

ACQUIRE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[2])
if n >= limit then return {0, n} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
""" + _EXPIRE_KEY + """
return {1, n + 1}
"""

RENEW = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return {0, redis.call('ZCARD', KEYS[1])} end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
""" + _EXPIRE_KEY + """
return {1, redis.call('ZCARD', KEYS[1])}
"""

IN_USE = _NOW + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

LIVE = _NOW + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""


class LeaseExpired(Exception):
    pass


@dataclass(frozen=True)
class Lease:
    lease_id: str
    organization_id: int
    ttl_s: float
    limit: int
    in_use: int


class QuotaExceeded(Exception):
    def __init__(self, limit: int, in_use: int) -> None:
        super().__init__("Concurrent call limit reached")
        self.limit = limit
        self.in_use = in_use


class Quota:
    def __init__(self, redis: Redis, key_prefix: str, ttl_s: float) -> None:
        self.redis = redis
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s
        self._acquire = redis.register_script(ACQUIRE)
        self._renew = redis.register_script(RENEW)
        self._in_use = redis.register_script(IN_USE)
        self._live = redis.register_script(LIVE)

    def key(self, organization_id: int) -> str:
        return f"{self.key_prefix}:quota:{organization_id}"

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    async def acquire(self, organization_id: int, limit: int) -> Lease:
        lease_id = uuid.uuid4().hex
        ok, n = await self._acquire(keys=[self.key(organization_id)], args=[self._ttl_ms, limit, lease_id])
        if not ok:
            raise QuotaExceeded(limit, int(n))
        return Lease(lease_id, organization_id, self.ttl_s, limit, int(n))

    async def renew(self, organization_id: int, lease_id: str, limit: int) -> Lease:
        ok, n = await self._renew(keys=[self.key(organization_id)], args=[self._ttl_ms, lease_id])
        if not ok:
            raise LeaseExpired(lease_id)
        return Lease(lease_id, organization_id, self.ttl_s, limit, int(n))

    async def release(self, organization_id: int, lease_id: str) -> bool:
        """Idempotent: releasing a lease that is gone (released, expired) is not an error."""
        return bool(await self.redis.zrem(self.key(organization_id), lease_id))

    async def in_use(self, organization_id: int) -> int:
        return int(await self._in_use(keys=[self.key(organization_id)]))

    async def live_leases(self, organization_id: int) -> set[str]:
        return {m.decode() if isinstance(m, bytes) else m
                for m in await self._live(keys=[self.key(organization_id)])}
