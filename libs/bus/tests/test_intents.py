"""The durable intents helper on real NATS: stream, de-duplication, refusals, a NATS restart ridden out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig

from voicebus.bus import Subjects
from voicebus.bus.intents import (
    INTENTS_DUPLICATE_WINDOW_S,
    IntentNotStored,
    ensure_intents_stream,
    hangup_msg_id,
    publish_hangup_intent,
)
from voicebus.bus.messages import HangupRequest
from voicebus.cli.embedded import EmbeddedNats


def _req(call_id: str = "call0001", reason: str = "agent_hangup") -> HangupRequest:
    return HangupRequest(call_id=call_id, run_id=5, organization_id=3, reason=reason, end_state="completed")


@pytest.fixture
async def nc(nats_url: str, subject_prefix: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.jetstream().delete_stream(Subjects(subject_prefix).intents_stream)
        await conn.close()


def test_subjects_and_ids() -> None:
    s = Subjects("vb-x")
    assert (s.intent("hangup"), s.intent_all, s.intents_stream) == ("vb-x.intent.hangup", "vb-x.intent.>",
                                                                    "VB_X_INTENTS")
    assert hangup_msg_id("abc-1") == "abc-1.hangup"
    with pytest.raises(ValueError):
        hangup_msg_id("a.b")  # a call id never reaches a subject or message id unchecked
    with pytest.raises(ValueError):
        s.intent("hang*")


async def test_publish_creates_the_work_queue_and_deduplicates(nc: NATS, subject_prefix: str) -> None:
    subjects = Subjects(subject_prefix)
    js = nc.jetstream()
    seq = await publish_hangup_intent(js, subjects, _req())  # no stream yet: created by the publisher
    info = await js.stream_info(subjects.intents_stream)
    assert info.config.retention == RetentionPolicy.WORK_QUEUE
    assert info.config.subjects == [subjects.intent_all]
    assert info.config.duplicate_window == INTENTS_DUPLICATE_WINDOW_S
    assert info.state.messages == 1

    assert await publish_hangup_intent(js, subjects, _req(reason="ingress_lost")) == seq
    other = await publish_hangup_intent(js, subjects, _req("call0002"))
    assert other == seq + 1
    assert (await js.stream_info(subjects.intents_stream)).state.messages == 2

    msg = await js.get_msg(subjects.intents_stream, seq)
    assert msg.subject == subjects.intent("hangup")
    assert (msg.headers or {}).get("Nats-Msg-Id") == "call0001.hangup"
    stored = HangupRequest.model_validate_json(msg.data or b"")
    assert (stored.call_id, stored.reason, stored.end_state) == ("call0001", "agent_hangup", "completed")
    await ensure_intents_stream(js, subjects)  # idempotent
    assert (await js.stream_info(subjects.intents_stream)).state.messages == 2


async def test_a_stream_that_refuses_raises_after_the_attempts(nc: NATS, subject_prefix: str) -> None:
    subjects = Subjects(subject_prefix)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=subjects.intents_stream, subjects=[subjects.intent_all],
                                     max_msgs=1, discard=DiscardPolicy.NEW))
    await publish_hangup_intent(js, subjects, _req("full0001"))
    with pytest.raises(IntentNotStored) as e:
        await publish_hangup_intent(js, subjects, _req("full0002"), attempts=3, backoff_s=0.01)
    assert "full0002" in str(e.value) and "3 attempts" in str(e.value)


async def test_a_nats_restart_during_the_publish_is_ridden_out(tmp_path: Path) -> None:
    server = EmbeddedNats(store_dir=tmp_path / "js").start()
    subjects = Subjects("survive")
    conn = await nats.connect(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        js = conn.jetstream()
        await ensure_intents_stream(js, subjects)
        server.stop()
        publishing = asyncio.create_task(publish_hangup_intent(js, subjects, _req("restart1"), timeout_s=1.0))
        await asyncio.sleep(0.5)  # the outage being simulated, not a synchronization
        assert not publishing.done()
        server = EmbeddedNats(port=server.port, store_dir=tmp_path / "js").start()
        seq = await asyncio.wait_for(publishing, 15)
        assert seq == 1
        assert (await js.stream_info(subjects.intents_stream)).state.messages == 1
    finally:
        await conn.close()
        server.stop()
