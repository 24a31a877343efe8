"""The link between a live call and the runner that holds its agent: offer, acceptance, heartbeats.

The offer goes to the runner pool (only runners with a free slot subscribe); afterwards the runner's
heartbeats say it is alive. Silence for ``heartbeat_timeout_s`` means the runner is lost, and the live
call decides what that means (today: the call ends; the survival issue re-offers with ``resume``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from voicebus.bus.messages import CallOffer, Heartbeat, OfferAccepted
from voicebus.bus.rpc import BusError
from voicebus.bus.subjects import Subjects
from voicebus.ingress.bus import BusClient
from voicebus.ingress.close_codes import CLOSE_INTERNAL, CLOSE_TRY_AGAIN, INTERNAL_ERROR_REASON, Refusal

log = logging.getLogger("voicebus.ingress.runner_link")

RETRYABLE_OFFER_ERRORS = frozenset({"no_responders", "timeout", "at_capacity", "claimed"})
OFFER_ATTEMPT_TIMEOUT_S = 2.0
NO_RUNNER_REASON = "No agent runner available"


class RunnerLink:
    def __init__(self, nc: NATS, bus: BusClient, subjects: Subjects, call_id: str, *, offer_timeout_s: float,
                 heartbeat_timeout_s: float) -> None:
        self.nc = nc
        self.bus = bus
        self.subjects = subjects
        self.call_id = call_id
        self.offer_timeout_s = offer_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._loop = asyncio.get_running_loop()
        self.runner_id: str | None = None
        self._hb_runner_seen: str | None = None
        self._last_hb = 0.0
        self._hb_event = asyncio.Event()
        self._sub: Subscription | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.ready = False  # a runner holds the call and listens to media.in
        self.retired: set[str] = set()  # runners presumed dead: what they still send is dropped
        self._outage = False  # our NATS connection was down when the runner's heartbeats were due

    async def subscribe(self) -> None:
        self._sub = await self.nc.subscribe(self.subjects.heartbeat(self.call_id), cb=self._on_heartbeat)

    async def close(self) -> None:
        self.ready = False
        if self._watcher is not None:
            self._watcher.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def offer(self, msg: CallOffer) -> OfferAccepted:
        """Offer until a runner accepts or the deadline passes (-> 1013).

        Full runners do not subscribe, so "no responders" usually means "all busy right now": retry with
        a short backoff. A timeout is ambiguous (the runner may have accepted and its reply got lost),
        so a heartbeat already seen for this call counts as acceptance rather than offering twice.
        """
        deadline = self._loop.time() + self.offer_timeout_s
        backoff = 0.05
        while True:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                return await self.bus.offer(msg, timeout=min(remaining, OFFER_ATTEMPT_TIMEOUT_S))
            except BusError as e:
                # "claimed": another runner holds this attempt (our earlier request reached it and its reply
                # was lost); its heartbeats name it.
                if e.code in ("timeout", "claimed") and self._hb_runner_seen:
                    return OfferAccepted(call_id=msg.call_id, runner_id=self._hb_runner_seen)
                if e.code not in RETRYABLE_OFFER_ERRORS:
                    log.error("call %s: offer failed: %s", self.call_id, e)
                    raise Refusal(CLOSE_INTERNAL, INTERNAL_ERROR_REASON) from e
                log.debug("call %s: offer not taken (%s); retrying", self.call_id, e.code)
            await asyncio.sleep(max(0.0, min(backoff, deadline - self._loop.time())))  # retry backoff
            backoff = min(backoff * 2, 0.5)
        log.warning("call %s: no agent runner accepted within %.1fs", self.call_id, self.offer_timeout_s)
        raise Refusal(CLOSE_TRY_AGAIN, NO_RUNNER_REASON)

    def accepted(self, accepted: OfferAccepted, on_lost: Callable[[], Awaitable[bool]]) -> None:
        """Start watching heartbeats; ``on_lost`` returns True when the call ends (False: recovered)."""
        self.replaced(accepted)
        self._watcher = asyncio.create_task(self._watch(on_lost), name=f"hb-{self.call_id}")

    @property
    def last_heartbeat(self) -> float:
        """Loop time of the current runner's last heartbeat (or of its acceptance)."""
        return self._last_hb

    def lost(self) -> str | None:
        """The current runner is presumed dead: forget it (its heartbeats and output no longer count)."""
        gone, self.runner_id = self.runner_id, None
        self.ready = False
        self._hb_runner_seen = None
        if gone is not None:
            self.retired.add(gone)
        return gone

    def replaced(self, accepted: OfferAccepted) -> None:
        """A runner (the first, or a successor after a resume) holds the call from now on."""
        self.runner_id = accepted.runner_id
        self.retired.discard(accepted.runner_id)
        self._last_hb = self._loop.time()  # runner liveness is counted from the acceptance
        self.ready = True

    async def _on_heartbeat(self, msg: NatsMsg) -> None:
        try:
            hb = Heartbeat.model_validate_json(msg.data)
        except ValidationError:
            return
        if hb.runner_id in self.retired:
            return  # presumed dead; if it still beats, it stops once it sees its claim taken over
        if self.runner_id is None:
            self._hb_runner_seen = hb.runner_id
            return
        if hb.runner_id != self.runner_id:
            return  # a stale runner (e.g. after a re-offer) does not keep this call alive
        self._last_hb = self._loop.time()
        self._outage = False
        self._hb_event.set()

    async def _watch(self, on_lost: Callable[[], Awaitable[bool]]) -> None:
        timeout = self.heartbeat_timeout_s
        while True:
            remaining = self._last_hb + timeout - self._loop.time()
            if remaining <= 0 and not self.nc.is_connected:
                # We hear nobody while our own NATS connection is down (a NATS restart): that silence is
                # not the runner's. Start counting again, with one more timeout of grace for the runner's
                # own reconnect, once we are back.
                self._outage = True
                self._last_hb = self._loop.time()
                continue
            if remaining <= 0 and self._outage:
                self._outage = False
                self._last_hb = self._loop.time()
                log.info("call %s: NATS is back; waiting for runner %s's heartbeats", self.call_id, self.runner_id)
                continue
            if remaining <= 0:
                log.warning("call %s: no heartbeat from runner %s for %.1fs; runner lost",
                            self.call_id, self.runner_id, timeout)
                if await on_lost():
                    return
                self._last_hb = self._loop.time()
                continue
            self._hb_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hb_event.wait(), remaining)
