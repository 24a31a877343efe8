"""A live call: the phase after admission and the carrier's handshake, whatever the entry path was
(Agent Stream, or a per-call media socket that webhook markup pointed the carrier at).

Parts, one module each: ``socket`` (the carrier WebSocket), ``media_pump`` (audio and events both
ways), ``runner_link`` (offer, heartbeats), ``lease`` (the quota slot). This module owns the ending
policy: the first of {caller hangup, agent close, runner lost, shutdown, error, refusal} wins and
decides how the call ends; whatever happens afterwards is ignored. Every ending publishes the run's
terminal event (unless the runner or call-control owns it) and settles the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS

from voicebus.bus.intents import IntentNotStored
from voicebus.bus.messages import (
    CallEnded,
    CallerHangupEvent,
    CallOffer,
    CallStarted,
    CloseEvent,
    HangupRequest,
    MediaFormat,
    ResolvedAgent,
    RunRecord,
    RunUpdate,
)
from voicebus.bus.subjects import Subjects
from voicebus.ingress.bus import SOURCE, BusClient
from voicebus.ingress.close_codes import CLOSE_INTERNAL, CLOSE_NORMAL, CLOSE_RESTARTING, INTERNAL_ERROR_REASON, Refusal
from voicebus.ingress.live_call.lease import LeaseKeeper
from voicebus.ingress.live_call.media_pump import MediaPump
from voicebus.ingress.live_call.runner_link import RunnerLink
from voicebus.ingress.live_call.socket import CarrierSocket
from voicebus.ingress.settings import IngressSettings
from voicebus.telephony.stream import StreamStart

log = logging.getLogger("voicebus.ingress.call")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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


@dataclass
class CallSetup:
    """What admission and the handshake established for one call."""

    call_id: str
    run: RunRecord
    agent: ResolvedAgent
    provider: str
    start: StreamStart
    caller_number: str | None
    called_number: str | None


class LiveCall:
    def __init__(self, nc: NATS, bus: BusClient, subjects: Subjects, settings: IngressSettings,
                 socket: CarrierSocket, setup: CallSetup, lease: LeaseKeeper,
                 answered: asyncio.Event | None = None) -> None:
        self.nc = nc
        self.bus = bus
        self.subjects = subjects
        self.settings = settings
        self.socket = socket
        self.setup = setup
        self.call_id = setup.call_id
        self.run = setup.run
        self.lease = lease
        # set once a runner holds the call (observable for tests and metrics)
        self.answered = answered if answered is not None else asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ending: asyncio.Future[Ending] = self._loop.create_future()
        self._concluded = False
        fmt = MediaFormat(sample_rate=setup.start.codec.sample_rate)
        self.media_format = fmt
        self.link = RunnerLink(nc, bus, subjects, self.call_id, offer_timeout_s=settings.offer_timeout_s,
                               heartbeat_timeout_s=settings.heartbeat_timeout_s)
        self.pump = MediaPump(nc, subjects, self.call_id, socket, setup.start.codec, fmt.frame_bytes,
                              runner_ready=lambda: self.link.ready, on_caller_gone=self._caller_gone,
                              on_agent_close=self._agent_close, output_open=lambda: not self._ending.done(),
                              retired=lambda runner: runner in self.link.retired)
        self.attempt = 1
        self._hangup_queued = False  # a durable hangup intent owns the run's terminal event
        self.attempts: list[dict[str, Any]] = []  # each runner that held the call: the run's runner_attempts

    # ------------------------------------------------------------------ endings
    def end(self, ending: Ending) -> None:
        if not self._ending.done():
            self._ending.set_result(ending)

    def shutdown(self) -> None:
        """Asked by the service when the drain deadline passes: end this call as soon as possible."""
        self.end(Ending(End.SHUTDOWN, CLOSE_RESTARTING, "Service restarting"))

    def _caller_gone(self) -> None:
        self.end(Ending(End.CALLER_HANGUP, CLOSE_NORMAL, "Caller hung up"))

    def _agent_close(self, _event: CloseEvent) -> None:
        self.end(Ending(End.AGENT_CLOSE, CLOSE_NORMAL, "Agent ended the call"))

    # ------------------------------------------------------------------ the call
    async def run_call(self) -> None:
        """Offer the call, pump media until an ending wins, then conclude; settle the lease last."""
        try:
            try:
                await self._run()
            except Exception:
                log.exception("call %s run %s: unexpected failure", self.call_id, self.run.id)
                self.end(Ending(End.ERROR, CLOSE_INTERNAL, INTERNAL_ERROR_REASON))
                await self._conclude(self._ending.result())
        finally:
            ending = self._ending.result() if self._ending.done() else None
            # The terminal event is call-control's when the agent hung up or a hangup intent was queued: it
            # comes later, so the lease is left to config, which releases it when it applies that event.
            theirs = self._hangup_queued or (ending is not None and ending.kind is End.AGENT_CLOSE)
            await self.lease.release(leave_to_config=theirs, run_id=self.run.id)

    async def _run(self) -> None:
        start = self.setup.start
        await self.bus.call_started(CallStarted(
            call_id=self.call_id, run_id=self.run.id, organization_id=self.run.organization_id, source=SOURCE,
            provider=self.setup.provider, telephony_config_id=start.telephony_config_id,
        ))
        await self.pump.subscribe()
        await self.link.subscribe()
        reader = asyncio.create_task(self.pump.read_carrier(), name=f"reader-{self.call_id}")
        try:
            if not self._ending.done():
                offer = asyncio.create_task(self.link.offer(self._offer_message()), name=f"offer-{self.call_id}")
                await asyncio.wait({offer, self._ending}, return_when=asyncio.FIRST_COMPLETED)
                if self._ending.done():
                    offer.cancel()
                else:
                    try:
                        accepted = offer.result()
                    except Refusal as e:
                        self.end(Ending(End.REFUSED, e.code, e.reason))
                    else:
                        self.link.accepted(accepted, self._on_runner_lost)
                        self.answered.set()
                        self._held_by(accepted.runner_id)
                        log.info("call %s run %s: runner %s accepted", self.call_id, self.run.id, accepted.runner_id)
            ending = await self._ending
        finally:
            reader.cancel()
            await self.link.close()
            await self.pump.close()
        await self._conclude(ending)

    def _offer_message(self, resume: bool = False) -> CallOffer:
        return CallOffer(
            call_id=self.call_id,
            run_id=self.run.id,
            organization_id=self.run.organization_id,
            provider=self.setup.provider,
            agent=self.setup.agent,
            media=self.media_format,
            caller_number=self.setup.caller_number,
            called_number=self.setup.called_number,
            resume=resume,
            attempt=self.attempt,
        )

    def _held_by(self, runner_id: str, gap_ms: int | None = None) -> None:
        entry: dict[str, Any] = {"attempt": self.attempt, "runner_id": runner_id, "accepted_at": _now()}
        if gap_ms is not None:
            entry["gap_ms"] = gap_ms
        self.attempts.append(entry)

    async def _record_attempts(self) -> None:
        """Best effort: the run's record of who held the call; a config hiccup must not cost the call."""
        try:
            await self.bus.update_run(RunUpdate(run_id=self.run.id, logs={"runner_attempts": self.attempts}))
        except Refusal:
            log.warning("call %s: could not record runner attempts on run %s", self.call_id, self.run.id)

    async def _on_runner_lost(self) -> bool:
        """The runner stopped heartbeating: resume the call on another runner, or end it (returns True).

        The carrier socket stays open and the caller hears silence while the call is offered again with
        ``resume`` (the next runner loads the checkpoint: same flow node or LLM messages, no greeting), up
        to ``resume_attempts`` offers in all. A runner that was only cut off stops by itself once its
        claim is taken over, and whatever it still sends is dropped here.

        When no runner takes it, the carrier is told why (1011) FIRST, because the hangup that follows
        makes the carrier tear the stream down and the reason would be lost; then call-control hangs up
        the carrier leg and records the run as failed.
        """
        silent_since = self.link.last_heartbeat  # the caller's gap runs from the runner's last sign of life
        gone = self.link.lost()
        if self.attempts:
            self.attempts[-1]["lost_at"] = _now()
        while self.attempt < self.settings.resume_attempts and not self._ending.done():
            self.attempt += 1
            try:
                accepted = await self.link.offer(self._offer_message(resume=True))
            except Refusal as e:
                log.warning("call %s: resume attempt %d on another runner failed: %s", self.call_id, self.attempt,
                            e.reason)
                break
            if self._ending.done():
                return True  # the caller hung up while we looked for a runner
            gap_ms = int((self._loop.time() - silent_since) * 1000)
            self.link.replaced(accepted)
            self._held_by(accepted.runner_id, gap_ms)
            log.info("call %s run %s: resumed on runner %s (attempt %d) %d ms after runner %s was lost",
                     self.call_id, self.run.id, accepted.runner_id, self.attempt, gap_ms, gone)
            await self._record_attempts()
            return False
        await self._record_attempts()
        if self._ending.done():
            return True  # ended meanwhile (caller hangup, shutdown): that ending decides
        ending = Ending(End.RUNNER_LOST, CLOSE_INTERNAL, "Agent runner lost")
        await self.socket.close(ending.code, ending.reason)
        await self._hangup_or_end(End.RUNNER_LOST.value)
        self.end(ending)
        return True

    async def _hangup_or_end(self, reason: str) -> None:
        """Queue a durable hangup intent (call-control hangs the leg up and fails the run, even if it is
        restarting now); only if JetStream will not store it is the run ended here, without a hangup."""
        try:
            await self.bus.hangup_intent(HangupRequest(call_id=self.call_id, run_id=self.run.id,
                                                       organization_id=self.run.organization_id, reason=reason,
                                                       end_state="failed"))
            self._hangup_queued = True
            return
        except IntentNotStored as e:
            log.error("call %s: hangup intent not stored (%s); ending the run here", self.call_id, e)
        await self.publish_end("failed", reason)

    async def _conclude(self, ending: Ending) -> None:
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
            await self.publish_end("completed", "caller_hangup")
        elif ending.kind is End.SHUTDOWN:
            await self.socket.close(ending.code, ending.reason)  # before the hangup, as for a lost runner
            await self._hangup_or_end(End.SHUTDOWN.value)
        elif ending.kind in (End.REFUSED, End.ERROR):
            await self.publish_end("failed", ending.reason)
        # AGENT_CLOSE: the runner / call-control own the terminal event. RUNNER_LOST: handled already.
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        if not self.socket.disconnected:
            await self.socket.close(ending.code, ending.reason)

    async def publish_end(self, state: str, reason: str) -> None:
        await publish_end(self.bus, self.call_id, self.run, state, reason, self.lease.lease.lease_id)


async def publish_end(bus: BusClient, call_id: str, run: RunRecord, state: str, reason: str,
                      lease_id: str | None) -> None:
    """The run's terminal event from ingress (also used before a live call exists: refused handshakes)."""
    await bus.call_ended(CallEnded(
        call_id=call_id, run_id=run.id, organization_id=run.organization_id, source=SOURCE,
        state=state,  # type: ignore[arg-type]
        reason=reason, quota_lease_id=lease_id,
    ))
