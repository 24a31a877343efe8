"""Applies the durable lifecycle events (``{prefix}.evt.>``) to workflow runs.

A durable pull consumer survives restarts: events published while config was down are applied when
it comes back. Each event is applied in one transaction together with its ``processed_events`` row
and acked only after the commit, so a crash at any point leads to a redelivery that is recognized
as a duplicate, never to a lost or doubled update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from voicebus.bus import subjects as sj
from voicebus.bus.messages import (
    CallAnswered,
    CallEnded,
    CallHangup,
    CallStarted,
    CallStatusEvent,
    LifecycleEvent,
)
from voicebus.bus.subjects import Subjects
from voicebus.config.quota import Quota
from voicebus.config.store import Store

log = logging.getLogger("voicebus.config.events")

EVENT_MODELS: dict[str, type[LifecycleEvent]] = {
    sj.EVT_CALL_STARTED: CallStarted,
    sj.EVT_CALL_ANSWERED: CallAnswered,
    sj.EVT_CALL_ENDED: CallEnded,
    sj.EVT_CALL_FAILED: CallEnded,
    sj.EVT_CALL_HANGUP: CallHangup,
    sj.EVT_CALL_STATUS: CallStatusEvent,
}
ACK_WAIT_S = 30
RETRY_DELAY_S = 2.0
# A message that fails this often for a reason other than an unreachable database or Redis is a
# poison message (it would be retried forever): it is logged in full and dropped.
MAX_DELIVERIES_ON_BUG = 5


def is_transient(exc: BaseException) -> bool:
    """Unreachable dependencies: retry for as long as it takes; the event must not be lost."""
    if isinstance(exc, OperationalError | InterfaceError | RedisConnectionError | RedisTimeoutError | OSError |
                  TimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def durable_name(subjects: Subjects) -> str:
    return f"{subjects.prefix}-config-runs"


class EventConsumer:
    def __init__(self, js: JetStreamContext, subjects: Subjects, store: Store, quota: Quota,
                 batch: int = 64) -> None:
        self.js = js
        self.subjects = subjects
        self.store = store
        self.quota = quota
        self.batch = batch
        self._task: asyncio.Task[None] | None = None
        self._psub: JetStreamContext.PullSubscription | None = None
        self._evt_prefix = subjects.evt("")

    async def start(self) -> None:
        name = durable_name(self.subjects)
        self._psub = await self.js.pull_subscribe(
            self.subjects.evt_all, durable=name, stream=self.subjects.events_stream,
            config=ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
                                  deliver_policy=DeliverPolicy.ALL, max_deliver=-1, max_ack_pending=1000,
                                  filter_subject=self.subjects.evt_all),
        )
        self._task = asyncio.create_task(self._loop(), name="config-event-consumer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._psub is not None:
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
            self._psub = None

    async def _loop(self) -> None:
        assert self._psub is not None
        while True:
            try:
                msgs = await self._psub.fetch(self.batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # disconnected, consumer deleted, ...: retry after a pause
                log.warning("fetching lifecycle events failed (%s); retrying", e)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            for msg in msgs:
                await self.handle(msg)

    def parse(self, msg: NatsMsg) -> LifecycleEvent | None:
        name = msg.subject[len(self._evt_prefix):] if msg.subject.startswith(self._evt_prefix) else msg.subject
        model = EVENT_MODELS.get(name)
        if model is None:
            return None
        return model.model_validate_json(msg.data)

    async def handle(self, msg: NatsMsg) -> None:
        try:
            event = self.parse(msg)
        except ValidationError as e:
            log.warning("malformed lifecycle event on %s dropped: %s", msg.subject, e.errors()[:3])
            await msg.term()
            return
        if event is None:  # an event config does not track (transfer, ...): nothing to do
            await msg.ack()
            return
        try:
            outcome = await self.store.apply_event(event)
            for organization_id, lease_id in outcome.release:
                await self.quota.release(organization_id, lease_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            delivered = _num_delivered(msg)
            if not is_transient(e) and delivered >= MAX_DELIVERIES_ON_BUG:
                log.exception("dropping %s event %s (run %s) after %d failed deliveries: %s", msg.subject,
                              event.event_id, event.run_id, delivered, event.model_dump_json())
                with contextlib.suppress(Exception):
                    await msg.term()
                return
            log.warning("applying %s %s failed (%s: %s); will be redelivered", msg.subject, event.event_id,
                        type(e).__name__, e)
            with contextlib.suppress(Exception):
                await msg.nak(delay=RETRY_DELAY_S)
            return
        await msg.ack()


def _num_delivered(msg: NatsMsg) -> int:
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:  # not a JetStream message (tests feeding handle() directly)
        return 1
