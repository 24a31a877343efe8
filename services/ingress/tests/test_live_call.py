"""A call that gets through: run fields, the offer, media both ways, events, and every way it can end."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import struct

import httpx
import pytest
from nats.aio.msg import Msg as NatsMsg

from voicebus.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voicebus.bus.messages import (
    CallerHangupEvent,
    ClearEvent,
    CloseEvent,
    DtmfEvent,
    MarkAckEvent,
    MarkEvent,
)
from voicebus.ingress.live_call import lease as lease_keepers
from voicebus.telephony.dialects.twilio_media_carrier import (
    ServerClear,
    ServerMark,
    ServerMedia,
    carrier_dtmf,
    carrier_mark,
    carrier_media,
    carrier_stop,
    parse_server_frame,
)

from .conftest import AGENT_UUID, CONFIG_ID, ORG_ID, SESSION, WAIT_S, FakeRunner, Harness, closed, start_message

STREAM = "MZ-stream-1"


def tone(n_samples: int, freq: float = 440.0, amplitude: int = 9000, phase: int = 0) -> bytes:
    return b"".join(struct.pack("<h", int(amplitude * math.sin(2 * math.pi * freq * (i + phase) / 8000)))
                    for i in range(n_samples))


async def answered(h: Harness, **dial: object):
    """Dial, complete the handshake, and wait until the runner stand-in holds the call."""
    ws = await h.dial(**dial)  # type: ignore[arg-type]
    await h.changes.wait(lambda: h.runner.calls)
    assert h.ingress is not None
    (live,) = h.ingress.calls
    await asyncio.wait_for(live.answered.wait(), WAIT_S)  # ingress got the acceptance: media now flows
    return ws, h.runner.only_call


async def recv_server(ws, timeout: float = WAIT_S):
    return parse_server_frame(await asyncio.wait_for(ws.recv(), timeout))


# ------------------------------------------------------------------------------------------------ run fields
async def test_run_created_and_marked_running_with_every_field(harness: Harness):
    await harness.start_ingress()
    ws, call = await answered(harness)
    create = harness.config.creates[0]
    assert create.organization_id == ORG_ID
    assert create.agent_uuid == AGENT_UUID
    assert re.fullmatch(r"WR-AGS-\d{8}", create.name)
    assert create.call_type == "inbound"
    assert create.mode == "cloudonix"
    assert re.fullmatch(r"[0-9a-f]{32}", create.call_id or "")
    assert (create.agent_version, create.definition_source) == (3, "published")
    assert create.initial_context == {"caller_number": "+15550001", "called_number": "+15550002",
                                      "provider": "cloudonix", "direction": "inbound"}
    assert create.gathered_context == {"call_id": "my-call-1"}
    assert create.logs == {"inbound_webhook": {"Domain": "acme", "provider": "cloudonix", "callId": "my-call-1",
                                               "from": "+15550001", "to": "+15550002"}}
    assert create.quota_lease_id in harness.config.leases
    assert harness.config.acquired[0].holder == create.call_id

    update = harness.config.updates[0]
    assert update.state == "running"
    assert update.telephony_configuration_id == CONFIG_ID
    assert update.initial_context is None  # from/to were on the URL
    assert update.gathered_context == {"cloudonix_session": SESSION, "cloudonix_call_sid": "CA-call-1",
                                       "cloudonix_stream_sid": STREAM}
    webhook = update.logs["inbound_webhook"]  # type: ignore[index]
    assert webhook["Domain"] == "acme" and webhook["callId"] == "my-call-1"
    assert (webhook["session"], webhook["callSid"], webhook["streamSid"]) == (SESSION, "CA-call-1", STREAM)
    assert webhook["accountSid"] == "acme" and webhook["context"] == "inbound" and webhook["tracks"] == ["inbound"]
    assert webhook["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}

    run = harness.config.only_run
    assert run.state == "running" and run.telephony_configuration_id == CONFIG_ID
    assert run.gathered_context["call_id"] == "my-call-1"

    started = await harness.changes.wait(lambda: harness.events.named("call.started"))
    assert started[0]["run_id"] == run.id and started[0]["call_id"] == create.call_id
    assert started[0]["provider"] == "cloudonix" and started[0]["telephony_config_id"] == CONFIG_ID

    offer = call.offer
    assert (offer.call_id, offer.run_id, offer.organization_id) == (create.call_id, run.id, ORG_ID)
    assert offer.provider == "cloudonix"
    assert "carrier_call_ref" not in offer.model_dump()  # carrier refs do not ride the bus
    (leg,) = harness.callcontrol.validations  # the leg, recorded in call-control when the session was confirmed
    assert (leg.call_id, leg.telephony_config_id, leg.carrier_call_id, leg.confirm) == (
        create.call_id, CONFIG_ID, SESSION, True)
    assert offer.media.sample_rate == 8000 and offer.media.frame_bytes == 320
    assert (offer.caller_number, offer.called_number) == ("+15550001", "+15550002")
    assert offer.agent.agent_uuid == AGENT_UUID and offer.resume is False
    await ws.close()


async def test_numbers_and_call_id_fall_back_to_the_start_event(harness: Harness):
    await harness.start_ingress()
    ws, call = await answered(harness, url=harness.cloudonix_url(callId=None, **{"from": None, "to": None}),
                              start=start_message(from_number="+4930111", to_number="+4930222"))
    create = harness.config.creates[0]
    assert create.initial_context == {"provider": "cloudonix", "direction": "inbound"}
    assert create.gathered_context == {}
    assert create.logs == {"inbound_webhook": {"Domain": "acme", "provider": "cloudonix"}}
    run = harness.config.only_run
    assert run.initial_context["caller_number"] == "+4930111"
    assert run.initial_context["called_number"] == "+4930222"
    assert run.gathered_context["call_id"] == SESSION
    assert (call.offer.caller_number, call.offer.called_number) == ("+4930111", "+4930222")
    await ws.close()


async def test_callsid_is_accepted_as_the_call_id(harness: Harness):
    await harness.start_ingress()
    ws, _ = await answered(harness, url=harness.cloudonix_url(callId=None, CallSid="CS-9"))
    create = harness.config.creates[0]
    assert create.gathered_context == {"call_id": "CS-9"}
    assert create.logs["inbound_webhook"]["CallSid"] == "CS-9"
    await ws.close()


# ------------------------------------------------------------------------------------------------ media
async def test_caller_audio_becomes_exact_20ms_pcm_frames(harness: Harness):
    await harness.start_ingress()
    ws, call = await answered(harness)
    # odd chunk sizes, as carriers send them: 100 + 250 + 290 samples = 640 samples = four 20 ms frames
    ulaw = pcm16_to_ulaw(tone(640))
    for seq, (a, b) in enumerate(((0, 100), (100, 350), (350, 640))):
        await ws.send(carrier_media(STREAM, ulaw[a:b], seq=seq + 2, timestamp_ms=a // 8))
    await harness.changes.wait(lambda: len(call.frames) == 4)
    assert [len(f) for f, _, _ in call.frames] == [320] * 4
    assert [(seq, ts) for _, seq, ts in call.frames] == [(0, 0), (1, 20), (2, 40), (3, 60)]
    assert b"".join(f for f, _, _ in call.frames) == ulaw_to_pcm16(ulaw)
    # a malformed frame mid-call is ignored, not fatal
    await ws.send("this is not json")
    await ws.send(carrier_media(STREAM, ulaw[:160], seq=9, timestamp_ms=80))
    await harness.changes.wait(lambda: len(call.frames) == 5)
    assert call.frames[4][1:] == (4, 80)
    await ws.close()


async def test_agent_audio_is_sent_as_mulaw_at_once_and_in_order_with_marks(harness: Harness):
    await harness.start_ingress()
    ws, call = await answered(harness)
    frames = [tone(160, phase=160 * i) for i in range(3)]
    for f in frames:
        await harness.runner.say(call.offer.call_id, f)
    await harness.runner.send(call.offer.call_id, MarkEvent(name="greeting-done"))
    got = [await recv_server(ws) for _ in range(4)]
    assert [type(g) for g in got] == [ServerMedia, ServerMedia, ServerMedia, ServerMark]
    for g, f in zip(got[:3], frames, strict=True):
        assert isinstance(g, ServerMedia)
        assert g.ulaw == pcm16_to_ulaw(f)
    assert got[3] == ServerMark("greeting-done")

    await harness.runner.send(call.offer.call_id, ClearEvent())
    assert await recv_server(ws) == ServerClear()
    await ws.close()


async def test_frames_carry_the_stream_sid(harness: Harness):
    await harness.start_ingress()
    ws, call = await answered(harness)
    await harness.runner.say(call.offer.call_id, tone(160))
    await harness.runner.send(call.offer.call_id, ClearEvent())
    await harness.runner.send(call.offer.call_id, MarkEvent(name="m"))
    msgs = [json.loads(await asyncio.wait_for(ws.recv(), WAIT_S)) for _ in range(3)]
    assert [m["event"] for m in msgs] == ["media", "clear", "mark"]
    assert all(m["streamSid"] == STREAM for m in msgs)
    assert msgs[1] == {"event": "clear", "streamSid": STREAM}
    assert msgs[2] == {"event": "mark", "streamSid": STREAM, "mark": {"name": "m"}}
    await ws.close()


async def test_dtmf_and_mark_acks_reach_the_runner(harness: Harness):
    await harness.start_ingress()
    ws, call = await answered(harness)
    await ws.send(carrier_dtmf(STREAM, "5"))
    await ws.send(carrier_dtmf(STREAM, "bad"))  # ignored
    await ws.send(carrier_dtmf(STREAM, "#"))
    await ws.send(carrier_mark(STREAM, "greeting-done"))
    await harness.changes.wait(lambda: len(call.events) == 3)
    assert call.events == [DtmfEvent(digit="5"), DtmfEvent(digit="#"), MarkAckEvent(name="greeting-done")]
    await ws.close()


# ------------------------------------------------------------------------------------------------ endings
async def test_caller_stop_ends_the_call_completed(harness: Harness):
    await harness.start_ingress()
    ws, call = await answered(harness)
    await ws.send(carrier_stop(STREAM, "CA-call-1", "acme"))
    code, reason, _ = await closed(ws)
    assert (code, reason) == (1000, "Caller hung up")
    await harness.changes.wait(lambda: call.events)
    assert call.events == [CallerHangupEvent(reason="caller_hangup")]
    name, body = (await harness.changes.wait(lambda: harness.events.terminal()))[0]
    assert (name, body["state"], body["reason"]) == ("call.ended", "completed", "caller_hangup")
    assert body["run_id"] == harness.config.only_run.id
    await harness.changes.wait(harness.config.all_leases_released)
    assert harness.callcontrol.hangups == []  # the leg is gone already: no hangup request


async def test_socket_closed_by_carrier_is_a_caller_hangup(harness: Harness):
    await harness.start_ingress()
    ws, call = await answered(harness)
    await ws.close()
    await harness.changes.wait(lambda: call.events)
    assert call.events == [CallerHangupEvent(reason="caller_hangup")]
    name, body = (await harness.changes.wait(lambda: harness.events.terminal()))[0]
    assert (name, body["reason"]) == ("call.ended", "caller_hangup")
    await harness.changes.wait(harness.config.all_leases_released)


async def test_agent_close_closes_the_socket_and_leaves_the_terminal_event_to_others(harness: Harness):
    await harness.start_ingress()
    ws, call = await answered(harness)
    await harness.runner.say(call.offer.call_id, tone(160))
    await harness.runner.send(call.offer.call_id, CloseEvent(reason="agent_hangup"))
    code, reason, received = await closed(ws)
    assert (code, reason) == (1000, "Agent ended the call")
    assert [type(parse_server_frame(f)) for f in received] == [ServerMedia]  # audio before the close is delivered
    assert harness.ingress is not None
    await asyncio.wait_for(harness.ingress._idle.wait(), 10)  # the call has fully concluded in ingress
    # The terminal event is call-control's, published after the carrier hangup: ingress must not free the
    # slot before it (config's reaper would call the run abandoned); config releases it on that event.
    assert harness.config.released == []
    assert harness.events.terminal() == []
    assert not any(isinstance(e, CallerHangupEvent) for e in call.events)
    assert harness.callcontrol.hangups == []


async def test_lease_is_kept_after_the_agent_hangs_up_until_the_run_has_ended(harness: Harness):
    """call-control may be restarting (the hangup waits as an intent): the slot must not lapse meanwhile."""
    harness.config.ttl_s = 0.3
    await harness.start_ingress()
    ws, call = await answered(harness)
    await harness.runner.send(call.offer.call_id, CloseEvent(reason="agent_hangup"))
    await closed(ws)
    lease = harness.config.creates[0].quota_lease_id
    renewed = harness.config.renewed.count(lease)
    await harness.changes.wait(lambda: harness.config.renewed.count(lease) >= renewed + 3)  # still kept
    (keeper,) = lease_keepers._handoffs
    run = harness.config.only_run
    harness.config.runs[run.id] = run.model_copy(update={"state": "completed"})  # config applied the end
    await asyncio.wait_for(keeper, WAIT_S)  # it sees the run ended and stops renewing
    assert harness.config.released == []  # still config's to release


async def test_runner_lost_asks_call_control_to_hang_up(harness: Harness):
    await harness.start_ingress(resume_attempts=1)  # no resume: the call ends
    ws, call = await answered(harness)
    loop = asyncio.get_running_loop()
    harness.runner.die(call.offer.call_id)
    died = loop.time()
    code, reason, _ = await closed(ws)
    detected = loop.time() - died
    assert (code, reason) == (1011, "Agent runner lost")
    assert 1.0 <= detected < 3.0  # 1.5 s of silence (minus up to one heartbeat interval), plus slack
    await harness.changes.wait(lambda: harness.callcontrol.hangups)  # asked right after the close
    assert len(harness.callcontrol.hangups) == 1
    hangup = harness.callcontrol.hangups[0]
    assert (hangup.call_id, hangup.run_id) == (call.offer.call_id, harness.config.only_run.id)
    assert (hangup.reason, hangup.end_state, hangup.organization_id) == ("runner_lost", "failed", ORG_ID)
    assert harness.events.terminal() == []  # call-control publishes it, after the carrier hangup
    # ... so the lease is left to config, which releases it when it applies that event: releasing it
    # here would let the reaper call the run abandoned first.
    assert harness.config.released == []


async def test_runner_lost_while_call_control_is_down_the_hangup_waits_as_an_intent(harness: Harness):
    """No call-control consumes intents now: ingress does not end the run itself (the carrier leg would
    stay up); the intent waits and is carried out as soon as call-control is back."""
    await harness.callcontrol.pause_intents()
    published: list[bytes] = []

    async def seen(msg: NatsMsg) -> None:
        published.append(msg.data)
        await harness.changes.notify()

    watch = await harness.nc.subscribe(harness.subjects.intent_all, cb=seen)
    await harness.start_ingress(heartbeat_timeout_s=0.6, resume_attempts=1)
    ws, call = await answered(harness)
    harness.runner.die(call.offer.call_id)
    assert (await closed(ws))[:2] == (1011, "Agent runner lost")
    await harness.changes.wait(lambda: published)  # the intent went out (to the stream)
    await watch.unsubscribe()
    assert harness.config.released == []  # the terminal event will be call-control's: config releases
    assert harness.events.terminal() == [] and harness.callcontrol.hangups == []
    await harness.callcontrol.consume()  # call-control is back
    (hangup,) = await harness.changes.wait(lambda: harness.callcontrol.hangups)
    assert (hangup.call_id, hangup.reason, hangup.end_state) == (call.offer.call_id, "runner_lost", "failed")


async def test_lost_runner_is_replaced_and_the_call_goes_on(harness: Harness):
    await harness.start_ingress(heartbeat_timeout_s=0.6)
    ws, call = await answered(harness)
    first = harness.runner
    await first.crash(call.offer.call_id)
    loop = asyncio.get_running_loop()
    died = loop.time()
    second = await FakeRunner(harness.nc, harness.subjects, harness.changes, runner_id="runner-2").start()
    try:
        await harness.changes.wait(lambda: second.calls)
        offer = second.only_call.offer
        assert (offer.call_id, offer.resume, offer.attempt) == (call.offer.call_id, True, 2)
        assert loop.time() - died < 2.0  # 0.6 s of silence to notice, then one offer round trip
        # Ingress took the new runner's acceptance once the attempt is on the run.
        await harness.changes.wait(lambda: any("runner_attempts" in (u.logs or {}) for u in harness.config.updates))
        # The socket stayed open: caller audio now reaches the new runner.
        await ws.send(carrier_media(STREAM, b"\xff" * 160, seq=9, timestamp_ms=180))
        await harness.changes.wait(lambda: second.only_call.frames)
        # The lost runner, cut off but alive, is muted; the new one is heard.
        await first.say(call.offer.call_id, tone(160), signed=True)
        await second.say(call.offer.call_id, tone(160), signed=True)
        frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert frame["event"] == "media"
        with pytest.raises(TimeoutError):  # only one media frame came out, the new runner's
            await asyncio.wait_for(ws.recv(), 0.5)
        attempts = [u.logs["runner_attempts"] for u in harness.config.updates if u.logs and "runner_attempts" in u.logs]
        first_held, resumed = attempts[-1]
        assert (first_held["attempt"], first_held["runner_id"]) == (1, "runner-1") and "lost_at" in first_held
        assert (resumed["attempt"], resumed["runner_id"]) == (2, "runner-2") and 500 <= resumed["gap_ms"] < 2000
        assert harness.callcontrol.hangups == [] and harness.events.terminal() == []
        await ws.close()
        await harness.changes.wait(lambda: harness.events.terminal())
        assert [(n, b["reason"]) for n, b in harness.events.terminal()] == [("call.ended", "caller_hangup")]
    finally:
        await second.stop()


async def test_no_runner_for_the_resume_ends_the_call(harness: Harness):
    await harness.start_ingress(heartbeat_timeout_s=0.6, offer_timeout_s=0.5)
    ws, call = await answered(harness)
    await harness.runner.crash(call.offer.call_id)
    assert (await closed(ws))[:2] == (1011, "Agent runner lost")
    await harness.changes.wait(lambda: harness.callcontrol.hangups)
    assert harness.callcontrol.hangups[0].reason == "runner_lost"


async def test_heartbeats_keep_the_call_alive(harness: Harness):
    await harness.start_ingress(heartbeat_timeout_s=0.6)
    ws, call = await answered(harness)
    # heartbeats every 0.5 s; wait until well over the 0.6 s timeout has passed in heartbeats
    beats = harness.runner.beats
    await harness.changes.wait(lambda: harness.runner.beats >= beats + 4)
    await ws.send(carrier_media(STREAM, b"\xff" * 160, seq=1, timestamp_ms=0))
    await harness.changes.wait(lambda: call.frames)
    assert harness.callcontrol.hangups == []
    assert harness.events.terminal() == []
    await ws.close()


async def test_quota_lease_is_renewed_while_the_call_lives(harness: Harness):
    harness.config.ttl_s = 0.3
    await harness.start_ingress()
    ws, _ = await answered(harness)
    lease = harness.config.creates[0].quota_lease_id
    await harness.changes.wait(lambda: harness.config.renewed.count(lease) >= 3)
    await ws.close()
    await harness.changes.wait(harness.config.all_leases_released)
    assert harness.config.released == [lease]


async def test_drain_lets_live_calls_finish(harness: Harness):
    svc = await harness.start_ingress()
    ws, call = await answered(harness)
    drain = asyncio.create_task(svc.drain(timeout_s=30))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.port}") as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["accepting_calls"] is False
    refused = await harness.dial(handshake=False)
    assert (await closed(refused))[:2] == (1012, "Service restarting")
    # the live call still flows both ways
    await ws.send(carrier_dtmf(STREAM, "1"))
    await harness.changes.wait(lambda: call.events)
    await harness.runner.say(call.offer.call_id, tone(160))
    assert isinstance(await recv_server(ws), ServerMedia)
    assert not drain.done()
    await ws.send(carrier_stop(STREAM))
    await asyncio.wait_for(drain, WAIT_S)
    assert svc.calls == set()


async def test_drain_deadline_ends_remaining_calls(harness: Harness):
    svc = await harness.start_ingress()
    ws, call = await answered(harness)
    await svc.drain(timeout_s=0.2)
    assert (await closed(ws))[:2] == (1012, "Service restarting")
    assert call.events == [CallerHangupEvent(reason="ingress_shutdown")]
    hangups = await harness.changes.wait(lambda: harness.callcontrol.hangups)  # the durable intent, taken
    assert [(h.reason, h.end_state) for h in hangups] == [("ingress_shutdown", "failed")]
    assert harness.config.released == []  # call-control ends the run; config releases the lease then


# ------------------------------------------------------------------------------------------------ health and logs
async def test_health_endpoints(harness: Harness):
    svc = await harness.start_ingress()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.port}") as http:
        alive = await http.get("/healthz")
        assert alive.status_code == 200 and alive.json()["service"] == "ingress"
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"nats": True, "accepting_calls": True}


async def test_raw_url_and_agent_uuid_never_reach_a_log_record(harness: Harness, caplog):
    caplog.set_level(logging.DEBUG)
    await harness.start_ingress()
    ws, call = await answered(harness)
    await ws.send(carrier_stop(STREAM))
    await closed(ws)
    await harness.changes.wait(harness.config.all_leases_released)
    refused = await harness.dial(harness.cloudonix_url(provider="nope"), handshake=False)
    await closed(refused)
    # the test's own client is the carrier: its logger is not ingress's to police
    records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert any(r.name.startswith("uvicorn") for r in records)
    text = "\n".join(f"{r.getMessage()} {r.msg} {r.args}" for r in records)
    assert call.offer.call_id in text  # the call is traceable by its own id ...
    assert AGENT_UUID not in text  # ... never by the credential in its URL
    assert "Domain=acme" not in text and "callId=" not in text and "provider=" not in text
    # uvicorn logs every accepted WebSocket with its path; the record reaches handlers already redacted
    accepted = [r.getMessage() for r in records if "[accepted]" in r.getMessage()]
    assert accepted and all("/api/v1/agent-stream/<redacted>" in m for m in accepted)
