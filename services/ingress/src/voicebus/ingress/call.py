"""One Agent Stream socket, from accept to close (the sequence is in docs/agent-stream.md).

Phases, and what each owns:

1. *Admission* (provider, agent, quota): nothing exists yet; a refusal is just a close frame.
2. *Run* (run.create onward): a run and a quota lease exist, so from here every exit publishes the
   run's terminal event (unless the runner or call-control owns it) and the lease is released in a
   ``finally``; the lease is renewed every ttl/3 while the socket lives.
3. *Handshake* (provider module), then run -> running, then the offer to the runner pool.
4. *Media*: carrier frames -> PCM16 20 ms frames on ``media.in``; ``media.out``/``event.out`` -> carrier
   frames. The first of {caller hangup, agent close, runner lost, shutdown, error} wins and decides how
   the call ends; everything else that happens afterwards is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from pydantic import ValidationError
from starlette.websockets import WebSocket

from voicebus.audio import FrameCutter
from voicebus.bus.media import media_headers
from voicebus.bus.messages import (
    CallEnded,
    CallerHangupEvent,
    CallOffer,
    CallStarted,
    ClearEvent,
    CloseEvent,
    DtmfEvent,
    HangupRequest,
    Heartbeat,
    MarkAckEvent,
    MarkEvent,
    MediaFormat,
    OfferAccepted,
    QuotaLease,
    ResolvedAgent,
    RunCreate,
    RunRecord,
    RunUpdate,
    event_out_adapter,
)
from voicebus.bus.rpc import BusError
from voicebus.ingress.bus import SOURCE
from voicebus.telephony import get_spec
from voicebus.telephony.agent_stream import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_RESTARTING,
    CLOSE_TRY_AGAIN,
    INTERNAL_ERROR_REASON,
    AgentStreamHandshake,
    AudioIn,
    CarrierDisconnected,
    DtmfIn,
    Frame,
    HandshakeError,
    Ignored,
    MarkIn,
    MediaCodec,
    StopIn,
    StreamStart,
    echo_safe,
    fit_close_reason,
    load_handshake,
)

if TYPE_CHECKING:
    from voicebus.ingress.service import IngressService

log = logging.getLogger("voicebus.ingress.call")
tracer = trace.get_tracer("voicebus.ingress")

MAX_PARAM_LEN = 256
RETRYABLE_OFFER_ERRORS = frozenset({"no_responders", "timeout", "at_capacity"})
OFFER_ATTEMPT_TIMEOUT_S = 2.0
NO_RUNNER_REASON = "No agent runner available"


class End(enum.Enum):
    CALLER_HANGUP = "caller_hangup"
    AGENT_CLOSE = "agent_close"
    RUNNER_LOST = "runner_lost"
    REFUSED = "refused"  # e.g. no runner accepted the offer
    SHUTDOWN = "ingress_shutdown"
    ERROR = "error"


@dataclass(frozen=True)
class Ending:
    kind: End
    code: int = CLOSE_NORMAL
    reason: str = ""


class AgentStreamCall:
    def __init__(self, service: IngressService, ws: WebSocket, agent_path: str) -> None:
        self.svc = service
        self.settings = service.settings
        self.bus = service.bus
        self.subjects = service.subjects
        self.nc = service.nc
        self.ws = ws
        self.agent_path = agent_path  # a credential: never logged
        self.params = ws.query_params
        self.call_id: str | None = None
        self.run: RunRecord | None = None
        self.agent: ResolvedAgent | None = None
        self.lease: QuotaLease | None = None
        self.start: StreamStart | None = None
        self.provider = ""
        self._loop = asyncio.get_running_loop()
        self._ending: asyncio.Future[Ending] = self._loop.create_future()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._concluded = False
        self._closed_by_us = False
        self._disconnected = False
        self._runner_ready = False
        self.answered = asyncio.Event()  # set once a runner holds the call (observable for tests and metrics)
        self._runner_id: str | None = None
        self._hb_runner_seen: str | None = None
        self._last_hb = 0.0
        self._hb_event = asyncio.Event()
        self._seq = 0
        self._problems = 0
        self._bad_out_frames = 0
        self._cutter: FrameCutter | None = None
        self._subs: list[Subscription] = []

    # ================================================================== entry
    async def handle(self) -> None:
        try:
            await self.ws.accept()
        except Exception:
            return  # the client left before we could accept; nothing was allocated
        with tracer.start_as_current_span("agent_stream.call") as span:
            try:
                await self._admit_and_run()
            except Exception:
                log.exception("call %s: unexpected failure", self.call_id)
                await self._close(CLOSE_INTERNAL, INTERNAL_ERROR_REASON)
            finally:
                span.set_attribute("voicebus.call_id", self.call_id or "")
                span.set_attribute("voicebus.run_id", self.run.id if self.run else 0)

    def shutdown(self) -> None:
        """Asked by the service when the drain deadline passes: end this call as soon as possible."""
        self._end(Ending(End.SHUTDOWN, CLOSE_RESTARTING, "Service restarting"))

    # ================================================================== phase 1: admission
    async def _admit_and_run(self) -> None:
        if self.svc.draining:
            await self._close(CLOSE_RESTARTING, "Service restarting")
            return
        try:
            handshake = self._provider()
            self.agent = await self._resolve_agent()
            self.call_id = uuid.uuid4().hex
            self.lease = await self.bus.acquire_quota(self.agent.organization_id, holder=self.call_id)
        except HandshakeError as e:
            log.info("agent stream refused before run creation: %s %s", e.code, e.reason)
            await self._close(e.code, e.reason)
            return

        renewer = asyncio.create_task(self._renew_lease(), name=f"renew-{self.call_id}")
        try:
            try:
                self.run = await self.bus.create_run(self._run_create())
            except HandshakeError as e:
                await self._close(e.code, e.reason)
                return
            log.info("call %s: run %s created (provider %s)", self.call_id, self.run.id, self.provider)
            try:
                await self._run_call(handshake)
            except Exception:
                log.exception("call %s run %s: unexpected failure", self.call_id, self.run.id)
                self._end(Ending(End.ERROR, CLOSE_INTERNAL, INTERNAL_ERROR_REASON))
                await self._conclude(self._ending.result())
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self._release_lease()

    async def _release_lease(self) -> None:
        """Release the slot, unless the terminal event is someone else's to publish.

        Config's reaper fails a running run whose lease is gone and trusts only events published before
        the lease went. When the agent hangs up, call-control publishes the terminal event after its
        carrier hangup, which can land after this socket is closed; releasing here would let the reaper
        call a completed call abandoned. So then the lease is left to config, which releases it when it
        applies that event (or lets it expire, and the run fail, if the event never comes).
        """
        assert self.lease is not None
        if self._ending.done() and self._ending.result().kind is End.AGENT_CLOSE:
            log.info("call %s: quota lease left to config (ended by the agent)", self.call_id)
            return
        released = await self.bus.release_quota(self.lease.organization_id, self.lease.lease_id)
        log.info("call %s: quota lease released=%s", self.call_id, released)

    def _provider(self) -> AgentStreamHandshake:
        raw = (self.params.get("provider") or "").strip()
        if not raw:
            raise HandshakeError(CLOSE_POLICY, "Missing provider query parameter")
        name = raw.lower()
        spec = get_spec(name)
        if spec is None:
            raise HandshakeError(CLOSE_POLICY, f"Unknown provider: {echo_safe(raw)}")
        handshake = load_handshake(spec)
        if handshake is None:
            if spec.supports_agent_stream:
                log.error("provider %s declares Agent Stream support but has no handshake module", spec.name)
            raise HandshakeError(CLOSE_INTERNAL, f"Agent Stream is not supported for provider {spec.name}")
        self.provider = spec.name
        return handshake

    async def _resolve_agent(self) -> ResolvedAgent:
        try:
            agent_uuid = str(uuid.UUID(self.agent_path))
        except ValueError as e:
            raise HandshakeError(CLOSE_POLICY, "Agent not found") from e
        return await self.bus.resolve_agent(agent_uuid)

    # ================================================================== phase 2: the run
    def _param(self, name: str) -> str | None:
        value = self.params.get(name)
        if value is None:
            return None
        value = value.strip()[:MAX_PARAM_LEN]
        return value or None

    def _carrier_call_id(self) -> str | None:
        return self._param("callId") or self._param("CallSid")

    def _inbound_webhook(self) -> dict[str, Any]:
        fields = {
            "Domain": self._param("Domain"),
            "provider": self.provider,
            "callId": self._param("callId"),
            "CallSid": self._param("CallSid"),
            "from": self._param("from"),
            "to": self._param("to"),
        }
        return {k: v for k, v in fields.items() if v is not None}

    def _run_create(self) -> RunCreate:
        assert self.agent is not None and self.lease is not None
        initial = {
            "caller_number": self._param("from"),
            "called_number": self._param("to"),
            "provider": self.provider,
            "direction": "inbound",
        }
        carrier_call_id = self._carrier_call_id()
        return RunCreate(
            organization_id=self.agent.organization_id,
            agent_uuid=self.agent.agent_uuid,
            name=f"WR-AGS-{secrets.randbelow(10**8):08d}",
            call_type="inbound",
            mode=self.provider,
            call_id=self.call_id,
            agent_version=self.agent.version,
            definition_source=self.agent.definition_source,
            initial_context={k: v for k, v in initial.items() if v is not None},
            gathered_context={"call_id": carrier_call_id} if carrier_call_id else {},
            logs={"inbound_webhook": self._inbound_webhook()},
            quota_lease_id=self.lease.lease_id,
        )

    async def _renew_lease(self) -> None:
        """Keep the slot while the socket lives; a crash stops renewal and config's reaper ends the run."""
        assert self.lease is not None
        lease = self.lease
        while True:
            await asyncio.sleep(max(lease.ttl_s / 3, 0.05))  # a timer, not a synchronization
            try:
                lease = await self.bus.renew_quota(lease.organization_id, lease.lease_id)
            except BusError as e:
                if e.code == "lease_expired" or e.code == "not_found":
                    log.error("call %s: quota lease %s expired; the call continues without its slot",
                              self.call_id, lease.lease_id)
                    return
                log.warning("call %s: quota lease renewal failed (%s); will retry", self.call_id, e)

    # ================================================================== phase 3: handshake, running, offer
    async def _run_call(self, handshake: AgentStreamHandshake) -> None:
        assert self.run is not None and self.agent is not None and self.call_id is not None
        try:
            self.start = await handshake.perform(
                self._receive,
                params=self.params,
                organization_id=self.agent.organization_id,
                services=self.bus,
                timeout_s=self.settings.handshake_timeout_s,
            )
            await self.bus.update_run(self._running_update(self.start))
        except HandshakeError as e:
            log.info("call %s run %s: handshake refused: %s %s", self.call_id, self.run.id, e.code, e.reason)
            await self._publish_end("failed", e.reason)
            await self._close(e.code, e.reason)
            return
        except CarrierDisconnected:
            log.info("call %s run %s: carrier disconnected during the handshake", self.call_id, self.run.id)
            await self._publish_end("failed", "Carrier disconnected during handshake")
            return

        start = self.start
        await self.bus.call_started(CallStarted(
            call_id=self.call_id, run_id=self.run.id, organization_id=self.run.organization_id, source=SOURCE,
            provider=self.provider, telephony_config_id=start.telephony_config_id,
        ))
        fmt = MediaFormat(sample_rate=start.codec.sample_rate)
        self._cutter = FrameCutter(fmt.frame_bytes)
        await self._subscribe()

        reader = asyncio.create_task(self._read_carrier(start.codec), name=f"reader-{self.call_id}")
        watcher: asyncio.Task[None] | None = None
        try:
            if not self._ending.done():
                offer = asyncio.create_task(self._offer(fmt), name=f"offer-{self.call_id}")
                await asyncio.wait({offer, self._ending}, return_when=asyncio.FIRST_COMPLETED)
                if self._ending.done():
                    offer.cancel()
                else:
                    try:
                        accepted = offer.result()
                    except HandshakeError as e:
                        self._end(Ending(End.REFUSED, e.code, e.reason))
                    else:
                        self._runner_accepted(accepted)
                        watcher = asyncio.create_task(self._watch_heartbeats(), name=f"hb-{self.call_id}")
            ending = await self._ending
        finally:
            for task in (reader, watcher):
                if task is not None:
                    task.cancel()
            for sub in self._subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        await self._conclude(ending)

    def _running_update(self, start: StreamStart) -> RunUpdate:
        assert self.run is not None
        gathered = dict(start.gathered_context)
        if not self._carrier_call_id() and start.carrier_call_ref:
            gathered["call_id"] = start.carrier_call_ref
        initial: dict[str, Any] = {}
        if self._param("from") is None and start.caller_number:
            initial["caller_number"] = start.caller_number
        if self._param("to") is None and start.called_number:
            initial["called_number"] = start.called_number
        return RunUpdate(
            run_id=self.run.id,
            state="running",
            telephony_configuration_id=start.telephony_config_id,
            initial_context=initial or None,
            gathered_context=gathered,
            logs={"inbound_webhook": {**self._inbound_webhook(), **start.log_fields}},
        )

    def _offer_message(self, fmt: MediaFormat) -> CallOffer:
        assert self.run is not None and self.agent is not None and self.start is not None and self.call_id
        return CallOffer(
            call_id=self.call_id,
            run_id=self.run.id,
            organization_id=self.run.organization_id,
            provider=self.provider,
            telephony_config_id=self.start.telephony_config_id,
            carrier_call_ref=self.start.carrier_call_ref,
            agent=self.agent,
            media=fmt,
            caller_number=self._param("from") or self.start.caller_number,
            called_number=self._param("to") or self.start.called_number,
        )

    async def _offer(self, fmt: MediaFormat) -> OfferAccepted:
        """Offer until a runner accepts or the deadline passes (-> 1013).

        Full runners do not subscribe, so "no responders" usually means "all busy right now": retry with
        a short backoff. A timeout is ambiguous (the runner may have accepted and its reply got lost),
        so a heartbeat already seen for this call counts as acceptance rather than offering twice.
        """
        msg = self._offer_message(fmt)
        deadline = self._loop.time() + self.settings.offer_timeout_s
        backoff = 0.05
        while True:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                return await self.bus.offer(msg, timeout=min(remaining, OFFER_ATTEMPT_TIMEOUT_S))
            except BusError as e:
                if e.code == "timeout" and self._hb_runner_seen:
                    return OfferAccepted(call_id=msg.call_id, runner_id=self._hb_runner_seen)
                if e.code not in RETRYABLE_OFFER_ERRORS:
                    log.error("call %s: offer failed: %s", self.call_id, e)
                    raise HandshakeError(CLOSE_INTERNAL, INTERNAL_ERROR_REASON) from e
                log.debug("call %s: offer not taken (%s); retrying", self.call_id, e.code)
            await asyncio.sleep(max(0.0, min(backoff, deadline - self._loop.time())))  # retry backoff
            backoff = min(backoff * 2, 0.5)
        log.warning("call %s: no agent runner accepted within %.1fs", self.call_id, self.settings.offer_timeout_s)
        raise HandshakeError(CLOSE_TRY_AGAIN, NO_RUNNER_REASON)

    def _runner_accepted(self, accepted: OfferAccepted) -> None:
        self._runner_id = accepted.runner_id
        self._last_hb = self._loop.time()  # runner liveness is counted from the acceptance
        self._runner_ready = True
        self.answered.set()
        log.info("call %s run %s: runner %s accepted", self.call_id, self.run.id if self.run else None,
                 accepted.runner_id)

    # ================================================================== phase 4: media
    async def _subscribe(self) -> None:
        """Subscribe before offering, so the greeting a runner sends right after accepting is not lost.

        media.out and event.out share ONE subscription: NATS orders messages within a subscription, so
        a mark (or close) published after audio reaches the carrier after that audio.
        """
        assert self.call_id is not None
        media_out = self.subjects.media_out(self.call_id)
        event_out = self.subjects.event_out(self.call_id)
        base = media_out.removesuffix("media.out")
        assert event_out.removesuffix("event.out") == base, "subject layout changed: fix the wildcard"
        self._media_out, self._event_out = media_out, event_out
        self._subs.append(await self.nc.subscribe(base + "*.out", cb=self._on_runner_output))
        self._subs.append(await self.nc.subscribe(self.subjects.heartbeat(self.call_id), cb=self._on_heartbeat))

    async def _receive(self) -> Frame:
        if self._disconnected:
            raise CarrierDisconnected(None)
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            self._disconnected = True
            raise CarrierDisconnected(message.get("code"))
        text = message.get("text")
        if text is not None:
            return str(text)
        data = message.get("bytes")
        return bytes(data) if data is not None else b""

    async def _read_carrier(self, codec: MediaCodec) -> None:
        assert self.call_id is not None and self._cutter is not None
        media_in = self.subjects.media_in(self.call_id)
        event_in = self.subjects.event_in(self.call_id)
        try:
            while True:
                msg = codec.decode(await self._receive())
                if isinstance(msg, AudioIn):
                    if not self._runner_ready:
                        continue  # nobody listens yet; stale audio would only confuse the runner's VAD
                    for frame in self._cutter.push(msg.pcm16):
                        await self.nc.publish(media_in, frame, headers=media_headers(self._seq, self._seq * 20))
                        self._seq += 1
                elif isinstance(msg, DtmfIn):
                    await self.nc.publish(event_in, DtmfEvent(digit=msg.digit).encode())
                elif isinstance(msg, MarkIn):
                    await self.nc.publish(event_in, MarkAckEvent(name=msg.name).encode())
                elif isinstance(msg, StopIn):
                    if not self._closed_by_us:
                        self._end(Ending(End.CALLER_HANGUP, CLOSE_NORMAL, "Caller hung up"))
                    return
                elif isinstance(msg, Ignored) and msg.problem:
                    self._problems += 1
                    if self._problems == 1 or self._problems % 100 == 0:
                        log.warning("call %s: ignored carrier frame (%s): %s [%d so far]",
                                    self.call_id, msg.what, msg.problem, self._problems)
        except CarrierDisconnected:
            if not self._closed_by_us:  # we closed it (runner lost, shutdown): that path decides the ending
                self._end(Ending(End.CALLER_HANGUP, CLOSE_NORMAL, "Caller hung up"))

    async def _on_runner_output(self, msg: NatsMsg) -> None:
        if self._ending.done() or self.start is None:
            return
        codec = self.start.codec
        if msg.subject == self._media_out:
            try:
                frame: Frame | None = codec.encode_audio(msg.data)
            except ValueError:
                self._bad_out_frames += 1
                if self._bad_out_frames == 1:
                    log.warning("call %s: dropped malformed media.out frame (%d bytes)", self.call_id, len(msg.data))
                return
            await self._send(frame)
            return
        try:
            event = event_out_adapter.validate_json(msg.data)
        except ValidationError as e:
            log.warning("call %s: ignored malformed event.out: %s", self.call_id, e.errors()[:1])
            return
        if isinstance(event, ClearEvent):
            await self._send(codec.encode_clear())
        elif isinstance(event, MarkEvent):
            await self._send(codec.encode_mark(event.name))
        elif isinstance(event, CloseEvent):
            log.info("call %s: runner closed the call (%s)", self.call_id, event.reason)
            self._end(Ending(End.AGENT_CLOSE, CLOSE_NORMAL, "Agent ended the call"))

    # ================================================================== runner liveness
    async def _on_heartbeat(self, msg: NatsMsg) -> None:
        try:
            hb = Heartbeat.model_validate_json(msg.data)
        except ValidationError:
            return
        if self._runner_id is None:
            self._hb_runner_seen = hb.runner_id
            return
        if hb.runner_id != self._runner_id:
            return  # a stale runner (e.g. after a re-offer) does not keep this call alive
        self._last_hb = self._loop.time()
        self._hb_event.set()

    async def _watch_heartbeats(self) -> None:
        timeout = self.settings.heartbeat_timeout_s
        while not self._ending.done():
            remaining = self._last_hb + timeout - self._loop.time()
            if remaining <= 0:
                ending = await self._on_runner_lost()
                if ending is not None:
                    self._end(ending)
                    return
                self._last_hb = self._loop.time()
                continue
            self._hb_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hb_event.wait(), remaining)

    async def _on_runner_lost(self) -> Ending | None:
        """The runner stopped heartbeating. Returns how the call ends, or None if it was recovered.

        Today the call is ended: the carrier is told why (1011) FIRST, because the hangup that follows
        makes the carrier tear the stream down and the reason would be lost; then call-control hangs up
        the carrier leg and records the run as failed. The resume issue replaces the body with a
        re-offer (``resume=True``, ``attempt + 1``) and returns None on success, so the media loop
        carries on with the new runner.
        """
        log.warning("call %s: no heartbeat from runner %s for %.1fs; runner lost",
                    self.call_id, self._runner_id, self.settings.heartbeat_timeout_s)
        self._runner_ready = False
        ending = Ending(End.RUNNER_LOST, CLOSE_INTERNAL, "Agent runner lost")
        await self._close(ending.code, ending.reason)
        await self._hangup_or_end(End.RUNNER_LOST.value)
        return ending

    async def _hangup_or_end(self, reason: str) -> None:
        """Ask call-control to hang up the carrier leg and fail the run; fall back to ending the run here."""
        assert self.run is not None and self.call_id is not None and self.start is not None
        if self.start.telephony_config_id is not None and self.start.carrier_call_ref:
            try:
                await self.bus.hangup(HangupRequest(
                    call_id=self.call_id, run_id=self.run.id, organization_id=self.run.organization_id,
                    telephony_config_id=self.start.telephony_config_id,
                    carrier_call_ref=self.start.carrier_call_ref, reason=reason, end_state="failed",
                ))
                return
            except BusError as e:
                log.warning("call %s: hangup via call-control failed (%s); ending the run here", self.call_id, e)
        await self._publish_end("failed", reason)

    # ================================================================== ending
    def _end(self, ending: Ending) -> None:
        if not self._ending.done():
            self._ending.set_result(ending)

    async def _conclude(self, ending: Ending) -> None:
        assert self.call_id is not None
        if self._concluded:
            return
        self._concluded = True
        if ending.kind in (End.CALLER_HANGUP, End.SHUTDOWN, End.ERROR, End.REFUSED):
            # tell a runner that may hold the call to stop, without asking for another hangup
            with contextlib.suppress(Exception):
                await self.nc.publish(self.subjects.event_in(self.call_id),
                                      CallerHangupEvent(reason=ending.kind.value).encode())
        if ending.kind is End.CALLER_HANGUP:
            log.info("call %s: caller hung up", self.call_id)
            await self._publish_end("completed", "caller_hangup")
        elif ending.kind is End.SHUTDOWN:
            if self.start is not None:
                await self._close(ending.code, ending.reason)  # before the hangup, as for a lost runner
                await self._hangup_or_end(End.SHUTDOWN.value)
            else:
                await self._publish_end("failed", End.SHUTDOWN.value)
        elif ending.kind in (End.REFUSED, End.ERROR):
            await self._publish_end("failed", ending.reason)
        # AGENT_CLOSE: the runner / call-control own the terminal event. RUNNER_LOST: handled already.
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        if not self._disconnected:
            await self._close(ending.code, ending.reason)

    async def _publish_end(self, state: str, reason: str) -> None:
        assert self.run is not None and self.call_id is not None
        await self.bus.call_ended(CallEnded(
            call_id=self.call_id, run_id=self.run.id, organization_id=self.run.organization_id, source=SOURCE,
            state=state,  # type: ignore[arg-type]
            reason=reason, quota_lease_id=self.lease.lease_id if self.lease else None,
        ))

    async def _send(self, frame: Frame | None) -> None:
        if frame is None:
            return
        async with self._send_lock:
            if self._closed:
                return
            try:
                if isinstance(frame, str):
                    await self.ws.send_text(frame)
                else:
                    await self.ws.send_bytes(frame)
            except Exception:
                self._closed = True  # the reader sees the disconnect and ends the call

    async def _close(self, code: int, reason: str) -> None:
        async with self._send_lock:
            if self._closed:
                return
            self._closed = True
            self._closed_by_us = True
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, reason=fit_close_reason(reason))
