"""Ingress test harness: the real ingress on a real uvicorn port, real NATS and JetStream, and tiny stand-ins
for the OTHER services (config, call-control, a runner) serving their bus subjects on that real NATS.

Every stand-in records what it was asked and notifies a shared condition, so tests wait on the state they
expect (with a timeout) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from voicebus.bus.agent import demo_definition
from voicebus.bus.intents import INTENTS_CONSUMER, ensure_intents_stream
from voicebus.bus.media import RUNNER_HEADER, read_media_headers
from voicebus.bus.messages import (
    HEARTBEAT_INTERVAL_S,
    AgentResolveRequest,
    CallOffer,
    HangupRequest,
    HangupResult,
    Heartbeat,
    InboundRoute,
    InboundRouteRequest,
    LegRegister,
    LegRegistered,
    Msg,
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
    event_in_adapter,
)
from voicebus.bus.rpc import BusError, serve
from voicebus.bus.subjects import (
    CALL_CONTROL_QUEUE,
    CFG_AGENT_RESOLVE,
    CFG_INBOUND_ROUTE,
    CFG_QUOTA_ACQUIRE,
    CFG_QUOTA_RELEASE,
    CFG_QUOTA_RENEW,
    CFG_RUN_CREATE,
    CFG_RUN_GET,
    CFG_RUN_UPDATE,
    CFG_TELEPHONY_MATCH,
    CONFIG_QUEUE,
    CTL_HANGUP,
    CTL_LEG_REGISTER,
    CTL_VERIFY,
    RUNNER_QUEUE,
    Subjects,
)
from voicebus.ingress.service import IngressService
from voicebus.ingress.settings import IngressSettings
from voicebus.telephony.dialects.twilio_media_carrier import carrier_connected, carrier_start

AGENT_UUID = "3f2b8c1e-9a47-4d0e-8b6a-2f1c5e7d9a01"
ORG_ID = 42
DOMAIN = "acme.cloudonix.net"
CONFIG_ID = 7
SESSION = "sess-abc123"
WAIT_S = 5.0


class Changes:
    """A condition every stand-in notifies; ``wait(pred)`` returns once ``pred()`` holds."""

    def __init__(self) -> None:
        self.cond = asyncio.Condition()

    async def notify(self) -> None:
        async with self.cond:
            self.cond.notify_all()

    async def wait(self, pred: Callable[[], Any], timeout: float = WAIT_S) -> Any:
        async def waiter() -> Any:
            async with self.cond:
                await self.cond.wait_for(lambda: bool(pred()))
            return pred()

        return await asyncio.wait_for(waiter(), timeout)


# --------------------------------------------------------------------------------------------- config stand-in
class FakeConfig:
    def __init__(self, nc: NATS, subjects: Subjects, changes: Changes) -> None:
        self.nc, self.subjects, self.changes = nc, subjects, changes
        self.agents = {AGENT_UUID: ResolvedAgent(agent_uuid=AGENT_UUID, organization_id=ORG_ID, name="demo", version=3,
                                                 definition_source="published", definition=demo_definition())}
        self.telephony = {(ORG_ID, "cloudonix", DOMAIN): TelephonyMatch(
            telephony_config_id=CONFIG_ID, provider="cloudonix", name="main", account_id=DOMAIN, has_credentials=True)}
        self.limit = 10
        self.ttl_s = 30.0
        self.leases: dict[str, int] = {}
        self.acquired: list[QuotaAcquireRequest] = []
        self.renewed: list[str] = []
        self.released: list[str] = []
        self.resolved: list[str] = []
        self.creates: list[RunCreate] = []
        self.updates: list[RunUpdate] = []
        self.runs: dict[int, RunRecord] = {}
        self.routes: dict[tuple[str, str, str], InboundRoute] = {}  # (provider, account, number)
        self.route_requests: list[InboundRouteRequest] = []
        self.fail: dict[str, Exception] = {}  # action -> exception to raise (BusError or anything)
        self._ids = itertools.count(1001)
        self._subs: list[Subscription] = []

    async def start(self) -> FakeConfig:
        handlers = {
            CFG_AGENT_RESOLVE: (AgentResolveRequest, self.resolve),
            CFG_TELEPHONY_MATCH: (TelephonyMatchRequest, self.match),
            CFG_QUOTA_ACQUIRE: (QuotaAcquireRequest, self.acquire),
            CFG_QUOTA_RENEW: (QuotaLeaseRef, self.renew),
            CFG_QUOTA_RELEASE: (QuotaLeaseRef, self.release),
            CFG_RUN_CREATE: (RunCreate, self.create_run),
            CFG_RUN_UPDATE: (RunUpdate, self.update_run),
            CFG_RUN_GET: (RunGetRequest, self.get_run),
            CFG_INBOUND_ROUTE: (InboundRouteRequest, self.inbound_route),
        }
        for action, (model, fn) in handlers.items():
            self._subs.append(await serve(self.nc, self.subjects.cfg(action), model, self._wrap(action, fn),
                                          queue=CONFIG_QUEUE))
        return self

    def _wrap(self, action: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def handler(req: Any) -> Msg:
            try:
                if action in self.fail:
                    raise self.fail[action]
                return await fn(req)
            finally:
                await self.changes.notify()

        return handler

    async def resolve(self, req: AgentResolveRequest) -> ResolvedAgent:
        self.resolved.append(req.agent_uuid)
        if req.agent_uuid not in self.agents:
            raise BusError("not_found", "no such agent")
        return self.agents[req.agent_uuid]

    async def match(self, req: TelephonyMatchRequest) -> TelephonyMatch:
        found = self.telephony.get((req.organization_id, req.provider, req.account_id))
        if found is None:
            raise BusError("not_found", "no configuration")
        return found

    async def inbound_route(self, req: InboundRouteRequest) -> InboundRoute:
        self.route_requests.append(req)
        if not any(p == req.provider and a == req.account_id for p, a, _ in self.routes):
            raise BusError("unknown_account", "no configuration has this account")
        route = self.routes.get((req.provider, req.account_id, req.called_number))
        if route is None:
            raise BusError("unknown_number", "number not configured")
        return route

    async def get_run(self, req: RunGetRequest) -> RunRecord:
        if req.run_id not in self.runs:
            raise BusError("not_found", "no such run")
        return self.runs[req.run_id]

    async def acquire(self, req: QuotaAcquireRequest) -> QuotaLease:
        self.acquired.append(req)
        if len(self.leases) >= self.limit:
            raise BusError("quota_exceeded", "Concurrent call limit reached")
        lease_id = uuid.uuid4().hex
        self.leases[lease_id] = req.organization_id
        return QuotaLease(lease_id=lease_id, organization_id=req.organization_id, ttl_s=self.ttl_s, limit=self.limit,
                          in_use=len(self.leases))

    async def renew(self, req: QuotaLeaseRef) -> QuotaLease:
        if req.lease_id not in self.leases:
            raise BusError("lease_expired", "lease expired")
        self.renewed.append(req.lease_id)
        return QuotaLease(lease_id=req.lease_id, organization_id=req.organization_id, ttl_s=self.ttl_s,
                          limit=self.limit, in_use=len(self.leases))

    async def release(self, req: QuotaLeaseRef) -> QuotaReleased:
        self.released.append(req.lease_id)
        return QuotaReleased(released=self.leases.pop(req.lease_id, None) is not None)

    async def create_run(self, req: RunCreate) -> RunRecord:
        self.creates.append(req)
        now = datetime.now(UTC)
        run = RunRecord(id=next(self._ids), name=req.name, organization_id=req.organization_id,
                        agent_uuid=req.agent_uuid, call_id=req.call_id, call_type=req.call_type, mode=req.mode,
                        state="created", end_reason=None, telephony_configuration_id=None,
                        agent_version=req.agent_version, definition_source=req.definition_source,
                        initial_context=req.initial_context, gathered_context=req.gathered_context, logs=req.logs,
                        created_at=now, started_at=None, ended_at=None, updated_at=now,
                        quota_lease_id=req.quota_lease_id)
        self.runs[run.id] = run
        return run

    async def update_run(self, req: RunUpdate) -> RunRecord:
        self.updates.append(req)
        run = self.runs[req.run_id]
        data = run.model_dump()
        for key in ("initial_context", "gathered_context", "logs"):
            patch = getattr(req, key)
            if patch:
                data[key] = {**data[key], **patch}
        if req.state and run.state not in ("completed", "failed"):
            data["state"] = req.state
        if req.telephony_configuration_id is not None:
            data["telephony_configuration_id"] = req.telephony_configuration_id
        self.runs[run.id] = RunRecord.model_validate(data)
        return self.runs[run.id]

    @property
    def only_run(self) -> RunRecord:
        assert len(self.runs) == 1, self.runs
        return next(iter(self.runs.values()))

    def all_leases_released(self) -> bool:
        return bool(self.acquired) and not self.leases

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


# --------------------------------------------------------------------------------------------- call-control stand-in
class FakeCallControl:
    def __init__(self, nc: NATS, subjects: Subjects, changes: Changes) -> None:
        self.nc, self.subjects, self.changes = nc, subjects, changes
        self.valid_sessions = {SESSION}
        self.validations: list[LegRegister] = []
        self.hangups: list[HangupRequest] = []
        self.hangup_error: BusError | None = None
        self.verifies: list[VerifyRequest] = []
        self.verdicts: list[VerifyResult] = []  # answered in order; then valid
        self.verify_error: BusError | None = None
        self._intents: Subscription | None = None
        self._subs: list[Subscription] = []

    async def start(self) -> FakeCallControl:
        self._subs.append(await serve(self.nc, self.subjects.ctl(CTL_LEG_REGISTER), LegRegister,
                                      self.validate, queue=CALL_CONTROL_QUEUE))
        self._subs.append(await serve(self.nc, self.subjects.ctl(CTL_HANGUP), HangupRequest, self.hangup,
                                      queue=CALL_CONTROL_QUEUE))
        self._subs.append(await serve(self.nc, self.subjects.ctl(CTL_VERIFY), VerifyRequest, self.verify,
                                      queue=CALL_CONTROL_QUEUE))
        await self.consume()
        return self

    async def consume(self) -> None:
        """Take the durable hangup intents, as call-control's consumer does (they wait in the stream until)."""
        js = self.nc.jetstream()
        await ensure_intents_stream(js, self.subjects)
        self._intents = await js.subscribe(self.subjects.intent_all, durable=INTENTS_CONSUMER,
                                           stream=self.subjects.intents_stream, cb=self._on_intent, manual_ack=True)
        self._subs.append(self._intents)

    async def pause_intents(self) -> None:
        """call-control goes away: nobody takes intents (they wait in the stream) until ``consume()``."""
        sub, self._intents = self._intents, None
        if sub is not None:
            self._subs.remove(sub)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.nc.jetstream().delete_consumer(self.subjects.intents_stream, INTENTS_CONSUMER)

    async def _on_intent(self, msg: NatsMsg) -> None:
        self.hangups.append(HangupRequest.model_validate_json(msg.data))
        await self.changes.notify()
        await msg.ack()

    async def validate(self, req: LegRegister) -> LegRegistered:
        """Cloudonix legs are registered with confirm=True: the session validation."""
        self.validations.append(req)
        await self.changes.notify()
        ok = req.carrier_call_id in self.valid_sessions
        return LegRegistered(confirmed=ok, status=200 if ok else 404)

    async def verify(self, req: VerifyRequest) -> VerifyResult:
        self.verifies.append(req)
        await self.changes.notify()
        if self.verify_error is not None:
            raise self.verify_error
        return self.verdicts.pop(0) if self.verdicts else VerifyResult(valid=True)

    async def hangup(self, req: HangupRequest) -> HangupResult:
        self.hangups.append(req)
        await self.changes.notify()
        if self.hangup_error is not None:
            raise self.hangup_error
        return HangupResult(outcome="hung_up", status=204)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


# --------------------------------------------------------------------------------------------- runner stand-in
@dataclass
class RunnerCall:
    offer: CallOffer
    frames: list[tuple[bytes, int | None, int | None]] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    heartbeat: asyncio.Task[None] | None = None
    subs: list[Subscription] = field(default_factory=list)


class FakeRunner:
    """Accepts offers like the agent runner: subscribe to the call's input, heartbeat, then reply."""

    def __init__(self, nc: NATS, subjects: Subjects, changes: Changes, runner_id: str = "runner-1") -> None:
        self.nc, self.subjects, self.changes = nc, subjects, changes
        self.runner_id = runner_id
        self.calls: dict[str, RunnerCall] = {}
        self.offers_seen = 0
        self.beats = 0
        self.reject_first = 0
        self.never_reply = False  # accept (subscribe, heartbeat) but lose the reply, as a runner might
        self._stopped = asyncio.Event()
        self._sub: Subscription | None = None

    async def start(self) -> FakeRunner:
        self._sub = await serve(self.nc, self.subjects.dispatch_offer, CallOffer, self.on_offer, queue=RUNNER_QUEUE)
        return self

    async def on_offer(self, offer: CallOffer) -> OfferAccepted:
        self.offers_seen += 1
        await self.changes.notify()
        if self.offers_seen <= self.reject_first:
            raise BusError("at_capacity", "full")
        call = RunnerCall(offer)
        self.calls[offer.call_id] = call

        async def on_media(msg: NatsMsg) -> None:
            seq, ts = read_media_headers(msg.headers)
            call.frames.append((msg.data, seq, ts))
            await self.changes.notify()

        async def on_event(msg: NatsMsg) -> None:
            call.events.append(event_in_adapter.validate_json(msg.data))
            await self.changes.notify()

        call.subs.append(await self.nc.subscribe(self.subjects.media_in(offer.call_id), cb=on_media))
        call.subs.append(await self.nc.subscribe(self.subjects.event_in(offer.call_id), cb=on_event))
        call.heartbeat = asyncio.create_task(self._beat(offer.call_id))
        if self.never_reply:
            await self._stopped.wait()
        return OfferAccepted(call_id=offer.call_id, runner_id=self.runner_id)

    async def _beat(self, call_id: str) -> None:
        for seq in itertools.count():
            hb = Heartbeat(runner_id=self.runner_id, seq=seq)
            with contextlib.suppress(Exception):  # as the runner: a reconnecting client must not stop beating
                await self.nc.publish(self.subjects.heartbeat(call_id), hb.encode())
            self.beats += 1
            await self.changes.notify()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)  # the runner's heartbeat period

    def die(self, call_id: str) -> None:
        task = self.calls[call_id].heartbeat
        assert task is not None
        task.cancel()

    async def crash(self, call_id: str) -> None:
        """As a SIGKILL would: no more heartbeats, no more offers taken (the call's subjects stay, a
        runner that is only cut off may still publish)."""
        self.die(call_id)
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def say(self, call_id: str, pcm: bytes, *, signed: bool = False) -> None:
        """``signed``: name this runner in the frame's headers, as the real runner does."""
        headers = {RUNNER_HEADER: self.runner_id} if signed else None
        await self.nc.publish(self.subjects.media_out(call_id), pcm, headers=headers)

    async def send(self, call_id: str, event: Msg) -> None:
        await self.nc.publish(self.subjects.event_out(call_id), event.encode())

    @property
    def only_call(self) -> RunnerCall:
        assert len(self.calls) == 1, self.calls
        return next(iter(self.calls.values()))

    async def stop(self) -> None:
        self._stopped.set()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for call in self.calls.values():
            if call.heartbeat is not None:
                call.heartbeat.cancel()
            for sub in call.subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


# --------------------------------------------------------------------------------------------- lifecycle events
class EventLog:
    def __init__(self, changes: Changes) -> None:
        self.changes = changes
        self.items: list[tuple[str, dict[str, Any]]] = []

    async def on_msg(self, msg: NatsMsg) -> None:
        self.items.append((msg.subject.split(".evt.", 1)[1], json.loads(msg.data)))
        await self.changes.notify()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [body for n, body in self.items if n == name]

    def terminal(self) -> list[tuple[str, dict[str, Any]]]:
        return [(n, b) for n, b in self.items if n in ("call.ended", "call.failed")]


# --------------------------------------------------------------------------------------------- the harness
@dataclass
class Harness:
    nats_url: str
    nc: NATS
    subjects: Subjects
    changes: Changes
    config: FakeConfig
    callcontrol: FakeCallControl
    runner: FakeRunner
    events: EventLog
    ingress: IngressService | None = None

    def url(self, agent: str = AGENT_UUID, **params: str) -> str:
        assert self.ingress is not None
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"ws://127.0.0.1:{self.ingress.port}/api/v1/agent-stream/{agent}" + (f"?{query}" if query else "")

    def cloudonix_url(self, **extra: str) -> str:
        params = {"provider": "cloudonix", "Domain": "acme", "callId": "my-call-1", "from": "%2B15550001",
                  "to": "%2B15550002"}
        params.update(extra)
        return self.url(**{k: v for k, v in params.items() if v is not None})

    async def start_ingress(self, **overrides: Any) -> IngressService:
        settings = IngressSettings(nats_url=self.nats_url, subject_prefix=self.subjects.prefix,
                                   http_host="127.0.0.1", port=0, **overrides)
        self.ingress = await IngressService(settings).start()
        return self.ingress

    async def dial(self, url: str | None = None, handshake: bool = True,
                   start: str | None = None) -> ClientConnection:
        ws = await connect(url or self.cloudonix_url(), open_timeout=WAIT_S, close_timeout=2)
        if handshake:
            await ws.send(carrier_connected())
            await ws.send(start or start_message())
        return ws


def start_message(**overrides: Any) -> str:
    args: dict[str, Any] = dict(stream_sid="MZ-stream-1", call_sid="CA-call-1", session=SESSION,
                                account_sid="acme", context="inbound", from_number="+15550001", to_number="+15550002")
    args.update(overrides)
    return carrier_start(**args)


async def closed(ws: ClientConnection, timeout: float = WAIT_S) -> tuple[int | None, str, list[str | bytes]]:
    """Read until the server closes; returns (code, reason, frames received before the close)."""
    received: list[str | bytes] = []

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                received.append(await ws.recv())

    await asyncio.wait_for(drain(), timeout)
    rcvd = ws.close_code, ws.close_reason
    return rcvd[0], rcvd[1] or "", received


@pytest.fixture
async def harness(nats_url: str, subject_prefix: str) -> AsyncIterator[Harness]:
    nc = await nats.connect(nats_url, reconnect_time_wait=0.25)  # the services' own reconnect pace is 0.5 s
    subjects = Subjects(prefix=subject_prefix)
    changes = Changes()
    events = EventLog(changes)
    evt_sub = await nc.subscribe(subjects.evt_all, cb=events.on_msg)
    h = Harness(nats_url=nats_url, nc=nc, subjects=subjects, changes=changes,
                config=await FakeConfig(nc, subjects, changes).start(),
                callcontrol=await FakeCallControl(nc, subjects, changes).start(),
                runner=await FakeRunner(nc, subjects, changes).start(),
                events=events)
    try:
        yield h
    finally:
        if h.ingress is not None:
            await h.ingress.stop()
        await h.runner.stop()
        await h.callcontrol.stop()
        await h.config.stop()
        await evt_sub.unsubscribe()
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(subjects.events_stream)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_key_value(f"{subjects.prefix.replace('-', '_')}_ingress_pending")
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(subjects.intents_stream)
        await nc.close()
