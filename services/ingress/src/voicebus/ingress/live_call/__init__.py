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

from nats.aio.client import Client as NATS

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
)
from voicebus.bus.rpc import BusError
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
                              on_agent_close=self._agent_close, output_open=lambda: not self._ending.done())

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
            await self.lease.release(leave_to_config=ending is not None and ending.kind is End.AGENT_CLOSE)

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
                        log.info("call %s run %s: runner %s accepted", self.call_id, self.run.id, accepted.runner_id)
            ending = await self._ending
        finally:
            reader.cancel()
            await self.link.close()
            await self.pump.close()
        await self._conclude(ending)

    def _offer_message(self) -> CallOffer:
        return CallOffer(
            call_id=self.call_id,
            run_id=self.run.id,
            organization_id=self.run.organization_id,
            provider=self.setup.provider,
            agent=self.setup.agent,
            media=self.media_format,
            caller_number=self.setup.caller_number,
            called_number=self.setup.called_number,
        )

    async def _on_runner_lost(self) -> bool:
        """The runner stopped heartbeating. Returns True: the call ends.

        The carrier is told why (1011) FIRST, because the hangup that follows makes the carrier tear the
        stream down and the reason would be lost; then call-control hangs up the carrier leg and records
        the run as failed. The survival issue replaces this with a re-offer (``resume=True``).
        """
        ending = Ending(End.RUNNER_LOST, CLOSE_INTERNAL, "Agent runner lost")
        await self.socket.close(ending.code, ending.reason)
        await self._hangup_or_end(End.RUNNER_LOST.value)
        self.end(ending)
        return True

    async def _hangup_or_end(self, reason: str) -> None:
        """Ask call-control to hang up the carrier leg and fail the run; fall back to ending the run here."""
        try:
            await self.bus.hangup(HangupRequest(call_id=self.call_id, run_id=self.run.id,
                                                organization_id=self.run.organization_id, reason=reason,
                                                end_state="failed"))
            return
        except BusError as e:
            log.warning("call %s: hangup via call-control failed (%s); ending the run here", self.call_id, e)
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
