"""Durable lifecycle events on JetStream and the stores that ride JetStream too.

Events carry ``Nats-Msg-Id`` = ``event_id`` so a publisher that retries after a timeout never records
one event twice (JetStream de-duplicates within its window).
"""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from voicebus.bus.messages import CallEnded, LifecycleEvent
from voicebus.bus.rpc import trace_headers
from voicebus.bus.subjects import EVT_CALL_ENDED, EVT_CALL_FAILED, Subjects

log = logging.getLogger("voicebus.bus.events")

EVENTS_MAX_AGE_S = 7 * 24 * 3600
CHECKPOINT_TTL_S = 6 * 3600


async def ensure_events_stream(js: JetStreamContext, subjects: Subjects) -> None:
    """Create (or leave as is) the stream holding ``{prefix}.evt.>``. Safe to call from every service."""
    cfg = StreamConfig(
        name=subjects.events_stream,
        subjects=[subjects.evt_all],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=EVENTS_MAX_AGE_S,
        duplicate_window=120,
    )
    await add_stream_once(js, cfg)


async def add_stream_once(js: JetStreamContext, cfg: StreamConfig) -> None:
    """Create the stream, or leave an existing one as it is (an operator may have tuned it); safe to call
    from every service and replica at start-up."""
    try:
        await js.add_stream(cfg)
    except BadRequestError as e:  # exists with a different config: keep the operator's settings
        if e.err_code != 10058:
            raise
        log.debug("stream %s exists with other settings; kept", cfg.name)


async def publish_event(js: JetStreamContext, subjects: Subjects, name: str, event: LifecycleEvent) -> None:
    headers = trace_headers({"Nats-Msg-Id": event.event_id})
    await js.publish(subjects.evt(name), event.encode(), headers=headers)


async def publish_call_ended(js: JetStreamContext, subjects: Subjects, event: CallEnded) -> None:
    name = EVT_CALL_ENDED if event.state == "completed" else EVT_CALL_FAILED
    await publish_event(js, subjects, name, event)


async def checkpoint_store(js: JetStreamContext, subjects: Subjects) -> KeyValue:
    return await _kv(js, subjects.checkpoint_bucket, CHECKPOINT_TTL_S)


async def claims_store(js: JetStreamContext, subjects: Subjects) -> KeyValue:
    """Which runner holds each call (see ``voicebus.agent_runner.claims``); as long-lived as checkpoints."""
    return await _kv(js, subjects.claims_bucket, CHECKPOINT_TTL_S)


async def _kv(js: JetStreamContext, bucket: str, ttl_s: float) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except Exception:  # bucket missing: create it (idempotent across replicas)
        return await js.create_key_value(KeyValueConfig(bucket=bucket, ttl=ttl_s, history=1))


async def kv_bucket(nc: NATS, name: str, ttl_s: float) -> KeyValue:
    return await _kv(nc.jetstream(), name, ttl_s)
