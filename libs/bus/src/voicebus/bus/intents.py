"""Durable carrier intents: what a service asks call-control to do at a carrier, kept until it is done.

A request-reply hangup is lost when call-control is down (restarting, SIGKILLed, partitioned): the
caller times out, ends the run itself, and the carrier leg stays up (and keeps costing money). An
intent is instead published to a JetStream work-queue stream, ``{PREFIX}_INTENTS`` over
``{prefix}.intent.>``; call-control's durable consumer (:data:`INTENTS_CONSUMER`) carries each one
out with its idempotent, claimed hangup and acks it only once the carrier confirmed or the failure
is permanent. So an intent published while no call-control runs is carried out when one starts.

Every intent of a call carries ``Nats-Msg-Id`` = ``{call_id}.{intent}``: the runner, ingress and a
retry after a lost publish ack may all ask to hang the same call up, and JetStream keeps only the
first within :data:`INTENTS_DUPLICATE_WINDOW_S` (call-control's per-call claim covers later ones).
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from voicebus.bus.events import add_stream_once
from voicebus.bus.messages import HangupRequest
from voicebus.bus.rpc import trace_headers
from voicebus.bus.subjects import INTENT_HANGUP, Subjects, check_token

log = logging.getLogger("voicebus.bus.intents")

# call-control's durable pull consumer on the intents stream (every replica shares it).
INTENTS_CONSUMER = "call-control"
# An intent older than this is dropped by JetStream: no call, and no leg registration, lasts that long.
INTENTS_MAX_AGE_S = 24 * 3600
# Longer than any outage call-control is expected to ride out; duplicates later than this are
# answered from call-control's hangup claim instead.
INTENTS_DUPLICATE_WINDOW_S = 15 * 60

PUBLISH_ATTEMPTS = 4
PUBLISH_TIMEOUT_S = 2.0
PUBLISH_BACKOFF_S = 0.25


class IntentNotStored(Exception):
    """JetStream did not store the intent after every attempt (NATS away, the stream refusing it)."""


def intents_stream_config(subjects: Subjects) -> StreamConfig:
    return StreamConfig(
        name=subjects.intents_stream,
        subjects=[subjects.intent_all],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=INTENTS_MAX_AGE_S,
        duplicate_window=INTENTS_DUPLICATE_WINDOW_S,
    )


async def ensure_intents_stream(js: JetStreamContext, subjects: Subjects) -> None:
    """Create (or leave as is) the intents stream. Safe to call from every service and replica."""
    await add_stream_once(js, intents_stream_config(subjects))


def hangup_msg_id(call_id: str) -> str:
    return f"{check_token(call_id, 'call id')}.{INTENT_HANGUP}"


async def publish_hangup_intent(js: JetStreamContext, subjects: Subjects, req: HangupRequest, *,
                                attempts: int = PUBLISH_ATTEMPTS, timeout_s: float = PUBLISH_TIMEOUT_S,
                                backoff_s: float = PUBLISH_BACKOFF_S) -> int:
    """Store a hangup intent durably; returns its stream sequence (the first one's, for a duplicate).

    Retried ``attempts`` times with doubling backoff so a NATS reconnect of a few seconds is ridden
    out; retrying is safe because the message id de-duplicates. A missing stream (no call-control
    has ever started on this prefix) is created here, so the intent waits for the first one.
    Raises :class:`IntentNotStored` when JetStream never acknowledged it: then, and only then, the
    caller should end the run itself.
    """
    msg_id = hangup_msg_id(req.call_id)
    subject = subjects.intent(INTENT_HANGUP)
    payload = req.encode()
    last: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))  # backoff between attempts, not a synchronization
        try:
            ack = await js.publish(subject, payload, timeout=timeout_s, stream=subjects.intents_stream,
                                   headers=trace_headers({"Nats-Msg-Id": msg_id}))
        except nats.js.errors.NoStreamResponseError as e:
            last = e
            try:
                await ensure_intents_stream(js, subjects)
            except Exception as create_error:  # NATS away as well: the next attempt tells
                last = create_error
            continue
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
            last = e
            log.warning("hangup intent for call %s not stored yet (attempt %d/%d): %s", req.call_id,
                        attempt + 1, attempts, e)
            continue
        if ack.duplicate:
            log.info("hangup intent for call %s was already queued", req.call_id)
        return ack.seq
    raise IntentNotStored(f"hangup intent for call {req.call_id} not stored after {attempts} attempts: {last}")
