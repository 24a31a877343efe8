"""The runner end to end on real NATS: the test plays ingress and call-control."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.errors import KeyNotFoundError

from voicebus.agent_runner.runner import Runner
from voicebus.bus.agent import AgentDefinition, FlowNode, ScriptedFlow
from voicebus.bus.events import checkpoint_store
from voicebus.bus.messages import CallAnswered, CallCheckpoint, CallEnded, HangupRequest, OfferAccepted
from voicebus.bus.rpc import BusError, request
from voicebus.bus.subjects import EVT_CALL_ANSWERED, EVT_CALL_ENDED, EVT_CALL_FAILED, Subjects

from .conftest import FRAME_BYTES, FakeCallControl, FakeIngress, IngressFactory, RunnerFactory, rms, wait_until

MENU = AgentDefinition(
    greeting="Hi.",
    barge_in=False,
    flow=ScriptedFlow(start="menu", nodes={
        "menu": FlowNode(say="Press one.", dtmf={"1": "one", "9": "bye"}, timeout_secs=60, invalid_say="No."),
        "one": FlowNode(say="You pressed one.", dtmf={"9": "bye"}, timeout_secs=60),
        "bye": FlowNode(say="Bye.", hangup=True),
    }),
)
# Greets, then waits in silence for a minute: the call only ends when the test ends it.
WAITER = AgentDefinition(greeting="Hello.", barge_in=False, flow=ScriptedFlow(
    start="wait", nodes={"wait": FlowNode(say="", timeout_secs=60)}))


async def collect_events(nc: NATS, subjects: Subjects) -> tuple[list[tuple[str, bytes]], asyncio.Event, object]:
    got: list[tuple[str, bytes]] = []
    changed = asyncio.Event()

    async def on_msg(msg: object) -> None:
        got.append((msg.subject, msg.data))  # type: ignore[attr-defined]
        changed.set()

    sub = await nc.subscribe(subjects.evt_all, cb=on_msg)
    await nc.flush()
    return got, changed, sub


async def test_greeting_is_speech_in_paced_20ms_frames_and_call_is_answered(
        make_runner: RunnerFactory, ingress: IngressFactory, call_control: FakeCallControl, nc: NATS,
        subjects: Subjects) -> None:
    runner = await make_runner()
    events, changed, _sub = await collect_events(nc, subjects)
    ing: FakeIngress = ingress()
    definition = AgentDefinition(greeting="Hello, and thanks for calling voicebus.", barge_in=False,
                                 flow=WAITER.flow)
    accepted = await ing.offer(definition)
    assert accepted == OfferAccepted(call_id=ing.call_id, runner_id=runner.runner_id)
    # Heartbeats and the answered event are out by the time the offer is answered.
    await wait_until(lambda: any(s.endswith(EVT_CALL_ANSWERED) for s, _ in events), 5, "call.answered", changed)
    answered = CallAnswered.model_validate_json(next(d for s, d in events if s.endswith(EVT_CALL_ANSWERED)))
    assert (answered.call_id, answered.run_id, answered.runner_id) == (ing.call_id, 42, runner.runner_id)

    await ing.wait_quiet(quiet_s=0.5)
    frames = ing.frames
    assert all(len(f.data) == FRAME_BYTES for f in frames)
    assert 60 < len(frames) < 250  # ~2 s of greeting
    assert max(rms(f.data) for f in frames) > 1000
    elapsed = frames[-1].at - frames[0].at
    assert abs(elapsed - (len(frames) - 1) * 0.02) < 0.25, "media.out is not paced in real time"
    assert ing.heartbeats and all(h.runner_id == runner.runner_id for h in ing.heartbeats)
    assert runner.health.info["active_calls"] == 1
    await ing.caller_hangup()


async def test_capacity_one_takes_no_second_offer(make_runner: RunnerFactory, ingress: IngressFactory,
                                                  call_control: FakeCallControl) -> None:
    runner: Runner = await make_runner(capacity=1)
    assert runner.listening.is_set()
    first: FakeIngress = ingress()
    await first.offer(WAITER)
    # Full: the runner leaves the queue group, so NATS has nobody to route an offer to.
    await wait_until(lambda: not runner.listening.is_set(), 5, "the runner to stop listening")
    second: FakeIngress = ingress()
    with pytest.raises(BusError) as err:
        await second.offer(WAITER, timeout=2)
    assert err.value.code in ("no_responders", "at_capacity")
    assert list(runner.sessions) == [first.call_id]
    assert not second.heartbeats

    # The handler re-checks capacity too (an offer that was already in flight when the last slot went).
    with pytest.raises(BusError) as err:
        await runner._on_offer(second.offer_for(WAITER))
    assert err.value.code == "at_capacity"

    # When the call ends, the slot comes back and so does the subscription.
    await first.caller_hangup()
    await wait_until(lambda: runner.listening.is_set(), 10, "the runner to listen again")
    third: FakeIngress = ingress()
    assert (await third.offer(WAITER)).call_id == third.call_id
    await third.caller_hangup()


async def test_dtmf_moves_the_flow_and_hangup_goes_to_call_control(
        make_runner: RunnerFactory, ingress: IngressFactory, call_control: FakeCallControl, nc: NATS,
        subjects: Subjects) -> None:
    runner = await make_runner()
    ing: FakeIngress = ingress()
    kv = await checkpoint_store(nc.jetstream(), subjects)
    await ing.offer(MENU)
    await ing.wait_quiet()  # "Hi. Press one." has been played

    async def node() -> str | None:
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(ing.call_id)
            return CallCheckpoint.model_validate_json(entry.value or b"").flow_node
        return None

    assert await node() == "menu"
    before = len(ing.frames)
    await ing.dtmf("1")
    await ing.wait_quiet(after=before)
    assert len(ing.frames) > before + 20  # "You pressed one." was spoken
    cp = CallCheckpoint.model_validate_json((await kv.get(ing.call_id)).value or b"")
    assert (cp.flow_node, cp.turn, cp.run_id, cp.runner_id) == ("one", 2, 42, runner.runner_id)
    assert max(h.turn for h in ing.heartbeats) == 2
    assert not call_control.requests  # nothing ends the call yet

    await ing.dtmf("9")
    req = await call_control.wait_hangup(ing.call_id)
    assert (req.reason, req.end_state, req.run_id, req.organization_id) == ("agent_hangup", "completed", 42, 7)
    close = ing.events_of("close")
    assert [(c.reason, c.state) for c in close] == [("agent_hangup", "completed")]
    # close went to ingress before call-control was asked, and after the goodbye had been played.
    close_at = next(t for t, e in ing.events if e.type == "close")
    assert ing.frames[-1].at <= close_at
    await wait_until(lambda: not runner.sessions, 5, "the session to end")
    with pytest.raises(KeyNotFoundError):
        await kv.get(ing.call_id)  # a finished call leaves no checkpoint behind


async def test_invalid_digit_is_answered_and_flow_stays(make_runner: RunnerFactory, ingress: IngressFactory,
                                                        call_control: FakeCallControl, nc: NATS,
                                                        subjects: Subjects) -> None:
    await make_runner()
    ing: FakeIngress = ingress()
    await ing.offer(MENU)
    await ing.wait_quiet()
    before = len(ing.frames)
    await ing.dtmf("5")
    await ing.wait_quiet(after=before)
    spoken = len(ing.frames) - before
    assert spoken > 40  # "No. Press one."
    entry = await (await checkpoint_store(nc.jetstream(), subjects)).get(ing.call_id)
    assert CallCheckpoint.model_validate_json(entry.value or b"").flow_node == "menu"
    await ing.caller_hangup()


async def test_caller_hangup_stops_the_pipeline_without_a_hangup_request(
        make_runner: RunnerFactory, ingress: IngressFactory, call_control: FakeCallControl) -> None:
    runner = await make_runner()
    ing: FakeIngress = ingress()
    await ing.offer(AgentDefinition(greeting="This greeting is long enough to still be playing when the "
                                             "caller hangs up on it.", barge_in=False, flow=WAITER.flow))
    await ing.wait_frames(5)
    await ing.caller_hangup()
    session = runner.sessions[ing.call_id]
    await asyncio.wait_for(session.done.wait(), 5)
    assert (session.end_reason, session.end_state) == ("caller_hangup", "completed")
    assert not ing.events_of("close")
    assert not call_control.requests
    count = len(ing.frames)
    assert count < 150  # the greeting was cut off, not played to the end
    hb = len(ing.heartbeats)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ing.wait_frames(count + 1), 0.6)
    assert len(ing.frames) == count, "audio kept flowing after the caller hung up"
    assert len(ing.heartbeats) <= hb + 1, "heartbeats kept flowing after the call ended"


async def test_lost_ingress_ends_call_as_failed(make_runner: RunnerFactory, ingress: IngressFactory,
                                                call_control: FakeCallControl) -> None:
    await make_runner(media_timeout_s=0.8)
    ing: FakeIngress = ingress()
    await ing.offer(WAITER, feed=False)  # media never arrives
    req = await call_control.wait_hangup(ing.call_id, timeout=5)
    assert (req.reason, req.end_state) == ("ingress_lost", "failed")
    assert [(c.reason, c.state) for c in ing.events_of("close")] == [("ingress_lost", "failed")]


async def test_hangup_waits_in_the_intent_queue_while_call_control_is_down(
        make_runner: RunnerFactory, ingress: IngressFactory, nc: NATS, subjects: Subjects) -> None:
    runner = await make_runner()
    events, _changed, _sub = await collect_events(nc, subjects)
    ing: FakeIngress = ingress()
    flow = ScriptedFlow(start="bye", nodes={"bye": FlowNode(say="Goodbye.", hangup=True)})
    await ing.offer(AgentDefinition(greeting="", flow=flow))  # no call-control runs in this test
    await wait_until(lambda: not runner.sessions, 10, "the session to end")
    assert len(ing.frames) > 10  # the goodbye was played before the close
    assert [(c.reason, c.state) for c in ing.events_of("close")] == [("agent_hangup", "completed")]
    # The intent is stored, not lost, and the runner did not end the run itself.
    js = nc.jetstream()
    stored = await js.get_last_msg(subjects.intents_stream, subjects.intent("hangup"))
    req = HangupRequest.model_validate_json(stored.data or b"")
    assert (req.call_id, req.reason, req.end_state, req.run_id) == (ing.call_id, "agent_hangup", "completed", 42)
    assert (stored.headers or {}).get("Nats-Msg-Id") == f"{ing.call_id}.hangup"
    assert not any(s.endswith((EVT_CALL_ENDED, EVT_CALL_FAILED)) for s, _ in events)
    # call-control comes back: it gets the intent.
    cc = await FakeCallControl(nc, subjects).start()
    try:
        assert (await cc.wait_hangup(ing.call_id, timeout=10)).reason == "agent_hangup"
    finally:
        await cc.stop()


async def test_runner_ends_the_run_itself_when_the_intent_cannot_be_queued(
        make_runner: RunnerFactory, ingress: IngressFactory, nc: NATS, subjects: Subjects) -> None:
    # A stream that refuses every new intent stands for JetStream being unable to store it.
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=subjects.intents_stream, subjects=[subjects.intent_all], max_msgs=1,
                                     discard=DiscardPolicy.NEW))
    await js.publish(subjects.intent("hangup"), b"{}")
    await make_runner()
    events, changed, _sub = await collect_events(nc, subjects)
    ing: FakeIngress = ingress()
    flow = ScriptedFlow(start="bye", nodes={"bye": FlowNode(say="Goodbye.", hangup=True)})
    await ing.offer(AgentDefinition(greeting="", flow=flow))
    await wait_until(lambda: any(s.endswith(EVT_CALL_ENDED) for s, _ in events), 15, "call.ended", changed)
    ended = CallEnded.model_validate_json(next(d for s, d in events if s.endswith(EVT_CALL_ENDED)))
    assert (ended.call_id, ended.state, ended.reason, ended.source) == (ing.call_id, "completed", "agent_hangup",
                                                                        "agent-runner")
    assert not any(s.endswith(EVT_CALL_FAILED) for s, _ in events)
    assert ing.events_of("close")


async def test_max_duration_ends_the_call(make_runner: RunnerFactory, ingress: IngressFactory,
                                          call_control: FakeCallControl) -> None:
    runner = await make_runner()
    ing: FakeIngress = ingress()
    # max_call_secs is >= 10 in the schema (and the bus validates offers), so hand the runner an
    # unvalidated copy directly rather than wait 10 s.
    offer = ing.offer_for(WAITER)
    offer.agent.definition = WAITER.model_copy(update={"max_call_secs": 1, "goodbye": "Time is up."})
    await ing.listen()
    await runner._on_offer(offer)
    ing.start_media()
    req = await call_control.wait_hangup(ing.call_id, timeout=10)
    assert (req.reason, req.end_state) == ("max_duration", "completed")
    # "Hello." then, a second into the call, "Time is up."
    assert ing.frames[-1].at - ing.frames[0].at > 0.9


async def test_barge_in_with_real_speech_publishes_clear(make_runner: RunnerFactory, ingress: IngressFactory,
                                                         call_control: FakeCallControl, speech_pcm: bytes) -> None:
    runner = await make_runner()
    ing: FakeIngress = ingress()
    definition = AgentDefinition(
        greeting="Hello and welcome to the voicebus test line. This greeting is deliberately long, so that "
                 "there is plenty of time for you to interrupt it while it is still playing.",
        barge_in=True, flow=WAITER.flow)
    await ing.offer(definition)
    await ing.wait_frames(25)  # the agent is half a second into its greeting
    ing.say(speech_pcm)
    clear = await ing.wait_event("clear", timeout=5)
    assert clear.type == "clear"
    clear_at = next(t for t, e in ing.events if e.type == "clear")
    spoken_before = len([f for f in ing.frames if f.at <= clear_at])
    assert spoken_before < 400  # far less than the full greeting (~8 s)
    late = [f for f in ing.frames if f.at > clear_at + 0.15]
    assert len(late) <= 2, "the greeting kept playing after the clear"
    session = runner.sessions[ing.call_id]
    assert session._brain is not None and session._brain.interruptions >= 1  # type: ignore[attr-defined]
    await ing.caller_hangup()


async def test_no_barge_in_when_disabled(make_runner: RunnerFactory, ingress: IngressFactory,
                                         call_control: FakeCallControl, speech_pcm: bytes) -> None:
    await make_runner()
    ing: FakeIngress = ingress()
    await ing.offer(AgentDefinition(greeting="Please hold the line for me.", barge_in=False, flow=WAITER.flow))
    await ing.wait_frames(5)
    ing.say(speech_pcm)
    await ing.wait_quiet(quiet_s=0.5)
    assert not ing.events_of("clear")
    assert len(ing.frames) > 60  # the whole message played
    await ing.caller_hangup()


async def test_resume_continues_at_checkpointed_node_without_greeting(
        make_runner: RunnerFactory, ingress: IngressFactory, call_control: FakeCallControl, nc: NATS,
        subjects: Subjects) -> None:
    await make_runner()
    ing: FakeIngress = ingress()
    kv = await checkpoint_store(nc.jetstream(), subjects)
    cp = CallCheckpoint(call_id=ing.call_id, run_id=42, runner_id="dead-runner", turn=4, flow_node="one")
    await kv.put(ing.call_id, cp.encode())
    definition = MENU.model_copy(update={"greeting": "This greeting must not be spoken again on a resumed call."})
    await ing.offer(definition, resume=True, attempt=2)
    await ing.wait_quiet()
    # Only "You pressed one." was said (about a second), not the long greeting.
    assert 20 < len(ing.frames) < 80
    await wait_until(lambda: any(h.turn == 5 for h in ing.heartbeats), 3, "a heartbeat at turn 5", ing.changed)
    entry = CallCheckpoint.model_validate_json((await kv.get(ing.call_id)).value or b"")
    assert (entry.flow_node, entry.turn) == ("one", 5)
    await ing.dtmf("9")
    assert (await call_control.wait_hangup(ing.call_id)).reason == "agent_hangup"


async def test_drain_refuses_new_offers_and_waits_for_calls(make_runner: RunnerFactory, ingress: IngressFactory,
                                                            call_control: FakeCallControl) -> None:
    runner = await make_runner()
    ing: FakeIngress = ingress()
    await ing.offer(MENU)
    await ing.wait_frames(1)
    stopping = asyncio.create_task(runner.stop(drain_timeout_s=20))
    await wait_until(lambda: not runner.listening.is_set(), 5, "the runner to stop listening")
    late: FakeIngress = ingress()
    with pytest.raises(BusError) as err:
        await late.offer(MENU, timeout=1.5)
    assert err.value.code in ("no_responders", "at_capacity")
    assert not stopping.done()  # still waiting for the running call
    await ing.dtmf("9")  # the call finishes normally...
    await asyncio.wait_for(stopping, 15)  # ...and only then does the runner stop
    assert (await call_control.wait_hangup(ing.call_id)).reason == "agent_hangup"


async def test_drain_deadline_hands_remaining_calls_over(make_runner: RunnerFactory, ingress: IngressFactory,
                                                         call_control: FakeCallControl, nc: NATS,
                                                         subjects: Subjects) -> None:
    """Past the deadline the runner goes quiet (no close, no hangup) and leaves the checkpoint, so ingress
    resumes the call on another runner when the heartbeats stop."""
    runner = await make_runner()
    ing: FakeIngress = ingress()
    await ing.offer(WAITER)
    await ing.wait_frames(1)
    await wait_until(lambda: bool(ing.heartbeats), 5, "a heartbeat")
    await asyncio.wait_for(runner.stop(drain_timeout_s=0.3), 15)
    assert runner.sessions == {}
    assert ing.events_of("close") == [] and call_control.for_call(ing.call_id) == []
    kv = await checkpoint_store(nc.jetstream(), subjects)
    cp = CallCheckpoint.model_validate_json((await kv.get(ing.call_id)).value or b"")
    assert cp.runner_id == runner.runner_id  # kept for the runner that resumes the call


async def test_drain_deadline_ends_remaining_calls_without_handover(
        make_runner: RunnerFactory, ingress: IngressFactory, call_control: FakeCallControl) -> None:
    runner = await make_runner(handover_on_drain=False)
    ing: FakeIngress = ingress()
    await ing.offer(WAITER)
    await ing.wait_frames(1)
    await asyncio.wait_for(runner.stop(drain_timeout_s=0.3), 15)
    req = await call_control.wait_hangup(ing.call_id, timeout=1)
    assert (req.reason, req.end_state) == ("runner_shutdown", "failed")


async def test_health_endpoints(make_runner: RunnerFactory, ingress: IngressFactory,
                                call_control: FakeCallControl) -> None:
    runner = await make_runner(capacity=3)
    transport = httpx.ASGITransport(app=runner.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:
        assert (await client.get("/healthz")).json()["status"] == "alive"
        ready = (await client.get("/readyz")).json()
        assert ready["ready"] is True
        assert (ready["capacity"], ready["active_calls"], ready["runner_id"]) == (3, 0, runner.runner_id)
        ing: FakeIngress = ingress()
        await ing.offer(WAITER)
        assert (await client.get("/readyz")).json()["active_calls"] == 1
        await ing.caller_hangup()


async def test_malformed_offer_gets_invalid_request(make_runner: RunnerFactory, nc: NATS, subjects: Subjects) -> None:
    await make_runner()
    msg = await nc.request(subjects.dispatch_offer, b'{"call_id": "x"}', timeout=3)
    body = json.loads(msg.data)
    assert body["ok"] is False and body["error"]["code"] == "invalid_request"
    with pytest.raises(BusError) as err:
        await request(nc, subjects.dispatch_offer, FakeIngress(nc, subjects, call_id="bad.id").offer_for(WAITER),
                      OfferAccepted, timeout=3)
    assert err.value.code == "invalid_request"
