"""Ingress's requests to config, call-control and the runner pool, with bus errors mapped to close codes.

The mapping lives in one place so the whole refusal vocabulary of the Agent Stream endpoint (which bus
error becomes which close code and reason) can be read, and tested, at a glance. Anything that is not a
clear "no" from the other service (unreachable, timeout, internal error) becomes
``1011 Internal server error``: the carrier gets an honest "our fault", never a misleading 1008.
"""

from __future__ import annotations

import asyncio
import base64
import logging

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from voicebus.bus.events import publish_call_ended, publish_event
from voicebus.bus.intents import publish_hangup_intent
from voicebus.bus.messages import (
    AgentResolveRequest,
    CallEnded,
    CallOffer,
    CallStarted,
    CallStatusEvent,
    HangupRequest,
    HangupResult,
    InboundRoute,
    InboundRouteRequest,
    LegRegister,
    LegRegistered,
    OfferAccepted,
    QuotaAcquireRequest,
    QuotaLease,
    QuotaLeaseRef,
    QuotaReleased,
    ResolvedAgent,
    RunCreate,
    RunGetRequest,
    RunRecord,
    RunUpdate,
    TelephonyMatch,
    TelephonyMatchRequest,
    VerifyRequest,
    VerifyResult,
)
from voicebus.bus.rpc import BusError, request
from voicebus.bus.subjects import (
    CFG_AGENT_RESOLVE,
    CFG_INBOUND_ROUTE,
    CFG_QUOTA_ACQUIRE,
    CFG_QUOTA_RELEASE,
    CFG_QUOTA_RENEW,
    CFG_RUN_CREATE,
    CFG_RUN_GET,
    CFG_RUN_UPDATE,
    CFG_TELEPHONY_MATCH,
    CTL_HANGUP,
    CTL_LEG_REGISTER,
    CTL_VERIFY,
    EVT_CALL_STARTED,
    EVT_CALL_STATUS,
    Subjects,
)
from voicebus.ingress.close_codes import CLOSE_INTERNAL, CLOSE_POLICY, INTERNAL_ERROR_REASON, Refusal
from voicebus.telephony.stream import StreamRefused
from voicebus.telephony.webhook import WebhookRequest

log = logging.getLogger("voicebus.ingress.bus")

SOURCE = "ingress"


def internal(e: BusError, what: str) -> Refusal:
    log.warning("%s failed: %s", what, e)
    return Refusal(CLOSE_INTERNAL, INTERNAL_ERROR_REASON)


class BusClient:
    """Typed requests for one ingress process (per-call StreamServices are :class:`CallServices`)."""

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
                raise Refusal(CLOSE_POLICY, "Agent not found") from e
            raise internal(e, "agent.resolve") from e

    async def acquire_quota(self, organization_id: int, holder: str) -> QuotaLease:
        try:
            return await request(self.nc, self.subjects.cfg(CFG_QUOTA_ACQUIRE),
                                 QuotaAcquireRequest(organization_id=organization_id, holder=holder),
                                 QuotaLease, timeout=self.timeout)
        except BusError as e:
            if e.code == "quota_exceeded":
                raise Refusal(CLOSE_POLICY, "Concurrent call limit reached") from e
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

    async def get_run(self, run_id: int) -> RunRecord | None:
        """None when config does not know the run; raises BusError when config cannot answer."""
        try:
            return await request(self.nc, self.subjects.cfg(CFG_RUN_GET), RunGetRequest(run_id=run_id), RunRecord,
                                 timeout=self.timeout)
        except BusError as e:
            if e.code == "not_found":
                return None
            raise

    async def inbound_route(self, provider: str, account_id: str, called_number: str) -> InboundRoute:
        """Raises BusError: ``unknown_account``/``unknown_number`` are answers, anything else a failure."""
        return await request(self.nc, self.subjects.cfg(CFG_INBOUND_ROUTE),
                             InboundRouteRequest(provider=provider, account_id=account_id,
                                                 called_number=called_number),
                             InboundRoute, timeout=self.timeout)

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
            log.warning("telephony.match failed: %s", e)
            raise StreamRefused("internal", INTERNAL_ERROR_REASON) from e

    # ---------------------------------------------------------------- call-control: legs and signatures
    async def register_leg(self, leg: LegRegister) -> LegRegistered:
        """Raises BusError; with ``confirm`` call-control asks the carrier first (up to ~5 s)."""
        return await request(self.nc, self.subjects.ctl(CTL_LEG_REGISTER), leg, LegRegistered,
                             timeout=max(self.timeout, 6.0))

    async def verify(self, telephony_config_id: int, req: WebhookRequest) -> VerifyResult:
        """Raises BusError. The request goes to call-control, which holds the secret; nothing is logged."""
        msg = VerifyRequest(telephony_config_id=telephony_config_id, method=req.method, url=req.url,
                            headers=dict(req.headers), body_b64=base64.b64encode(req.body).decode("ascii"))
        return await request(self.nc, self.subjects.ctl(CTL_VERIFY), msg, VerifyResult, timeout=self.timeout)

    # ---------------------------------------------------------------- runners and call-control
    async def offer(self, offer: CallOffer, timeout: float) -> OfferAccepted:
        """One offer attempt; raises BusError (no_responders, timeout, at_capacity, ...)."""
        return await request(self.nc, self.subjects.dispatch_offer, offer, OfferAccepted, timeout=timeout)

    async def hangup(self, req: HangupRequest) -> HangupResult:
        return await request(self.nc, self.subjects.ctl(CTL_HANGUP), req, HangupResult, timeout=max(self.timeout, 15.0))

    async def hangup_intent(self, req: HangupRequest) -> None:
        """Queue the hangup durably: call-control carries it out even if it is restarting right now.
        Raises ``IntentNotStored`` only when JetStream itself never took it."""
        await publish_hangup_intent(self.js, self.subjects, req)

    # ---------------------------------------------------------------- lifecycle events
    async def call_started(self, event: CallStarted) -> None:
        try:
            await publish_event(self.js, self.subjects, EVT_CALL_STARTED, event)
        except Exception as e:  # config also learns "running" from run.update; the event is a record
            log.warning("publishing call.started for call %s failed: %s", event.call_id, e)

    async def call_status(self, event: CallStatusEvent) -> None:
        """Raises on failure: the carrier retries a status callback we could not record (we answer 503)."""
        await publish_event(self.js, self.subjects, EVT_CALL_STATUS, event)

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


class CallServices:
    """The :class:`~voicebus.telephony.stream.StreamServices` of one call's handshake.

    Bound to the call because confirming a call also records its leg in call-control, and verifying a
    socket upgrade needs the upgrade request; the provider sees neither the bus nor the call's ids.
    """

    def __init__(self, bus: BusClient, *, call_id: str, run_id: int, organization_id: int,
                 upgrade: WebhookRequest) -> None:
        self.bus = bus
        self.call_id = call_id
        self.run_id = run_id
        self.organization_id = organization_id
        self.upgrade = upgrade

    async def match_telephony(self, organization_id: int, provider: str, account_id: str) -> TelephonyMatch | None:
        return await self.bus.match_telephony(organization_id, provider, account_id)

    async def confirm_call(self, telephony_config_id: int, carrier_call_id: str) -> bool:
        try:
            res = await self.bus.register_leg(LegRegister(
                call_id=self.call_id, run_id=self.run_id, organization_id=self.organization_id,
                telephony_config_id=telephony_config_id, carrier_call_id=carrier_call_id, confirm=True))
        except BusError as e:
            log.warning("ctl.leg_register (confirm) failed: %s", e)
            raise StreamRefused("internal", INTERNAL_ERROR_REASON) from e
        if not res.confirmed:
            log.info("call %s: the carrier did not confirm the call (status %s)", self.call_id, res.status)
        return res.confirmed

    async def verify_upgrade(self, telephony_config_id: int) -> tuple[bool, str]:
        try:
            res = await self.bus.verify(telephony_config_id, self.upgrade)
        except BusError as e:
            log.warning("ctl.verify failed: %s", e)
            raise StreamRefused("internal", INTERNAL_ERROR_REASON) from e
        return res.valid, res.reason
