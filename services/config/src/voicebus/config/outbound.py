"""``POST /api/v1/telephony/initiate-call``: an outbound run, its quota lease, and call-control's dial.

Order matters for the guarantees: the lease is taken before the run exists (a refused call leaves no
run), the run exists before call-control dials (the carrier's answer and status callbacks name a run
that is already there), and every failure after the lease ends the run ``failed`` with the reason and
releases the lease, so a call that was not placed never holds a slot or stays ``created``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import uuid
from collections.abc import Coroutine
from typing import Any, NoReturn

from nats.aio.client import Client as NATS

from voicebus.bus import subjects as sj
from voicebus.bus.messages import HangupRequest, HangupResult, InitiateRequest, InitiateResult, RunCreate, RunUpdate
from voicebus.bus.rpc import BusError, request
from voicebus.bus.subjects import Subjects
from voicebus.config.errors import BadRequest, CallNotPlaced, Invalid, QuotaExceededError
from voicebus.config.phone import InvalidNumber, normalize_e164
from voicebus.config.quota import Quota, QuotaExceeded
from voicebus.config.ringing import RING_GRACE_S, RingingLeases
from voicebus.config.schemas import InitiateCall, InitiateCallOut
from voicebus.config.store import Store
from voicebus.telephony import get_spec

log = logging.getLogger("voicebus.config.outbound")

INITIATE_TIMEOUT_S = 15.0
RETRY_AFTER_S = "5"
NO_DIAL_CONFIGURATION = "no telephony configuration that can place calls"
AUTH_FAILED = "the carrier rejected the configuration's credentials"

# call-control's error code -> (HTTP status, retryable). Anything else is call-control misbehaving: 502.
_STATUS = {
    "carrier_invalid_number": (400, False),
    "invalid_request": (400, False),  # e.g. a from number that is not one of the configuration's
    "not_supported": (400, False),
    "carrier_auth_failed": (502, False),
    "carrier_error": (503, True),
    "timeout": (503, True),
    "no_responders": (503, True),
}


def _can_dial(provider: str) -> bool:
    spec = get_spec(provider)
    return spec is not None and "dial" in spec.rest_actions


def _e164(value: str, field: str) -> str:
    try:
        return normalize_e164(value)
    except InvalidNumber as e:
        raise Invalid(f"{field}: {e}", ("body", field)) from None


class Outbound:
    def __init__(self, nc: NATS, subjects: Subjects, store: Store, quota: Quota, ringing: RingingLeases,
                 initiate_timeout_s: float = INITIATE_TIMEOUT_S, ring_grace_s: float = RING_GRACE_S) -> None:
        self.nc = nc
        self.subjects = subjects
        self.store = store
        self.quota = quota
        self.ringing = ringing
        self.initiate_timeout_s = initiate_timeout_s
        self.ring_grace_s = ring_grace_s
        self._background: set[asyncio.Task[None]] = set()

    async def choose_configuration(self, organization_id: int, config_id: int | None) -> tuple[int, str]:
        """The explicit configuration (404 outside the organization, 400 if its carrier cannot dial),
        else the organization's dial-capable configuration with the lowest id."""
        if config_id is not None:
            [(cid, provider)] = await self.store.telephony_providers(organization_id, config_id)
            if not _can_dial(provider):
                raise BadRequest(f"provider {provider!r} of telephony configuration {cid} cannot place calls "
                                 "(its REST client has no 'dial')")
            return cid, provider
        capable = [c for c in await self.store.telephony_providers(organization_id) if _can_dial(c[1])]
        if not capable:
            raise BadRequest(NO_DIAL_CONFIGURATION)
        return capable[0]

    async def initiate(self, organization_id: int, body: InitiateCall) -> InitiateCallOut:
        to_number = _e164(body.to, "to")
        from_number = _e164(body.from_, "from") if body.from_ is not None else None
        agent = await self.store.get_agent(organization_id, body.agent_uuid)
        config_id, provider = await self.choose_configuration(organization_id, body.telephony_configuration_id)

        limit = await self.store.call_limit(organization_id)
        try:
            lease = await self.quota.acquire(organization_id, limit)
        except QuotaExceeded as e:
            err = QuotaExceededError(f"Concurrent call limit reached: {e.in_use} of {e.limit} calls in progress; "
                                     "retry when a call has ended")
            err.headers = {"Retry-After": str(max(1, math.ceil(self.quota.ttl_s)))}
            raise err from None

        call_id = uuid.uuid4().hex
        context = {"called_number": to_number, "direction": "outbound", "provider": provider,
                   "telephony_configuration_id": config_id}
        if from_number is not None:
            context["caller_number"] = from_number
        try:
            run = await self.store.create_run(RunCreate(
                organization_id=organization_id, agent_uuid=agent.uuid,
                name=f"WR-TEL-OUT-{secrets.randbelow(10**8):08d}", call_type="outbound", mode=provider,
                call_id=call_id, initial_context=context, quota_lease_id=lease.lease_id,
                definition_source="published" if agent.published_version is not None else "draft",
                agent_version=agent.published_version), telephony_configuration_id=config_id)
        except BaseException:
            await self._release(organization_id, lease.lease_id)
            raise

        try:
            result = await request(self.nc, self.subjects.ctl(sj.CTL_INITIATE), InitiateRequest(
                call_id=call_id, run_id=run.id, organization_id=organization_id, telephony_config_id=config_id,
                to_number=to_number, from_number=from_number, ring_timeout_s=body.ring_timeout_s), InitiateResult,
                timeout=self.initiate_timeout_s)
        except BusError as e:
            await self._not_placed(run.id, organization_id, lease.lease_id, call_id, e)

        # The lease is kept before anything else can fail: the call is ringing now.
        self.ringing.keep(organization_id, run.id, lease.lease_id, body.ring_timeout_s + self.ring_grace_s)
        record, _ = await self.store.update_run(RunUpdate(
            run_id=run.id, gathered_context={"call_id": result.carrier_call_id},
            initial_context={"caller_number": result.from_number}))
        log.info("outbound run %s (%s) placed via %s configuration %s: carrier call %s", run.id, call_id, provider,
                 config_id, result.carrier_call_id)
        return InitiateCallOut(run_id=run.id, run_name=run.name, call_id=call_id,
                               carrier_call_id=result.carrier_call_id, from_=result.from_number, to=to_number,
                               state=record.state, carrier_status=result.status)

    async def _not_placed(self, run_id: int, organization_id: int, lease_id: str, call_id: str,
                          e: BusError) -> NoReturn:
        reason = f"{e.code}: {e.message}"
        try:
            await self.store.finish_run(run_id, "failed", reason)
        finally:
            await self._release(organization_id, lease_id)
        log.warning("outbound run %s not placed: %s", run_id, reason)
        if e.code == "timeout":
            # call-control may still dial after we gave up: make sure no call rings for a failed run.
            self._spawn(self._hangup(call_id, run_id, organization_id))
        status, retryable = _STATUS.get(e.code, (502, False))
        if e.code == "carrier_auth_failed":
            message = f"{AUTH_FAILED} ({e.message})"
        elif e.code in ("timeout", "no_responders"):
            message = f"call-control is unavailable ({e.message}); retry"
        elif retryable:
            message = f"the carrier could not place the call ({e.message}); retry"
        elif status == 502:
            message = f"call-control refused the call: {reason}"
        else:
            message = e.message
        raise CallNotPlaced(message, status, e.code, run_id,
                            headers={"Retry-After": RETRY_AFTER_S} if retryable else None)

    async def _release(self, organization_id: int, lease_id: str) -> None:
        try:
            await self.quota.release(organization_id, lease_id)
        except Exception:
            log.warning("could not release lease %s of organization %s; it will expire", lease_id, organization_id)

    async def _hangup(self, call_id: str, run_id: int, organization_id: int) -> None:
        with contextlib.suppress(Exception):
            await request(self.nc, self.subjects.ctl(sj.CTL_HANGUP), HangupRequest(
                call_id=call_id, run_id=run_id, organization_id=organization_id,
                reason="initiate timed out", end_state=None), HangupResult, timeout=5.0)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.ringing.stop()

