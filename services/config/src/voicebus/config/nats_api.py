"""The internal ``{prefix}.cfg.*`` request-reply API (queue group ``config``, so replicas share the load).

Only here do decrypted secrets leave the service: the runner needs an agent's LLM key and
call-control needs carrier credentials. NATS itself is the trust boundary (see docs/config-service.md).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from voicebus.bus import subjects as sj
from voicebus.bus.messages import (
    AgentResolveRequest,
    InboundRoute,
    InboundRouteRequest,
    QuotaAcquireRequest,
    QuotaLease,
    QuotaLeaseRef,
    QuotaReleased,
    ResolvedAgent,
    RunCreate,
    RunGetRequest,
    RunRecord,
    RunUpdate,
    TelephonyCredentials,
    TelephonyCredentialsRequest,
    TelephonyMatch,
    TelephonyMatchRequest,
)
from voicebus.bus.rpc import BusError, serve
from voicebus.bus.subjects import Subjects
from voicebus.config.errors import ConfigError
from voicebus.config.quota import Lease, LeaseExpired, Quota, QuotaExceeded
from voicebus.config.store import Store

log = logging.getLogger("voicebus.config.nats")

QUOTA_EXCEEDED_MESSAGE = "Concurrent call limit reached"


def _lease(lease: Lease) -> QuotaLease:
    return QuotaLease(lease_id=lease.lease_id, organization_id=lease.organization_id, ttl_s=lease.ttl_s,
                      limit=lease.limit, in_use=lease.in_use)


class NatsApi:
    def __init__(self, nc: NATS, subjects: Subjects, store: Store, quota: Quota) -> None:
        self.nc = nc
        self.subjects = subjects
        self.store = store
        self.quota = quota
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        routes: list[tuple[str, type[BaseModel], Callable[[Any], Awaitable[BaseModel]]]] = [
            (sj.CFG_AGENT_RESOLVE, AgentResolveRequest, self.agent_resolve),
            (sj.CFG_TELEPHONY_MATCH, TelephonyMatchRequest, self.telephony_match),
            (sj.CFG_TELEPHONY_CREDENTIALS, TelephonyCredentialsRequest, self.telephony_credentials),
            (sj.CFG_RUN_CREATE, RunCreate, self.run_create),
            (sj.CFG_RUN_UPDATE, RunUpdate, self.run_update),
            (sj.CFG_RUN_GET, RunGetRequest, self.run_get),
            (sj.CFG_QUOTA_ACQUIRE, QuotaAcquireRequest, self.quota_acquire),
            (sj.CFG_QUOTA_RENEW, QuotaLeaseRef, self.quota_renew),
            (sj.CFG_QUOTA_RELEASE, QuotaLeaseRef, self.quota_release),
            (sj.CFG_INBOUND_ROUTE, InboundRouteRequest, self.inbound_route),
        ]
        for action, model, handler in routes:
            self._subs.append(await serve(self.nc, self.subjects.cfg(action), model, _translate(handler),
                                          queue=sj.CONFIG_QUEUE))
        await self.nc.flush()

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closed
                log.debug("unsubscribe failed", exc_info=True)
        self._subs.clear()

    # ---- handlers -------------------------------------------------------------------------------
    async def agent_resolve(self, req: AgentResolveRequest) -> ResolvedAgent:
        return await self.store.resolve_agent(req.agent_uuid)

    async def telephony_match(self, req: TelephonyMatchRequest) -> TelephonyMatch:
        return await self.store.match_telephony(req.organization_id, req.provider, req.account_id)

    async def telephony_credentials(self, req: TelephonyCredentialsRequest) -> TelephonyCredentials:
        return await self.store.telephony_credentials(req.telephony_config_id)

    async def inbound_route(self, req: InboundRouteRequest) -> InboundRoute:
        return await self.store.inbound_route(req.provider, req.account_id, req.called_number)

    async def run_create(self, req: RunCreate) -> RunRecord:
        return await self.store.create_run(req)

    async def run_update(self, req: RunUpdate) -> RunRecord:
        record, lease = await self.store.update_run(req)
        if lease:
            await self._release_quietly(record.organization_id, lease)
        return record

    async def run_get(self, req: RunGetRequest) -> RunRecord:
        return await self.store.get_run(req.run_id)

    async def quota_acquire(self, req: QuotaAcquireRequest) -> QuotaLease:
        limit = await self.store.call_limit(req.organization_id)
        try:
            lease = await self.quota.acquire(req.organization_id, limit)
        except QuotaExceeded:
            raise BusError("quota_exceeded", QUOTA_EXCEEDED_MESSAGE) from None
        log.debug("lease %s for organization %s held by %s", lease.lease_id, req.organization_id, req.holder)
        return _lease(lease)

    async def quota_renew(self, req: QuotaLeaseRef) -> QuotaLease:
        limit = await self.store.call_limit(req.organization_id)
        try:
            return _lease(await self.quota.renew(req.organization_id, req.lease_id, limit))
        except LeaseExpired:
            raise BusError("lease_expired", f"lease {req.lease_id} has expired or was released; "
                                            "its slot may already be taken") from None

    async def quota_release(self, req: QuotaLeaseRef) -> QuotaReleased:
        return QuotaReleased(released=await self.quota.release(req.organization_id, req.lease_id))

    async def _release_quietly(self, organization_id: int, lease_id: str) -> None:
        # The run's state is already committed; if Redis is down the lease simply expires (ttl).
        try:
            await self.quota.release(organization_id, lease_id)
        except Exception:
            log.warning("could not release lease %s of organization %s; it will expire", lease_id, organization_id)


def _translate(handler: Callable[[Any], Awaitable[BaseModel]]) -> Callable[[Any], Awaitable[BaseModel]]:
    async def wrapped(req: Any) -> BaseModel:
        try:
            return await handler(req)
        except ConfigError as e:
            raise BusError(e.code, e.message) from None

    return wrapped
