"""Ingress's requests to config, call-control and the runner pool, with bus errors mapped to close codes.

The mapping lives in one place so the whole refusal vocabulary of the Agent Stream endpoint (which bus
error becomes which close code and reason) can be read, and tested, at a glance. Anything that is not a
clear "no" from the other service (unreachable, timeout, internal error) becomes
``1011 Internal server error``: the carrier gets an honest "our fault", never a misleading 1008.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from voicebus.bus.events import publish_call_ended, publish_event
from voicebus.bus.messages import (
    AgentResolveRequest,
    CallEnded,
    CallOffer,
    CallStarted,
    HangupRequest,
    HangupResult,
    OfferAccepted,
    QuotaAcquireRequest,
    QuotaLease,
    QuotaLeaseRef,
    QuotaReleased,
    ResolvedAgent,
    RunCreate,
    RunRecord,
    RunUpdate,
    TelephonyMatch,
    TelephonyMatchRequest,
    ValidateSessionRequest,
    ValidateSessionResult,
)
from voicebus.bus.rpc import BusError, request
from voicebus.bus.subjects import (
    CFG_AGENT_RESOLVE,
    CFG_QUOTA_ACQUIRE,
    CFG_QUOTA_RELEASE,
    CFG_QUOTA_RENEW,
    CFG_RUN_CREATE,
    CFG_RUN_UPDATE,
    CFG_TELEPHONY_MATCH,
    CTL_HANGUP,
    CTL_VALIDATE_SESSION,
    EVT_CALL_STARTED,
    Subjects,
)
from voicebus.telephony.agent_stream import CLOSE_INTERNAL, CLOSE_POLICY, INTERNAL_ERROR_REASON, HandshakeError

log = logging.getLogger("voicebus.ingress.bus")

SOURCE = "ingress"


def internal(e: BusError, what: str) -> HandshakeError:
    log.warning("%s failed: %s", what, e)
    return HandshakeError(CLOSE_INTERNAL, INTERNAL_ERROR_REASON)


class BusClient:
    """Typed requests for one ingress process; also the :class:`HandshakeServices` given to providers."""

    def __init__(self, nc: NATS, subjects: Subjects, rpc_timeout_s: float) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.subjects = subjects
        self.timeout = rpc_timeout_s

    # ---------------------------------------------------------------- config
    async def resolve_agent(self, agent_uuid: str) -> ResolvedAgent:
        try:
            return await request(self.nc, self.subjects.cfg(CFG_AGENT_RESOLVE),
                                 AgentResolveRequest(agent_uuid=agent_uuid), ResolvedAgent, timeout=self.timeout)
        except BusError as e:
            if e.code == "not_found":
                raise HandshakeError(CLOSE_POLICY, "Agent not found") from e
            raise internal(e, "agent.resolve") from e

    async def acquire_quota(self, organization_id: int, holder: str) -> QuotaLease:
        try:
            return await request(self.nc, self.subjects.cfg(CFG_QUOTA_ACQUIRE),
                                 QuotaAcquireRequest(organization_id=organization_id, holder=holder),
                                 QuotaLease, timeout=self.timeout)
        except BusError as e:
            if e.code == "quota_exceeded":
                raise HandshakeError(CLOSE_POLICY, "Concurrent call limit reached") from e
            raise internal(e, "quota.acquire") from e

    async def renew_quota(self, organization_id: int, lease_id: str) -> QuotaLease:
        """Raises BusError: the caller decides whether a failed renewal is worth retrying."""
        return await request(self.nc, self.subjects.cfg(CFG_QUOTA_RENEW),
                             QuotaLeaseRef(organization_id=organization_id, lease_id=lease_id),
                             QuotaLease, timeout=self.timeout)

    async def release_quota(self, organization_id: int, lease_id: str, attempts: int = 3) -> bool:
        """Best effort with retries; if config stays unreachable the lease expires on its own."""
        ref = QuotaLeaseRef(organization_id=organization_id, lease_id=lease_id)
        for attempt in range(attempts):
            try:
                res = await request(self.nc, self.subjects.cfg(CFG_QUOTA_RELEASE), ref, QuotaReleased,
                                    timeout=self.timeout)
                return res.released
            except BusError as e:
                log.warning("quota.release attempt %d failed: %s", attempt + 1, e)
                if e.code not in ("no_responders", "timeout"):
                    return False
                await asyncio.sleep(0.2 * (attempt + 1))  # back off; not a synchronization
        return False

    async def create_run(self, run: RunCreate) -> RunRecord:
        try:
            return await request(self.nc, self.subjects.cfg(CFG_RUN_CREATE), run, RunRecord, timeout=self.timeout)
        except BusError as e:
            raise internal(e, "run.create") from e

    async def update_run(self, update: RunUpdate) -> RunRecord:
        try:
            return await request(self.nc, self.subjects.cfg(CFG_RUN_UPDATE), update, RunRecord, timeout=self.timeout)
        except BusError as e:
            raise internal(e, "run.update") from e

    # ---------------------------------------------------------------- HandshakeServices
    async def match_telephony(self, organization_id: int, provider: str, account_id: str) -> TelephonyMatch | None:
        try:
            return await request(
                self.nc, self.subjects.cfg(CFG_TELEPHONY_MATCH),
                TelephonyMatchRequest(organization_id=organization_id, provider=provider, account_id=account_id),
                TelephonyMatch, timeout=self.timeout,
            )
        except BusError as e:
            if e.code == "not_found":
                return None
            raise internal(e, "telephony.match") from e

    async def validate_session(self, telephony_config_id: int, session: str) -> bool:
        try:
            res = await request(
                self.nc, self.subjects.ctl(CTL_VALIDATE_SESSION),
                ValidateSessionRequest(telephony_config_id=telephony_config_id, session=session),
                ValidateSessionResult, timeout=max(self.timeout, 6.0),  # call-control itself waits up to 5 s
            )
        except BusError as e:
            raise internal(e, "ctl.validate_session") from e
        if not res.valid:
            log.info("session validation refused (carrier status %s)", res.status)
        return res.valid

    # ---------------------------------------------------------------- runners and call-control
    async def offer(self, offer: CallOffer, timeout: float) -> OfferAccepted:
        """One offer attempt; raises BusError (no_responders, timeout, at_capacity, ...)."""
        return await request(self.nc, self.subjects.dispatch_offer, offer, OfferAccepted, timeout=timeout)

    async def hangup(self, req: HangupRequest) -> HangupResult:
        return await request(self.nc, self.subjects.ctl(CTL_HANGUP), req, HangupResult, timeout=max(self.timeout, 15.0))

    # ---------------------------------------------------------------- lifecycle events
    async def call_started(self, event: CallStarted) -> None:
        try:
            await publish_event(self.js, self.subjects, EVT_CALL_STARTED, event)
        except Exception as e:  # config also learns "running" from run.update; the event is a record
            log.warning("publishing call.started for call %s failed: %s", event.call_id, e)

    async def call_ended(self, event: CallEnded, attempts: int = 3) -> bool:
        """Publish the terminal event, retrying: the run's end depends on it (or, failing all, the reaper)."""
        for attempt in range(attempts):
            try:
                await publish_call_ended(self.js, self.subjects, event)
                return True
            except Exception as e:  # same event_id on retry: JetStream de-duplicates
                log.warning("publishing call end for call %s failed (attempt %d): %s", event.call_id, attempt + 1, e)
                await asyncio.sleep(0.2 * (attempt + 1))
        log.error("call %s run %s: terminal event not published; config's reaper will end the run",
                  event.call_id, event.run_id)
        return False
