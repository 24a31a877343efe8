"""call-control's side of the durable intents (:mod:`voicebus.bus.intents`): carry each out, then ack.

Every replica pulls from one durable consumer, so an intent is worked on by one replica at a time
and redelivered (to any replica) if that one dies before acking. Each hangup intent goes through
:meth:`CallControlService.hangup`, the same claimed, idempotent path as ``ctl.hangup``, so an intent
and a request-reply hangup of the same call, or two intents, reach the carrier once.

Failures are sorted: a transient one (config or NATS away, a carrier 5xx or timeout, another
replica still holding the call's claim) is retried with exponential backoff through a delayed NAK,
so the retry survives this process too; a permanent one (the carrier refused our credentials, the
request names another organization's call, ...) or an intent older than ``give_up_after_s`` ends
the run anyway, with the reason it was asked with, logs the failure with the call id, and is acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from voicebus.bus.intents import INTENTS_CONSUMER, ensure_intents_stream
from voicebus.bus.messages import HangupRequest
from voicebus.bus.rpc import BusError
from voicebus.bus.subjects import INTENT_HANGUP
from voicebus.telephony.calls import CarrierError

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from voicebus.call_control.service import CallControlService

log = logging.getLogger("voicebus.call_control.intents")

# Codes that no retry can fix: the intent is given up at once.
PERMANENT_CODES = frozenset({"invalid_request", "not_found", "not_supported", "conflict", "carrier_auth_failed",
                             "carrier_invalid_number"})


def is_permanent(e: BusError) -> bool:
    """Whether retrying ``e`` is pointless. A carrier's 4xx (other than 408/429) is; its 5xx is not."""
    if e.code in PERMANENT_CODES:
        return True
    if e.code == "carrier_error":
        cause = e.__cause__
        status = cause.status if isinstance(cause, CarrierError) else None
        return status is not None and 400 <= status < 500 and status not in (408, 429)
    return False


class IntentWorker:
    def __init__(self, service: CallControlService, *, concurrency: int = 16, ack_wait_s: float = 30.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, give_up_after_s: float = 3600.0) -> None:
        self.service = service
        self.concurrency = concurrency
        self.ack_wait_s = ack_wait_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.give_up_after_s = give_up_after_s
        self._sub: JetStreamContext.PullSubscription | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = False

    async def start(self) -> None:
        svc = self.service
        js = svc.nc.jetstream()
        await ensure_intents_stream(js, svc.subjects)
        cfg = ConsumerConfig(durable_name=INTENTS_CONSUMER, ack_policy=AckPolicy.EXPLICIT,
                             deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait_s, max_deliver=-1,
                             max_ack_pending=max(64, self.concurrency * 4))
        self._sub = await js.pull_subscribe(svc.subjects.intent_all, durable=INTENTS_CONSUMER,
                                            stream=svc.subjects.intents_stream, config=cfg)
        self._loop_task = asyncio.create_task(self._loop(), name="call-control-intents")
        log.info("carrying out intents from %s", svc.subjects.intents_stream)

    async def stop(self, drain_timeout_s: float = 20.0) -> None:
        """Stop fetching, let intents in flight finish; an unfinished one is redelivered to a replica."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
            self._loop_task = None
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=drain_timeout_s)
            for task in pending:
                task.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _loop(self) -> None:
        assert self._sub is not None
        while not self._stopping:
            await self._slots.acquire()
            try:
                msgs = await self._sub.fetch(1, timeout=5.0)
            except (nats.errors.TimeoutError, TimeoutError):
                self._slots.release()
                continue
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as e:  # NATS reconnecting, consumer being recreated: try again shortly
                self._slots.release()
                log.warning("fetching intents failed: %s", e)
                await asyncio.sleep(1.0)  # retry pacing while NATS is away, not a synchronization
                continue
            if not msgs:
                self._slots.release()
                continue
            task = asyncio.create_task(self._handle(msgs[0]), name="intent")
            self._running.add(task)
            task.add_done_callback(self._done)
            for extra in msgs[1:]:  # fetch(1) returns one; anything more is redelivered after ack_wait
                with contextlib.suppress(Exception):
                    await extra.nak()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _handle(self, msg: NatsMsg) -> None:
        intent = msg.subject.rsplit(".", 1)[-1]
        if intent != INTENT_HANGUP:
            log.error("unknown intent %r on %s; dropped", intent, msg.subject)
            await msg.term()
            return
        try:
            req = HangupRequest.model_validate_json(msg.data)
        except ValidationError as e:
            log.error("malformed hangup intent dropped: %s", e.errors()[:3])
            await msg.term()
            return
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            await self._hangup(msg, req)
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    async def _hangup(self, msg: NatsMsg, req: HangupRequest) -> None:
        meta = msg.metadata
        delivered = meta.num_delivered or 1
        try:
            result = await self.service.hangup(req)
        except BusError as e:
            age_s = time.time() - meta.timestamp.timestamp() if meta.timestamp else 0.0
            if is_permanent(e) or age_s > self.give_up_after_s:
                why = "permanently" if is_permanent(e) else f"for {age_s:.0f}s"
                log.error("hangup intent for call %s (run %s) failed %s after %d attempt(s): %s; the run ends "
                          "without the carrier confirming the hangup", req.call_id, req.run_id, why, delivered, e)
                try:
                    await self.service.end_run_after_failed_hangup(req, e)
                except Exception as publish_error:
                    log.warning("call %s: could not end the run (%s); retrying the intent", req.call_id,
                                publish_error)
                    await msg.nak(delay=self._delay(delivered))
                    return
                await msg.ack()
                return
            delay = self._delay(delivered)
            log.warning("hangup intent for call %s: attempt %d failed (%s); retrying in %.1fs", req.call_id,
                        delivered, e, delay)
            await msg.nak(delay=delay)
            return
        except Exception:
            delay = self._delay(delivered)
            log.exception("hangup intent for call %s: attempt %d failed; retrying in %.1fs", req.call_id,
                          delivered, delay)
            await msg.nak(delay=delay)
            return
        await msg.ack()
        log.info("hangup intent for call %s carried out: %s%s", req.call_id, result.outcome,
                 " (done before)" if result.replayed else "")

    def _delay(self, delivered: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, delivered - 1))

    async def _keep_alive(self, msg: NatsMsg) -> None:
        """A hangup may take longer than ack_wait (carrier retries, a claim held elsewhere): say so."""
        while True:
            await asyncio.sleep(self.ack_wait_s / 3)  # a timer, not a synchronization
            with contextlib.suppress(Exception):
                await msg.in_progress()
