"""An offer is taken exactly once: a retried offer cannot start a second pipeline on another runner, a
resume (a higher attempt) takes the call over, and every output frame names the runner that sent it."""

from __future__ import annotations

import json

import pytest
from nats.aio.client import Client as NATS

from voicebus.agent_runner.claims import CallClaims
from voicebus.bus.agent import demo_definition
from voicebus.bus.events import claims_store
from voicebus.bus.media import RUNNER_HEADER
from voicebus.bus.messages import OfferAccepted
from voicebus.bus.rpc import BusError, request
from voicebus.bus.subjects import Subjects

from .conftest import IngressFactory, RunnerFactory, wait_until


async def test_a_retried_offer_on_another_runner_is_refused_and_a_resume_takes_over(
        make_runner: RunnerFactory, ingress: IngressFactory, nc: NATS, subjects: Subjects) -> None:
    first = await make_runner(capacity=1)  # full once it holds the call: it stops listening for offers
    ing = ingress()
    accepted = await ing.offer(demo_definition())
    assert accepted.runner_id == first.runner_id
    await ing.wait_frames(5)
    assert {f.headers.get(RUNNER_HEADER) for f in ing.frames} == {first.runner_id}

    await wait_until(lambda: not first.listening.is_set(), 5, "the full runner to stop listening")
    second = await make_runner()  # only this one gets the retried offer, as after a lost reply
    with pytest.raises(BusError) as refused:
        await request(nc, subjects.dispatch_offer, ing.offer_for(demo_definition()), OfferAccepted, timeout=5)
    assert refused.value.code == "claimed"
    assert second.sessions == {}  # no second pipeline

    resumed = await request(nc, subjects.dispatch_offer, ing.offer_for(demo_definition(), resume=True, attempt=2),
                            OfferAccepted, timeout=5)
    assert resumed.runner_id == second.runner_id
    claims = await claims_store(nc.jetstream(), subjects)
    held = json.loads((await claims.get(ing.call_id)).value or b"{}")
    assert held == {"runner_id": second.runner_id, "attempt": 2}
    # The first runner, cut off but alive, sees its claim taken over and stops without a word.
    await wait_until(lambda: not first.sessions, 10, "the superseded runner to stop its pipeline")
    assert second.sessions and ing.events_of("close") == []
    assert (await claims.get(ing.call_id)).value == json.dumps(
        {"runner_id": second.runner_id, "attempt": 2}).encode()  # left alone by the one that stopped
    before = len(ing.frames)
    await ing.wait_frames(before + 5)
    assert {f.headers.get(RUNNER_HEADER) for f in ing.frames[before:]} == {second.runner_id}


async def test_claims_are_exclusive_per_attempt_and_released_by_their_holder(nc: NATS, subjects: Subjects) -> None:
    claims = CallClaims(await claims_store(nc.jetstream(), subjects))
    assert await claims.take("call-1", 1, "runner-a") is None
    assert await claims.take("call-1", 1, "runner-a") is None  # the same offer again
    assert await claims.take("call-1", 1, "runner-b") == "runner-a"
    assert await claims.take("call-1", 2, "runner-b") is None  # resume
    assert await claims.take("call-1", 2, "runner-a") == "runner-b"
    await claims.release("call-1", "runner-a")  # not its claim any more: left alone
    assert await claims.take("call-1", 2, "runner-c") == "runner-b"
    await claims.release("call-1", "runner-b")
    assert await claims.take("call-1", 1, "runner-c") is None
    await nc.jetstream().delete_key_value(subjects.claims_bucket)
