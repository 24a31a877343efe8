"""The runner process: takes call offers while it has a free slot, runs each call, drains on shutdown.

Capacity gating is done with the subscription itself: the runner is in the ``agent-runners`` queue
group on ``dispatch.offer`` only while it has a free slot. When the last slot is taken the
subscription is *drained* (the server stops routing offers here; offers already delivered are
answered ``at_capacity`` so ingress retries elsewhere at once instead of timing out); when a call ends
it subscribes again. With no runner free anywhere the offer fails fast with "no responders".

Offers are handled one at a time (one subscription callback), so the capacity check and the slot
reservation cannot race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError

from voicebus.agent_runner.call import SOURCE, SUPERSEDED, CallSession, RunnerContext
from voicebus.agent_runner.claims import CallClaims
from voicebus.agent_runner.metrics import RunnerMetrics
from voicebus.agent_runner.models import SharedModels
from voicebus.agent_runner.settings import RunnerSettings
from voicebus.bus.events import checkpoint_store, claims_store, ensure_events_stream, publish_event
from voicebus.bus.messages import CallAnswered, CallCheckpoint, CallOffer, OfferAccepted
from voicebus.bus.rpc import BusError, serve
from voicebus.bus.subjects import EVT_CALL_ANSWERED, RUNNER_QUEUE, Subjects, check_token
from voicebus.kit import Health, connect_nats, health_router

log = logging.getLogger("voicebus.agent_runner")

# Calls still running when the drain deadline passes get this long to hang up before we exit anyway.
SHUTDOWN_GRACE_S = 20.0
# Silero VAD runs at 8 or 16 kHz only; telephony is 8 kHz (wideband carriers 16 kHz).
SUPPORTED_RATES = (8000, 16000)
ANSWERED_TIMEOUT_S = 1.5


class Runner:
    """One runner process. ``await start()``, then ``await stop()`` (drains) when done.

    ``models`` may be shared between runners in one process (tests); by default each runner has its own.
    """

    def __init__(self, settings: RunnerSettings | None = None, *, models: SharedModels | None = None,
                 nc: NATS | None = None) -> None:
        self.settings = settings or RunnerSettings()
        self.subjects = Subjects(prefix=self.settings.subject_prefix)
        self.runner_id = self.settings.resolved_runner_id()
        self.models = models or SharedModels()
        self.health = Health("agent-runner")
        self.health.info.update(capacity=self.settings.capacity, active_calls=0, runner_id=self.runner_id)
        self.sessions: dict[str, CallSession] = {}
        self.draining = False
        self.listening = asyncio.Event()  # set while subscribed to offers (tests and /readyz read it)
        self._busy: set[str] = set()  # calls whose pipeline still runs (what capacity counts)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._nc = nc
        self._own_nc = nc is None
        self._ctx: RunnerContext | None = None
        self._claims: CallClaims  # set by start(), before the first offer can arrive
        self._offer_sub: Subscription | None = None
        self._sync_lock = asyncio.Lock()
        self.started = False
        self.health.add("started", lambda: self.started)
        self.health.add("nats", lambda: self._nc is not None and self._nc.is_connected)
        self.health.add("accepting", lambda: not self.draining)
        self.metrics = RunnerMetrics(self)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.settings.warm_models:
            await asyncio.to_thread(self.models.warm)
        if self._nc is None:
            self._nc = await connect_nats(self.settings.nats_url, f"agent-runner {self.runner_id}")
        js = self._nc.jetstream()
        await ensure_events_stream(js, self.subjects)
        kv = await checkpoint_store(js, self.subjects)
        self._claims = CallClaims(await claims_store(js, self.subjects))
        self._ctx = RunnerContext(nc=self._nc, js=js, subjects=self.subjects, runner_id=self.runner_id,
                                  models=self.models, settings=self.settings, checkpoints=kv)
        await self._sync_subscription()
        self.started = True
        log.info("runner %s ready: capacity %d, prefix %s", self.runner_id, self.settings.capacity,
                 self.subjects.prefix)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking offers, let running calls finish (bounded), then end the rest and disconnect."""
        self.draining = True
        await self._sync_subscription()
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self.sessions:
            log.info("draining: waiting up to %.0fs for %d call(s)", timeout, len(self.sessions))
            try:
                await asyncio.wait_for(self._wait_idle(), timeout)
            except TimeoutError:
                remaining = list(self.sessions.values())
                # Handing over = going quiet: no close, no hangup, the checkpoint kept; ingress sees the
                # heartbeats stop and resumes each call on another runner (or ends it if none is free).
                how = SUPERSEDED if self.settings.handover_on_drain else "runner_shutdown"
                if remaining:
                    log.warning("drain deadline passed; %s %d call(s)",
                                "handing over" if how == SUPERSEDED else "ending", len(remaining))
                for session in remaining:
                    await session.abort(how)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_idle(), SHUTDOWN_GRACE_S)
        for task in list(self._tasks):
            task.cancel()
        if self._nc is not None and self._own_nc and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        log.info("runner %s stopped", self.runner_id)

    async def _wait_idle(self) -> None:
        while self.sessions:
            await asyncio.gather(*(s.done.wait() for s in list(self.sessions.values())))

    def app(self) -> FastAPI:
        app = FastAPI(title="voicebus agent-runner", docs_url=None, redoc_url=None)
        app.include_router(health_router(self.health))
        app.include_router(self.metrics.router())
        return app

    @property
    def free_slots(self) -> int:
        return self.settings.capacity - len(self._busy)

    # ------------------------------------------------------------------ offer subscription
    def _schedule_sync(self) -> None:
        # Never sync from inside the offer callback: draining waits for that very callback to return.
        self._spawn(self._sync_subscription())

    async def _sync_subscription(self) -> None:
        async with self._sync_lock:
            if self._nc is None or self._ctx is None:
                return  # not started (or start failed): there is no subscription to manage
            want = not self.draining and self.free_slots > 0 and not self._nc.is_closed
            if want and self._offer_sub is None:
                self._offer_sub = await serve(self._nc, self.subjects.dispatch_offer, CallOffer, self._on_offer,
                                              queue=RUNNER_QUEUE)
                await self._nc.flush()  # the server knows about us once this returns
                self.listening.set()
                log.debug("listening for offers (%d free)", self.free_slots)
            elif not want and self._offer_sub is not None:
                sub, self._offer_sub = self._offer_sub, None
                self.listening.clear()
                with contextlib.suppress(Exception):
                    await sub.drain()
                log.debug("stopped listening for offers (%s)", "draining" if self.draining else "full")

    # ------------------------------------------------------------------ offers
    async def _on_offer(self, offer: CallOffer) -> OfferAccepted:
        ctx = self._ctx
        assert ctx is not None
        try:
            check_token(offer.call_id, "call id")
        except ValueError as e:
            raise BusError("invalid_request", f"{e}: a call id must be one subject token") from e
        if offer.media.sample_rate not in SUPPORTED_RATES:
            raise BusError("invalid_request", f"media.sample_rate {offer.media.sample_rate} is not supported "
                                              f"(the runner takes {' or '.join(map(str, SUPPORTED_RATES))} Hz)")
        existing = self.sessions.get(offer.call_id)
        if existing is not None and existing.offer.attempt == offer.attempt and not existing.ending:
            return OfferAccepted(call_id=offer.call_id, runner_id=self.runner_id)  # a retried request
        if self.draining:
            raise BusError("at_capacity", f"runner {self.runner_id} is draining")
        if existing is not None:
            raise BusError("at_capacity", f"runner {self.runner_id} is still ending call {offer.call_id}")
        if self.free_slots <= 0:
            raise BusError("at_capacity", f"runner {self.runner_id} has no free slot")

        # Reserve the slot before the first await: nothing else may see it free.
        self._busy.add(offer.call_id)
        if self.free_slots <= 0:
            self._schedule_sync()
        holder = await self._claims.take(offer.call_id, offer.attempt, self.runner_id)
        if holder is not None:  # e.g. a retried offer whose first reply was lost went to another runner
            self._busy.discard(offer.call_id)
            self._schedule_sync()
            raise BusError("claimed", f"call {offer.call_id} (attempt {offer.attempt}) is held by {holder}")

        checkpoint = await self._load_checkpoint(offer) if offer.resume else None
        session = CallSession(ctx, offer, checkpoint, on_pipeline_done=self._on_pipeline_done)
        self.sessions[offer.call_id] = session
        self.health.info["active_calls"] = len(self.sessions)
        try:
            await session.prepare()
        except Exception as e:
            log.exception("call %s: could not accept the offer", offer.call_id)
            await session.discard()
            self._forget(session)
            raise BusError("internal", f"runner could not accept the call: {type(e).__name__}") from e

        await self._publish_answered(offer)
        task = self._spawn(session.run())
        task.add_done_callback(lambda _t: self._forget(session))
        self._spawn(self._stop_if_taken_over(session))
        self.metrics.call_accepted(offer.call_id, resume=offer.resume)
        log.info("call %s accepted (run %s, %s%s, %d/%d busy)", offer.call_id, offer.run_id,
                 offer.agent.definition.mode, ", resume" if offer.resume else "", len(self._busy),
                 self.settings.capacity)
        return OfferAccepted(call_id=offer.call_id, runner_id=self.runner_id)

    async def _stop_if_taken_over(self, session: CallSession) -> None:
        if await self._claims.taken_over(session.call_id, self.runner_id, session.done):
            await session.abort(SUPERSEDED)

    async def _publish_answered(self, offer: CallOffer) -> None:
        """Best effort: a JetStream hiccup should cost the run its "answered" mark, not the caller the call."""
        assert self._ctx is not None
        event = CallAnswered(call_id=offer.call_id, run_id=offer.run_id, organization_id=offer.organization_id,
                             source=SOURCE, runner_id=self.runner_id)
        try:
            await asyncio.wait_for(publish_event(self._ctx.js, self.subjects, EVT_CALL_ANSWERED, event),
                                   ANSWERED_TIMEOUT_S)
        except Exception as e:
            log.warning("call %s: could not publish call.answered (%s); the call goes on", offer.call_id,
                        type(e).__name__)

    async def _load_checkpoint(self, offer: CallOffer) -> CallCheckpoint | None:
        assert self._ctx is not None
        try:
            entry = await self._ctx.checkpoints.get(offer.call_id)
        except KeyNotFoundError:
            log.warning("call %s: resume requested but no checkpoint exists; starting over", offer.call_id)
            return None
        except Exception as e:
            log.warning("call %s: could not read the checkpoint (%s); starting over", offer.call_id, e)
            return None
        try:
            return CallCheckpoint.model_validate_json(entry.value or b"")
        except ValueError as e:
            log.warning("call %s: unreadable checkpoint (%s); starting over", offer.call_id, e)
            return None

    def _on_pipeline_done(self, session: CallSession) -> None:
        if session.call_id in self._busy:
            self._busy.discard(session.call_id)
            self._schedule_sync()

    def _forget(self, session: CallSession) -> None:
        self._busy.discard(session.call_id)
        self.metrics.call_ended(session)
        if self.sessions.get(session.call_id) is session:
            del self.sessions[session.call_id]
            self._spawn(self._claims.release(session.call_id, self.runner_id))
        self.health.info["active_calls"] = len(self.sessions)
        self._schedule_sync()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
