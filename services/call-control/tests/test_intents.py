"""Durable hangup intents and reconcile on start, on real NATS against the Cloudonix stand-in."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.msg import Msg as NatsMsg

from voicebus.bus.intents import INTENTS_CONSUMER, publish_hangup_intent
from voicebus.bus.messages import CallEnded, HangupRequest
from voicebus.bus.subjects import EVT_CALL_ENDED, EVT_CALL_FAILED
from voicebus.call_control.intents import is_permanent
from voicebus.call_control.service import RECONCILE_REASON

if TYPE_CHECKING:
    from conftest import Stack
else:
    Stack = Any

ORG = 7


async def until(probe: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll NATS state (stream, consumer, KV) that has no change notification of its own."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


class Ended:
    """Collects the run's terminal events as they are published (core NATS sees JetStream publishes)."""

    def __init__(self) -> None:
        self.events: list[CallEnded] = []
        self.changed = asyncio.Event()

    async def on_msg(self, msg: NatsMsg) -> None:
        self.events.append(CallEnded.model_validate_json(msg.data))
        self.changed.set()

    async def wait(self, call_id: str, timeout: float = 15.0) -> CallEnded:
        deadline = time.monotonic() + timeout
        while not (found := [e for e in self.events if e.call_id == call_id]):
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no terminal event for call {call_id}")
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                continue
        return found[0]


@pytest.fixture
async def ended(stack: Stack) -> Ended:
    collector = Ended()
    for name in (EVT_CALL_ENDED, EVT_CALL_FAILED):
        await stack.nc.subscribe(stack.subjects.evt(name), cb=collector.on_msg)
    await stack.nc.flush()
    return collector


def intent(call_id: str, run_id: int = 42, reason: str = "agent_hangup", end_state: str | None = "completed",
           org: int = ORG) -> HangupRequest:
    return HangupRequest(call_id=call_id, run_id=run_id, organization_id=org, reason=reason,
                         end_state=end_state)  # type: ignore[arg-type]


def statuses(stack: Stack, session: str, method: str = "DELETE") -> list[int]:
    return [r.status for r in stack.cloudonix.state.sessions[session].requests if r.method == method]


async def queue_drained(stack: Stack) -> bool:
    js = stack.nc.jetstream()
    info = await js.consumer_info(stack.subjects.intents_stream, INTENTS_CONSUMER)
    stream = await js.stream_info(stack.subjects.intents_stream)
    return info.num_pending == 0 and info.num_ack_pending == 0 and stream.state.messages == 0


async def test_intent_published_while_call_control_is_down_is_carried_out_when_it_starts(
        stack: Stack, ended: Ended) -> None:
    session = stack.session("v-down")
    await stack.register(session, "int00001")
    await stack.service.stop()  # call-control is down from here on

    js = stack.nc.jetstream()
    seq = await publish_hangup_intent(js, stack.subjects, intent("int00001"))
    assert seq >= 1
    stream = await js.stream_info(stack.subjects.intents_stream)
    assert stream.state.messages == 1  # kept while nobody can carry it out
    assert statuses(stack, session) == []

    await stack.make_service(instance_id="cc-back").start()
    event = await ended.wait("int00001")
    assert (event.state, event.reason, event.run_id, event.source) == ("completed", "agent_hangup", 42,
                                                                      "call-control")
    assert statuses(stack, session) == [204]  # the carrier saw exactly one hangup
    assert stack.cloudonix.state.sessions[session].state == "ended"
    assert (await stack.leg("int00001") or {})["state"] == "ended"
    await until(lambda: queue_drained(stack), 10, "the intent to be acked")
    assert [e.call_id for e in ended.events] == ["int00001"]


async def test_duplicate_intents_and_a_request_reach_the_carrier_once(stack: Stack, ended: Ended) -> None:
    session = stack.session("v-dup")
    await stack.register(session, "int00002")
    await stack.service.stop()
    js = stack.nc.jetstream()
    first = await publish_hangup_intent(js, stack.subjects, intent("int00002"))
    again = await publish_hangup_intent(js, stack.subjects, intent("int00002", reason="ingress_lost",
                                                                   end_state="failed"))
    assert again == first  # de-duplicated by Nats-Msg-Id: the first reason wins
    assert (await js.stream_info(stack.subjects.intents_stream)).state.messages == 1

    await stack.make_service(instance_id="cc-dup").start()
    event = await ended.wait("int00002")
    assert (event.state, event.reason) == ("completed", "agent_hangup")
    await until(lambda: queue_drained(stack), 10, "the intent to be acked")
    # After it was carried out (and removed from the work queue), a late duplicate is still dropped,
    # and a request-reply hangup of the same call answers from the first one.
    assert await publish_hangup_intent(js, stack.subjects, intent("int00002")) == first
    replay = await stack.hangup("int00002")
    assert (replay.outcome, replay.replayed) == ("hung_up", True)
    assert statuses(stack, session) == [204]
    assert [e.call_id for e in ended.events] == ["int00002"]


async def test_carrier_5xx_is_retried_until_it_succeeds(stack: Stack, ended: Ended) -> None:
    session = stack.session("v-5xx")
    await stack.register(session, "int00003")
    await stack.service.stop()
    # The Cloudonix client tries 3 times per hangup, so the first delivery fails and the second succeeds
    # on its second try.
    stack.cloudonix.state.fail_next = [503, 503, 503, 502]
    await stack.make_service(instance_id="cc-5xx", intent_backoff_s=0.05).start()
    await publish_hangup_intent(stack.nc.jetstream(), stack.subjects, intent("int00003"))
    event = await ended.wait("int00003", timeout=30)
    assert (event.state, event.reason) == ("completed", "agent_hangup")
    assert statuses(stack, session) == [503, 503, 503, 502, 204]
    assert stack.cloudonix.state.sessions[session].state == "ended"
    await until(lambda: queue_drained(stack), 10, "the intent to be acked")


async def test_permanent_carrier_refusal_ends_the_run_and_logs_the_call(
        stack: Stack, ended: Ended, caplog: pytest.LogCaptureFixture) -> None:
    session = stack.session("v-auth")
    await stack.register(session, "int00004")
    stack.config.configs[stack.CONFIG_ID].credentials["bearer_token"] = "revoked-token"
    with caplog.at_level(logging.ERROR, logger="voicebus.call_control.intents"):
        await publish_hangup_intent(stack.nc.jetstream(), stack.subjects,
                                    intent("int00004", reason="runner_lost", end_state="failed"))
        event = await ended.wait("int00004")
        await until(lambda: queue_drained(stack), 10, "the intent to be acked")
    assert (event.state, event.reason) == ("failed", "runner_lost")
    assert statuses(stack, session) == [401]  # not retried: no retry fixes a refused token
    assert stack.cloudonix.state.sessions[session].state == "active"
    lines = [r.getMessage() for r in caplog.records if "int00004" in r.getMessage()]
    assert lines and "carrier_auth_failed" in lines[0], caplog.text
    assert "revoked-token" not in caplog.text
    hangup_event = json.loads((await stack.nc.jetstream().get_last_msg(
        stack.subjects.events_stream, stack.subjects.evt("call.hangup"))).data)
    assert hangup_event["outcome"] == "failed: carrier_auth_failed"


async def test_malformed_intent_is_dropped_and_the_queue_moves_on(stack: Stack, ended: Ended) -> None:
    js = stack.nc.jetstream()
    await js.publish(stack.subjects.intent("hangup"), b'{"call_id": "x"}', headers={"Nats-Msg-Id": "bad.hangup"})
    session = stack.session("v-after")
    await stack.register(session, "int00005")
    await publish_hangup_intent(js, stack.subjects, intent("int00005"))
    await ended.wait("int00005")
    assert statuses(stack, session) == [204]
    await until(lambda: queue_drained(stack), 10, "both intents to leave the queue")


def test_permanent_and_transient_errors() -> None:
    from voicebus.bus.rpc import BusError
    from voicebus.telephony.calls import CarrierError

    def carrier(status: int | None) -> BusError:
        try:
            try:
                raise CarrierError("carrier_error", "x", status)
            except CarrierError as e:
                raise BusError("carrier_error", "x") from e
        except BusError as b:
            return b

    assert is_permanent(BusError("carrier_auth_failed", "x"))
    assert is_permanent(BusError("not_found", "x"))
    assert is_permanent(carrier(400)) and is_permanent(carrier(422))
    assert not is_permanent(carrier(503)) and not is_permanent(carrier(429)) and not is_permanent(carrier(None))
    assert not is_permanent(BusError("timeout", "x")) and not is_permanent(BusError("in_progress", "x"))


# ------------------------------------------------------------------------------------------ reconcile
async def test_reconcile_hangs_up_legs_whose_run_ended_and_only_those(stack: Stack) -> None:
    ended_session = stack.session("v-rec-ended")
    live_session = stack.session("v-rec-live")
    orphan_session = stack.session("v-rec-orphan")
    await stack.register(ended_session, "rec00001", run_id=101)
    await stack.register(live_session, "rec00002", run_id=102)
    await stack.register(orphan_session, "rec00003", run_id=103)  # config does not know run 103
    stack.config.runs.update({101: "failed", 102: "running"})
    await stack.service.stop()

    svc = stack.make_service(instance_id="cc-rec")
    await svc.start()
    assert svc.reconciled is not None
    counts = await asyncio.wait_for(svc.reconciled, 30)
    assert (counts.legs, counts.live, counts.running, counts.ended_runs, counts.hung_up, counts.failed,
            counts.unknown, counts.timed_out) == (3, 3, 1, 1, 1, 0, 1, False)
    assert statuses(stack, ended_session) == [204]
    assert statuses(stack, live_session) == [] and statuses(stack, orphan_session) == []
    leg = await stack.leg("rec00001") or {}
    assert (leg["state"], leg["end_reason"]) == ("ended", RECONCILE_REASON)
    assert (await stack.leg("rec00002") or {})["state"] == "live"

    # Once hung up, a leg is not reconciled again.
    again = await svc.reconcile()
    assert (again.live, again.hung_up) == (2, 0)
    assert statuses(stack, ended_session) == [204]


async def test_reconcile_is_bounded_in_time(stack: Stack) -> None:
    await stack.register(stack.session("v-slow"), "rec00004", run_id=104)
    stack.config.runs[104] = "completed"
    stack.cloudonix.state.delay_s = 2.0
    counts = await stack.service.reconcile(timeout_s=0.5)
    assert counts.timed_out and counts.hung_up == 0
