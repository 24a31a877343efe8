"""call-control: the only place that holds carrier secrets and calls carrier REST APIs, answering
``{prefix}.ctl.*`` requests.

It keeps no credentials: each request that needs them fetches them from config for that request only,
so rotating a token in config takes effect at once and a compromised call-control process holds
nothing at rest. It does keep calls: the leg registry (:mod:`voicebus.call_control.legs`) maps every
voicebus call id to its carrier call, so other services name calls by call id only.

Actions that must not happen twice (hangup, dialing out) are claimed per call. Several parties may
ask for the same hangup (the runner when the agent ends the call, ingress when a runner is lost, a
retry after a bus timeout), possibly on different replicas at the same moment. The first one claims
``hangup.{call_id}`` in a JetStream KV bucket with ``create`` (which fails if the key exists), does
the work, then records the outcome; everyone else waits for that record and answers from it with
``replayed=True``. A claim whose holder died is taken over after ``claim_stale_s``. ``initiate`` uses
the same claim under ``initiate.{call_id}``.

Hangups also arrive as durable intents (:mod:`voicebus.call_control.intents`), so one asked for while
call-control was down is carried out once it is back; and on start, :meth:`CallControlService.reconcile`
hangs up every leg still live in the registry whose run has already ended (the gap an outage leaves).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, ConfigDict

from voicebus.bus.events import ensure_events_stream, kv_bucket, publish_call_ended, publish_event
from voicebus.bus.messages import (
    TERMINAL_STATES,
    BindNumberRequest,
    BindNumberResult,
    CallEnded,
    CallHangup,
    CallInfoRequest,
    CallInfoResult,
    HangupRequest,
    HangupResult,
    InitiateRequest,
    InitiateResult,
    LegRegister,
    LegRegistered,
    RunGetRequest,
    RunRecord,
    TelephonyCredentials,
    TelephonyCredentialsRequest,
    VerifyRequest,
    VerifyResult,
)
from voicebus.bus.rpc import BusError, request, serve
from voicebus.bus.subjects import (
    CALL_CONTROL_QUEUE,
    CFG_RUN_GET,
    CFG_TELEPHONY_CREDENTIALS,
    CTL_BIND_NUMBER,
    CTL_CALL_INFO,
    CTL_HANGUP,
    CTL_INITIATE,
    CTL_LEG_REGISTER,
    CTL_TRANSFER,
    CTL_VERIFY,
    EVT_CALL_HANGUP,
    Subjects,
    check_token,
)
from voicebus.call_control.carriers import Carriers, carrier_call, parse_credentials, spec_of
from voicebus.call_control.intents import IntentWorker
from voicebus.call_control.legs import LEGS_TTL_S, Leg, LegConflict, LegRegistry, legs_bucket
from voicebus.call_control.settings import DEFAULT_PUBLIC_URL
from voicebus.telephony.calls import DialRequest
from voicebus.telephony.registry import ProviderSpec
from voicebus.telephony.verify import Verdict
from voicebus.telephony.webhook import MAX_WEBHOOK_BODY, WebhookRequest

log = logging.getLogger("voicebus.call_control")

SOURCE = "call-control"
ACTIONS_TTL_S = 24 * 3600
REPLAY_TTL_S = 10 * 60  # a carrier retries a delivery within minutes; a key older than this is forgotten
RECONCILE_TIMEOUT_S = 30.0
RECONCILE_CONCURRENCY = 8
RECONCILE_REASON = "reconciled: run already ended"


class AnyRequest(BaseModel):
    """Accepts any JSON object: the actions that are not implemented yet have no schema to check."""

    model_config = ConfigDict(extra="allow")


def _bucket(subjects: Subjects, name: str) -> str:
    return f"{subjects.prefix.replace('-', '_')}_ctl_{name}"


def actions_bucket(subjects: Subjects) -> str:
    return _bucket(subjects, "actions")


def replay_bucket(subjects: Subjects) -> str:
    return _bucket(subjects, "replay")


def answer_url(public_url: str, run_id: int) -> str:
    return f"{public_url}/api/v1/telephony/answer/{run_id}"


def status_url(public_url: str, provider: str, run_id: int) -> str:
    return f"{public_url}/api/v1/telephony/{provider}/status-callback/{run_id}"


def _check_call_id(call_id: str) -> None:
    try:
        check_token(call_id, "call id")
    except ValueError as e:
        raise BusError("invalid_request", str(e)) from e


def _confirm_detail(status: int) -> str:
    if status in (401, 403):
        return f"the carrier rejected the configuration's bearer token ({status})"
    if status == 404:
        return "the carrier does not know this session (unknown or already ended)"
    if 200 <= status < 300:
        return "the carrier knows the call but it is no longer live"
    return f"the carrier answered {status}"


def _digits(number: str) -> str:
    """A number as compared against the configured ones: ``+1 (555) 010-0001`` = ``+15550100001``."""
    return "".join(c for c in number if c.isdigit() or c == "+")


def choose_from_number(parsed: BaseModel, requested: str | None) -> str:
    """The caller id of an outbound call: the requested one if the configuration allows it, else its first.

    A configuration whose schema has ``from_numbers`` restricts the caller id to them (a carrier
    account may own numbers other tenants must not present); the refusal names how many there are,
    not which, since the request may come from an API client that should not learn them.
    """
    has_field = "from_numbers" in type(parsed).model_fields
    allowed = [str(n) for n in (getattr(parsed, "from_numbers", None) or [])] if has_field else []
    if requested and requested.strip():
        wanted = requested.strip()
        if not has_field:
            return wanted
        for number in allowed:
            if _digits(number) == _digits(wanted):
                return number
        raise BusError("invalid_request",
                       f"from_number is not one of the configuration's {len(allowed)} from_numbers")
    if allowed:
        return allowed[0]
    raise BusError("invalid_request", "configuration has no from_numbers")


@dataclass
class ReconcileCounts:
    legs: int = 0
    live: int = 0
    running: int = 0
    ended_runs: int = 0
    hung_up: int = 0
    failed: int = 0
    unknown: int = 0
    timed_out: bool = False

    def summary(self) -> str:
        return (f"{self.legs} leg(s) in the registry, {self.live} live: {self.running} with a live run, "
                f"{self.ended_runs} with an ended run ({self.hung_up} hung up, {self.failed} failed), "
                f"{self.unknown} whose run could not be read")


class CallControlService:
    """Importable so tests (and an all-in-one process) can run it in-process; ``start``/``stop``."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        carriers: Carriers,
        *,
        public_url: str = DEFAULT_PUBLIC_URL,
        instance_id: str | None = None,
        concurrency: int = 32,
        config_timeout_s: float = 3.0,
        claim_stale_s: float = 60.0,
        claim_wait_s: float = 14.0,
        replay_ttl_s: float = REPLAY_TTL_S,
        intents: bool = True,
        intent_backoff_s: float = 0.5,
        intent_max_backoff_s: float = 30.0,
        intent_give_up_after_s: float = 3600.0,
        reconcile_on_start: bool = True,
        reconcile_timeout_s: float = RECONCILE_TIMEOUT_S,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.carriers = carriers
        self.public_url = public_url.rstrip("/")
        self.instance_id = instance_id or f"call-control-{uuid.uuid4().hex[:8]}"
        self.concurrency = concurrency
        self.config_timeout_s = config_timeout_s
        self.claim_stale_s = claim_stale_s
        self.claim_wait_s = claim_wait_s
        self.replay_ttl_s = replay_ttl_s
        self.reconcile_on_start = reconcile_on_start
        self.reconcile_timeout_s = reconcile_timeout_s
        self.intents = IntentWorker(self, concurrency=concurrency, backoff_s=intent_backoff_s,
                                    max_backoff_s=intent_max_backoff_s,
                                    give_up_after_s=intent_give_up_after_s) if intents else None
        self.reconciled: asyncio.Task[ReconcileCounts] | None = None
        self._kv: KeyValue | None = None
        self._replay: KeyValue | None = None
        self._legs: LegRegistry | None = None
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
        self._replay = await kv_bucket(self.nc, replay_bucket(self.subjects), self.replay_ttl_s)
        self._legs = LegRegistry(await kv_bucket(self.nc, legs_bucket(self.subjects), LEGS_TTL_S))
        s = self.subjects
        routes: list[tuple[str, type[BaseModel], Callable[[Any], Awaitable[BaseModel]]]] = [
            (s.ctl(CTL_LEG_REGISTER), LegRegister, self.leg_register),
            (s.ctl(CTL_VERIFY), VerifyRequest, self.verify),
            (s.ctl(CTL_HANGUP), HangupRequest, self.hangup),
            (s.ctl(CTL_INITIATE), InitiateRequest, self.initiate),
            (s.ctl(CTL_CALL_INFO), CallInfoRequest, self.call_info),
            (s.ctl(CTL_BIND_NUMBER), BindNumberRequest, self.bind_number),
            (s.ctl(CTL_TRANSFER), AnyRequest, self._not_implemented("transfer")),
        ]
        for subject, model, handler in routes:
            self._subs.append(await serve(self.nc, subject, model, self._tracked(handler),
                                          queue=CALL_CONTROL_QUEUE, concurrency=self.concurrency))
        if self.intents is not None:
            await self.intents.start()
        if self.reconcile_on_start:
            self.reconciled = asyncio.create_task(self._reconcile_logged(), name="call-control-reconcile")
        self.started = True
        log.info("call-control %s serving %s", self.instance_id, s.ctl_all)

    async def stop(self, drain_timeout_s: float = 20.0) -> None:
        """Stop taking requests, then let the ones in flight finish (a half-done hangup helps nobody)."""
        self.started = False
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self.reconciled is not None and not self.reconciled.done():
            self.reconciled.cancel()
            with contextlib.suppress(BaseException):
                await self.reconciled
        if self.intents is not None:
            await self.intents.stop(drain_timeout_s)
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

    def _require_kv(self) -> KeyValue:
        if self._kv is None:
            raise BusError("internal", "call-control is not started")
        return self._kv

    @property
    def legs(self) -> LegRegistry:
        if self._legs is None:
            raise BusError("internal", "call-control is not started")
        return self._legs

    # ------------------------------------------------------------------ config
    async def _credentials(self, telephony_config_id: int) -> TelephonyCredentials:
        try:
            return await request(self.nc, self.subjects.cfg(CFG_TELEPHONY_CREDENTIALS),
                                 TelephonyCredentialsRequest(telephony_config_id=telephony_config_id),
                                 TelephonyCredentials, timeout=self.config_timeout_s)
        except BusError as e:
            raise BusError(e.code, f"config could not give credentials of telephony configuration "
                                   f"{telephony_config_id}: {e.message}") from e

    async def _owned_credentials(self, telephony_config_id: int, organization_id: int) -> TelephonyCredentials:
        """Credentials of a configuration of ``organization_id``: never act on another tenant's account,
        whatever the caller claims (config hands credentials to call-control for any organization)."""
        creds = await self._credentials(telephony_config_id)
        if creds.organization_id != organization_id:
            raise BusError("not_found", f"telephony configuration {telephony_config_id} does not belong "
                                        f"to organization {organization_id}")
        return creds

    # ------------------------------------------------------------------ leg_register
    async def leg_register(self, req: LegRegister) -> LegRegistered:
        _check_call_id(req.call_id)
        if not req.carrier_call_id.strip():
            raise BusError("invalid_request", "carrier_call_id must not be empty")
        creds = await self._owned_credentials(req.telephony_config_id, req.organization_id)
        status: int | None = None
        if req.confirm:
            _, _, rest = self.carriers.rest(creds.provider, creds.credentials, "confirm_call")
            ok, status = await carrier_call(rest.confirm_call(req.carrier_call_id))
            if not ok:
                log.info("leg of call %s not registered: the carrier did not confirm it (%s)", req.call_id, status)
                return LegRegistered(confirmed=False, status=status, detail=_confirm_detail(status))
        spec = spec_of(creds.provider)
        now = time.time()
        leg = Leg(call_id=req.call_id, telephony_config_id=req.telephony_config_id,
                  organization_id=req.organization_id, run_id=req.run_id, provider=spec.name,
                  carrier_call_id=req.carrier_call_id, direction=req.direction, created_at=now, updated_at=now)
        try:
            await self.legs.register(leg)
        except LegConflict as e:
            raise BusError("conflict", f"call {req.call_id} is already registered to another carrier call") from e
        log.info("registered the %s %s leg of call %s (run %s)", req.direction, spec.name, req.call_id, req.run_id)
        return LegRegistered(confirmed=req.confirm, status=status)

    # ------------------------------------------------------------------ verify
    async def verify(self, req: VerifyRequest) -> VerifyResult:
        """Signature check of a carrier request. Never logs the URL (it may carry a token) or headers."""
        creds = await self._credentials(req.telephony_config_id)
        spec = spec_of(creds.provider)
        if spec.verifier is None:
            return VerifyResult(valid=False, reason=f"{spec.display_name} does not sign its requests")
        try:
            body = base64.b64decode(req.body_b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BusError("invalid_request", "body_b64 is not valid base64") from e
        if len(body) > MAX_WEBHOOK_BODY:
            raise BusError("invalid_request", f"body is larger than {MAX_WEBHOOK_BODY} bytes")
        parsed = parse_credentials(spec, creds.credentials)
        webhook = WebhookRequest(method=req.method.upper(), url=req.url,
                                 headers={k.lower(): v for k, v in req.headers.items()}, body=body)
        try:
            verdict = spec.verifier.verify(webhook, parsed, now=time.time())
        except Exception as e:  # fail closed: a verifier bug is a refusal, not an accepted request
            log.warning("%s signature check raised %s; refused", spec.name, type(e).__name__)
            verdict = Verdict.refuse("the signature could not be checked")
        if not verdict.ok:
            log.info("%s signature refused for configuration %s: %s", spec.name, req.telephony_config_id,
                     verdict.reason)
            return VerifyResult(valid=False, reason=verdict.reason)
        replayed = False
        if verdict.replay_key:
            replayed = not await self._first_delivery(spec, req.telephony_config_id, verdict.replay_key)
            if replayed:
                log.info("%s delivery for configuration %s is a replay", spec.name, req.telephony_config_id)
        return VerifyResult(valid=True, replayed=replayed)

    async def _first_delivery(self, spec: ProviderSpec, telephony_config_id: int, replay_key: str) -> bool:
        """Claim a delivery's key for ``replay_ttl_s``; False if it was claimed already.

        The key is hashed: it is carrier-chosen text (not a valid KV key in general) and may be
        guessable enough that it should not sit in the bucket in clear.
        """
        if self._replay is None:
            raise BusError("internal", "call-control is not started")
        digest = hashlib.sha256(f"{spec.name}\0{telephony_config_id}\0{replay_key}".encode()).hexdigest()
        try:
            await self._replay.create(digest, b"1")
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    # ------------------------------------------------------------------ hangup
    async def hangup(self, req: HangupRequest) -> HangupResult:
        _check_call_id(req.call_id)
        kv = self._require_kv()
        key = f"hangup.{req.call_id}"

        claim = await self._claim_or_replay(kv, key, "hanging up")
        if isinstance(claim, dict):
            result = HangupResult(outcome=claim["outcome"], status=claim.get("status"), replayed=True)
            log.info("hangup of call %s replayed (%s)", req.call_id, result.outcome)
            return result

        try:
            outcome, status = await self._hang_up_leg(req)
            await self._publish(req, outcome, status)
        except BaseException:
            # Release the claim so that a retry can try again; the carrier call is idempotent.
            with contextlib.suppress(Exception):
                await kv.delete(key, last=claim)
            raise
        await self._record(kv, key, claim, {"outcome": outcome, "status": status})
        log.info("hung up call %s: %s", req.call_id, outcome)
        return HangupResult(outcome=outcome, status=status)

    async def _hang_up_leg(self, req: HangupRequest) -> tuple[str, int | None]:
        leg = await self.legs.get(req.call_id)
        if leg is None:
            # Nothing to hang up at a carrier (the call never got a leg, or it expired), but the run must
            # still end: the caller asked for it.
            log.info("hangup of call %s: no leg registered", req.call_id)
            return "no_leg", None
        if leg.organization_id != req.organization_id:
            raise BusError("not_found", f"call {req.call_id} has no leg in organization {req.organization_id}")
        if leg.run_id != req.run_id:
            raise BusError("invalid_request", f"call {req.call_id} belongs to run {leg.run_id}, not {req.run_id}")
        if leg.state == "ended":
            return "already_ended", None
        creds = await self._owned_credentials(leg.telephony_config_id, leg.organization_id)
        _, _, rest = self.carriers.rest(creds.provider, creds.credentials, "hangup")
        outcome = await carrier_call(rest.hangup(leg.carrier_call_id))
        await self.legs.mark_ended(leg, req.reason)
        return outcome, None

    async def _publish(self, req: HangupRequest, outcome: str, status: int | None) -> None:
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

    async def end_run_after_failed_hangup(self, req: HangupRequest, error: BusError) -> None:
        """A hangup intent that cannot be carried out still ends its run, as it was asked to.

        The carrier leg may still be up; the error log line (with the call id) is what an operator
        follows. The event ids are those of a successful hangup, so a later success is not recorded twice.
        """
        js = self.nc.jetstream()
        common = {"call_id": req.call_id, "run_id": req.run_id, "organization_id": req.organization_id,
                  "source": SOURCE}
        await publish_event(js, self.subjects, EVT_CALL_HANGUP,
                            CallHangup(event_id=f"{req.call_id}.ctl.hangup", outcome=f"failed: {error.code}",
                                       **common))
        if req.end_state is not None:
            await publish_call_ended(js, self.subjects,
                                     CallEnded(event_id=f"{req.call_id}.ctl.ended", state=req.end_state,
                                               reason=req.reason, **common))

    # ------------------------------------------------------------------ reconcile
    async def _reconcile_logged(self) -> ReconcileCounts:
        try:
            return await self.reconcile()
        except Exception:
            log.exception("reconcile failed")
            return ReconcileCounts()

    async def reconcile(self, timeout_s: float | None = None) -> ReconcileCounts:
        """Hang up every leg the registry holds as live whose run is terminal; bounded by ``timeout_s``.

        Such legs are what an outage leaves behind: a hangup asked for while call-control was down
        and lost (or given up by its caller), a run ended by config's reaper, a caller hangup that never
        reached the registry. Legs of runs still live are left alone; a run config does not know (or
        config being away) is counted and skipped: never hang up a call that may still be talking.
        """
        counts = ReconcileCounts()
        started = time.monotonic()
        budget = self.reconcile_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(budget):
                try:
                    keys = await self.legs.kv.keys()
                except nats.js.errors.NoKeysError:
                    keys = []
                counts.legs = len(keys)
                slots = asyncio.Semaphore(RECONCILE_CONCURRENCY)

                async def one(call_id: str) -> None:
                    async with slots:
                        await self._reconcile_leg(call_id, counts)

                await asyncio.gather(*(one(k) for k in keys))
        except TimeoutError:
            counts.timed_out = True
        log.log(logging.WARNING if counts.timed_out or counts.failed else logging.INFO,
                "reconcile%s in %.1fs: %s", " timed out" if counts.timed_out else "", time.monotonic() - started,
                counts.summary())
        return counts

    async def _reconcile_leg(self, call_id: str, counts: ReconcileCounts) -> None:
        leg = await self.legs.get(call_id)
        if leg is None or leg.state != "live":
            return
        counts.live += 1
        try:
            run = await request(self.nc, self.subjects.cfg(CFG_RUN_GET), RunGetRequest(run_id=leg.run_id),
                                RunRecord, timeout=self.config_timeout_s)
        except BusError as e:
            counts.unknown += 1
            log.info("reconcile: call %s left alone: its run %s could not be read (%s)", call_id, leg.run_id, e)
            return
        if run.state not in TERMINAL_STATES:
            counts.running += 1
            return
        counts.ended_runs += 1
        req = HangupRequest(call_id=call_id, run_id=leg.run_id, organization_id=leg.organization_id,
                            reason=RECONCILE_REASON, end_state=None)
        try:
            result = await self.hangup(req)
            if result.replayed and (again := await self.legs.get(call_id)) is not None and again.state == "live":
                # The recorded hangup found no leg (registered after it): this one is still up.
                await self._hang_up_leg(req)
        except BusError as e:
            counts.failed += 1
            log.warning("reconcile: could not hang up call %s (run %s %s): %s", call_id, run.id, run.state, e)
            return
        counts.hung_up += 1
        log.info("reconcile: hung up call %s, whose run %s had ended %s", call_id, run.id, run.state)

    # ------------------------------------------------------------------ initiate
    async def initiate(self, req: InitiateRequest) -> InitiateResult:
        """Dial out once per call id: a retry (bus timeout, a second replica) answers from the first dial."""
        _check_call_id(req.call_id)
        if not req.to_number.strip():
            raise BusError("invalid_request", "to_number must not be empty")
        kv = self._require_kv()
        key = f"initiate.{req.call_id}"
        claim = await self._claim_or_replay(kv, key, "placing")
        if isinstance(claim, dict):
            # The leg is registered again (a no-op when it is there) in case the first request died
            # between dialing and registering.
            await self.legs.register(Leg.model_validate(claim["leg"]))
            log.info("initiate of call %s replayed", req.call_id)
            return InitiateResult.model_validate(claim["result"])

        try:
            leg, result = await self._dial(req)
        except BaseException:
            with contextlib.suppress(Exception):
                await kv.delete(key, last=claim)  # nothing was dialed: a retry may try again
            raise
        # From here on a call exists at the carrier: keep the claim whatever happens, so no retry dials again.
        await self._record(kv, key, claim, {"leg": leg.model_dump(mode="json"),
                                            "result": result.model_dump(mode="json")})
        try:
            await self.legs.register(leg)
        except LegConflict as e:
            log.error("call %s was dialed but its id already names another leg", req.call_id)
            raise BusError("conflict", f"call {req.call_id} is already registered to another carrier call") from e
        log.info("dialed call %s (run %s) through %s", req.call_id, req.run_id, leg.provider)
        return result

    async def _dial(self, req: InitiateRequest) -> tuple[Leg, InitiateResult]:
        if await self.legs.get(req.call_id) is not None:
            raise BusError("conflict", f"call {req.call_id} already has a leg")
        creds = await self._owned_credentials(req.telephony_config_id, req.organization_id)
        spec, parsed, rest = self.carriers.rest(creds.provider, creds.credentials, "dial")
        from_number = choose_from_number(parsed, req.from_number)
        dialed = await carrier_call(rest.dial(DialRequest(
            to_number=req.to_number.strip(), from_number=from_number,
            answer_url=answer_url(self.public_url, req.run_id),
            status_url=status_url(self.public_url, spec.name, req.run_id), ring_timeout_s=req.ring_timeout_s)))
        now = time.time()
        leg = Leg(call_id=req.call_id, telephony_config_id=req.telephony_config_id,
                  organization_id=req.organization_id, run_id=req.run_id, provider=spec.name,
                  carrier_call_id=dialed.carrier_call_id, direction="outbound", created_at=now, updated_at=now)
        return leg, InitiateResult(carrier_call_id=dialed.carrier_call_id, from_number=from_number,
                                   status=dialed.status)

    # ------------------------------------------------------------------ call_info, bind_number
    async def call_info(self, req: CallInfoRequest) -> CallInfoResult:
        _check_call_id(req.call_id)
        leg = await self.legs.get(req.call_id)
        if leg is None or leg.organization_id != req.organization_id:
            raise BusError("not_found", f"call {req.call_id} has no leg in organization {req.organization_id}")
        creds = await self._owned_credentials(leg.telephony_config_id, leg.organization_id)
        _, _, rest = self.carriers.rest(creds.provider, creds.credentials, "call_info")
        info = await carrier_call(rest.call_info(leg.carrier_call_id))
        return CallInfoResult(status=info.status, raw_status=info.raw_status, duration_s=info.duration_s,
                              price=info.price, price_unit=info.price_unit)

    async def bind_number(self, req: BindNumberRequest) -> BindNumberResult:
        if not req.number.strip():
            raise BusError("invalid_request", "number must not be empty")
        parts = urlsplit(req.voice_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BusError("invalid_request", "voice_url must be an http(s) URL")
        creds = await self._owned_credentials(req.telephony_config_id, req.organization_id)
        spec, _, rest = self.carriers.rest(creds.provider, creds.credentials, "bind_number")
        bound = await carrier_call(rest.bind_number(req.number.strip(), req.voice_url))
        log.info("bound a %s number of configuration %s to voicebus", spec.name, req.telephony_config_id)
        return BindNumberResult(number=bound.number, number_sid=bound.number_sid, voice_url=bound.voice_url)

    # ------------------------------------------------------------------ claims
    async def _record(self, kv: KeyValue, key: str, claim: int, fields: dict[str, Any]) -> None:
        record = {"state": "done", **fields, "by": self.instance_id, "done_at": time.time()}
        try:
            await kv.update(key, json.dumps(record).encode(), last=claim)
        except nats.js.errors.KeyWrongLastSequenceError:
            log.warning("claim %s was taken over before it was recorded", key)

    async def _claim_or_replay(self, kv: KeyValue, key: str, doing: str) -> int | dict[str, Any]:
        """Return our claim's revision, or the record of whoever did this action first."""
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
                return record
            if time.time() - float(record.get("claimed_at", 0)) > self.claim_stale_s:
                try:
                    rev = await kv.update(key, pending, last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                log.warning("took over a stale claim %s held by %s", key, record.get("by"))
                return rev
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusError("in_progress", f"another call-control request is still {doing} this call; "
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
