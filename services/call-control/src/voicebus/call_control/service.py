"""call-control: the only place that calls carrier REST APIs, answering ``{prefix}.ctl.*`` requests.

It keeps no credentials: each request names a telephony configuration and the credentials are
fetched from config for that request only, so rotating a token in config takes effect at once and a
compromised call-control process holds nothing at rest.

Hangup is idempotent per call. Several parties may ask for the same hangup (the runner when the
agent ends the call, ingress when a runner is lost, a retry after a bus timeout), possibly on
different replicas at the same moment. The first one claims ``hangup.{call_id}`` in a JetStream KV
bucket with ``create`` (which fails if the key exists), calls the carrier, publishes the lifecycle
events, then records the outcome; everyone else waits for that record and answers from it with
``replayed=True``. A claim whose holder died is taken over after ``claim_stale_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, ConfigDict

from voicebus.bus.events import ensure_events_stream, kv_bucket, publish_call_ended, publish_event
from voicebus.bus.messages import (
    CallEnded,
    CallHangup,
    HangupRequest,
    HangupResult,
    TelephonyCredentials,
    TelephonyCredentialsRequest,
    ValidateSessionRequest,
    ValidateSessionResult,
)
from voicebus.bus.rpc import BusError, request, serve
from voicebus.bus.subjects import (
    CALL_CONTROL_QUEUE,
    CFG_TELEPHONY_CREDENTIALS,
    CTL_HANGUP,
    CTL_INITIATE,
    CTL_TRANSFER,
    CTL_VALIDATE_SESSION,
    EVT_CALL_HANGUP,
    Subjects,
    check_token,
)
from voicebus.call_control.carriers import Carriers

log = logging.getLogger("voicebus.call_control")

SOURCE = "call-control"
ACTIONS_TTL_S = 24 * 3600


class AnyRequest(BaseModel):
    """Accepts any JSON object: the actions that are not implemented yet have no schema to check."""

    model_config = ConfigDict(extra="allow")


def actions_bucket(subjects: Subjects) -> str:
    return f"{subjects.prefix.replace('-', '_')}_ctl_actions"


class CallControlService:
    """Importable so tests (and an all-in-one process) can run it in-process; ``start``/``stop``."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        carriers: Carriers,
        *,
        instance_id: str | None = None,
        concurrency: int = 32,
        config_timeout_s: float = 3.0,
        claim_stale_s: float = 60.0,
        claim_wait_s: float = 14.0,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.carriers = carriers
        self.instance_id = instance_id or f"call-control-{uuid.uuid4().hex[:8]}"
        self.concurrency = concurrency
        self.config_timeout_s = config_timeout_s
        self.claim_stale_s = claim_stale_s
        self.claim_wait_s = claim_wait_s
        self._kv: KeyValue | None = None
        self._subs: list[Subscription] = []
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.started = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        js = self.nc.jetstream()
        await ensure_events_stream(js, self.subjects)
        self._kv = await kv_bucket(self.nc, actions_bucket(self.subjects), ACTIONS_TTL_S)
        s = self.subjects
        routes: list[tuple[str, type[BaseModel], Callable[[Any], Awaitable[BaseModel]]]] = [
            (s.ctl(CTL_VALIDATE_SESSION), ValidateSessionRequest, self.validate_session),
            (s.ctl(CTL_HANGUP), HangupRequest, self.hangup),
            (s.ctl(CTL_TRANSFER), AnyRequest, self._not_implemented("transfer")),
            (s.ctl(CTL_INITIATE), AnyRequest, self._not_implemented("initiate")),
        ]
        for subject, model, handler in routes:
            self._subs.append(await serve(self.nc, subject, model, self._tracked(handler),
                                          queue=CALL_CONTROL_QUEUE, concurrency=self.concurrency))
        self.started = True
        log.info("call-control %s serving %s", self.instance_id, s.ctl_all)

    async def stop(self, drain_timeout_s: float = 20.0) -> None:
        """Stop taking requests, then let the ones in flight finish (a half-done hangup helps nobody)."""
        self.started = False
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
        except TimeoutError:
            log.warning("stopped with %d request(s) still running", self._inflight)

    def _tracked(self, handler: Callable[[Any], Awaitable[BaseModel]]) -> Callable[[Any], Awaitable[BaseModel]]:
        async def run(req: Any) -> BaseModel:
            self._inflight += 1
            self._idle.clear()
            try:
                return await handler(req)
            finally:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.set()

        return run

    @staticmethod
    def _not_implemented(action: str) -> Callable[[AnyRequest], Awaitable[BaseModel]]:
        async def handler(_req: AnyRequest) -> BaseModel:
            raise BusError("not_implemented", f"call-control does not implement {action} yet")

        return handler

    # ------------------------------------------------------------------ config
    async def _credentials(self, telephony_config_id: int) -> TelephonyCredentials:
        try:
            return await request(self.nc, self.subjects.cfg(CFG_TELEPHONY_CREDENTIALS),
                                 TelephonyCredentialsRequest(telephony_config_id=telephony_config_id),
                                 TelephonyCredentials, timeout=self.config_timeout_s)
        except BusError as e:
            raise BusError(e.code, f"config could not give credentials of telephony configuration "
                                   f"{telephony_config_id}: {e.message}") from e

    # ------------------------------------------------------------------ validate_session
    async def validate_session(self, req: ValidateSessionRequest) -> ValidateSessionResult:
        if not req.session.strip():
            raise BusError("invalid_request", "session must not be empty")
        creds = await self._credentials(req.telephony_config_id)
        adapter, parsed = self.carriers.resolve(creds.provider, creds.credentials)
        valid, status = await adapter.validate_session(parsed, req.session)
        if valid:
            detail = ""
        elif status in (401, 403):
            detail = f"the carrier rejected the configuration's bearer token ({status})"
        elif status == 404:
            detail = "the carrier does not know this session (unknown or already ended)"
        else:
            detail = f"the carrier answered {status}"
        return ValidateSessionResult(valid=valid, status=status, detail=detail)

    # ------------------------------------------------------------------ hangup
    async def hangup(self, req: HangupRequest) -> HangupResult:
        try:
            check_token(req.call_id, "call id")
        except ValueError as e:
            raise BusError("invalid_request", str(e)) from e
        if not req.carrier_call_ref.strip():
            raise BusError("invalid_request", "carrier_call_ref must not be empty")
        kv = self._require_kv()
        key = f"hangup.{req.call_id}"

        claim = await self._claim_or_replay(kv, key)
        if isinstance(claim, HangupResult):
            log.info("hangup of call %s replayed (%s)", req.call_id, claim.outcome)
            return claim

        try:
            outcome, status = await self._carrier_hangup(req)
            await self._publish(req, outcome, status)
        except BaseException:
            # Release the claim so that a retry can try again; the carrier call is idempotent.
            with contextlib.suppress(Exception):
                await kv.delete(key, last=claim)
            raise
        record = {"state": "done", "outcome": outcome, "status": status, "by": self.instance_id,
                  "done_at": time.time()}
        try:
            await kv.update(key, json.dumps(record).encode(), last=claim)
        except nats.js.errors.KeyWrongLastSequenceError:
            log.warning("hangup claim of call %s was taken over before it was recorded", req.call_id)
        log.info("hung up call %s: %s (%s)", req.call_id, outcome, status)
        return HangupResult(outcome=outcome, status=status)

    def _require_kv(self) -> KeyValue:
        if self._kv is None:
            raise BusError("internal", "call-control is not started")
        return self._kv

    async def _carrier_hangup(self, req: HangupRequest) -> tuple[Any, int]:
        creds = await self._credentials(req.telephony_config_id)
        if creds.organization_id != req.organization_id:
            # Never act on another organization's carrier account, whatever the caller claims.
            raise BusError("not_found", f"telephony configuration {req.telephony_config_id} does not belong "
                                        f"to organization {req.organization_id}")
        adapter, parsed = self.carriers.resolve(creds.provider, creds.credentials)
        return await adapter.hangup(parsed, req.carrier_call_ref)

    async def _publish(self, req: HangupRequest, outcome: str, status: int) -> None:
        """Event ids are derived from the call so that a retried publish is de-duplicated by JetStream."""
        js = self.nc.jetstream()
        common = {"call_id": req.call_id, "run_id": req.run_id, "organization_id": req.organization_id,
                  "source": SOURCE}
        await publish_event(js, self.subjects, EVT_CALL_HANGUP,
                            CallHangup(event_id=f"{req.call_id}.ctl.hangup", outcome=outcome, status=status,
                                       **common))
        if req.end_state is not None:
            await publish_call_ended(js, self.subjects,
                                     CallEnded(event_id=f"{req.call_id}.ctl.ended", state=req.end_state,
                                               reason=req.reason, **common))

    async def _claim_or_replay(self, kv: KeyValue, key: str) -> int | HangupResult:
        """Return our claim's revision, or the recorded result of whoever did this hangup first."""
        deadline = time.monotonic() + self.claim_wait_s
        pending = json.dumps({"state": "pending", "by": self.instance_id, "claimed_at": time.time()}).encode()
        while True:
            try:
                return await kv.create(key, pending)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # released between our create and get: try to claim again
            record = _decode(entry.value)
            if record.get("state") == "done":
                return HangupResult(outcome=record["outcome"], status=record.get("status"), replayed=True)
            if time.time() - float(record.get("claimed_at", 0)) > self.claim_stale_s:
                try:
                    rev = await kv.update(key, pending, last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                log.warning("took over a stale hangup claim %s held by %s", key, record.get("by"))
                return rev
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusError("in_progress", "another call-control request is still hanging up this call; "
                                              "retry later")
            await _wait_for_change(kv, key, entry.revision, min(remaining, self.claim_stale_s))


def _decode(value: bytes | None) -> dict[str, Any]:
    try:
        data = json.loads(value or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def _wait_for_change(kv: KeyValue, key: str, revision: int, timeout: float) -> None:
    """Return when ``key`` moves past ``revision`` (recorded or released), or after ``timeout``."""
    watcher = await kv.watch(key)
    deadline = time.monotonic() + timeout
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                entry = await watcher.updates(timeout=remaining)
            except nats.errors.TimeoutError:
                return
            if entry is None:
                continue  # end of the initial values
            if entry.revision != revision or entry.operation in (KV_DEL, KV_PURGE):
                return
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
