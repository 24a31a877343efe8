"""Every refusal of the Agent Stream endpoint: close code, reason, what was (not) created, lease released."""

from __future__ import annotations

import asyncio
import json

import pytest

from voicebus.bus.rpc import BusError
from voicebus.telephony.dialects.twilio_media_carrier import carrier_connected

from .conftest import AGENT_UUID, CONFIG_ID, DOMAIN, ORG_ID, SESSION, Harness, closed


def assert_nothing_created(h: Harness) -> None:
    assert h.config.creates == []
    assert h.config.leases == {}
    assert h.runner.offers_seen == 0


# ------------------------------------------------------------------------------------------------ admission (1-3)
async def test_missing_provider(harness: Harness):
    await harness.start_ingress()
    for url in (harness.url(), harness.url(provider=""), harness.url(provider="%20")):
        ws = await harness.dial(url, handshake=False)
        code, reason, _ = await closed(ws)
        assert (code, reason) == (1008, "Missing provider query parameter")
    assert_nothing_created(harness)
    assert harness.config.resolved == []


async def test_unknown_provider(harness: Harness):
    await harness.start_ingress()
    ws = await harness.dial(harness.url(provider="nope"), handshake=False)
    assert (await closed(ws))[:2] == (1008, "Unknown provider: nope")
    assert_nothing_created(harness)


async def test_unknown_provider_name_is_sanitized_and_fits_a_close_frame(harness: Harness):
    await harness.start_ingress()
    hostile = "a%0A%E2%98%83" + "x" * 300
    ws = await harness.dial(harness.url(provider=hostile), handshake=False)
    code, reason, _ = await closed(ws)
    assert code == 1008
    assert reason.startswith("Unknown provider: a??x")
    assert reason.endswith("...")
    assert "\n" not in reason
    assert len(reason.encode()) <= 123


async def test_provider_without_agent_stream_support(harness: Harness):
    await harness.start_ingress()
    ws = await harness.dial(harness.url(provider="vonage"), handshake=False)
    assert (await closed(ws))[:2] == (1011, "Agent Stream is not supported for provider vonage")
    assert_nothing_created(harness)


async def test_provider_name_is_case_insensitive(harness: Harness):
    await harness.start_ingress()
    ws = await harness.dial(harness.cloudonix_url(provider="Cloudonix"), handshake=False)
    await harness.changes.wait(lambda: harness.config.creates)
    assert harness.config.creates[0].mode == "cloudonix"
    await ws.close()


@pytest.mark.parametrize("agent", ["not-a-uuid", "3f2b8c1e9a47", "00000000-0000-0000-0000-000000000000"])
async def test_agent_not_found(harness: Harness, agent: str):
    await harness.start_ingress()
    ws = await harness.dial(harness.url(agent=agent, provider="cloudonix", Domain="acme"), handshake=False)
    assert (await closed(ws))[:2] == (1008, "Agent not found")
    assert_nothing_created(harness)
    # a malformed UUID never reaches config
    assert harness.config.resolved == ([agent] if agent.count("-") == 4 else [])


async def test_agent_uuid_is_canonicalized(harness: Harness):
    await harness.start_ingress()
    ws = await harness.dial(harness.url(agent=AGENT_UUID.upper(), provider="cloudonix", Domain="acme"))
    await harness.changes.wait(lambda: harness.config.creates)
    assert harness.config.resolved == [AGENT_UUID]
    await ws.close()


async def test_config_unreachable_is_internal_error(harness: Harness):
    await harness.config.stop()  # nobody serves vb.cfg.*: no responders
    await harness.start_ingress()
    ws = await harness.dial(harness.cloudonix_url(), handshake=False)
    assert (await closed(ws))[:2] == (1011, "Internal server error")
    assert harness.config.creates == []


async def test_config_internal_error_is_internal_error(harness: Harness):
    harness.config.fail["agent.resolve"] = RuntimeError("db down")
    await harness.start_ingress()
    ws = await harness.dial(harness.cloudonix_url(), handshake=False)
    assert (await closed(ws))[:2] == (1011, "Internal server error")


async def test_quota_exceeded_creates_no_run(harness: Harness):
    harness.config.limit = 0
    await harness.start_ingress()
    ws = await harness.dial(harness.cloudonix_url(), handshake=False)
    assert (await closed(ws))[:2] == (1008, "Concurrent call limit reached")
    assert len(harness.config.acquired) == 1
    assert harness.config.acquired[0].organization_id == ORG_ID
    assert len(harness.config.acquired[0].holder) == 32  # voicebus's own call id
    assert harness.config.creates == []
    assert harness.events.items == []


async def test_quota_service_error_is_internal_error(harness: Harness):
    harness.config.fail["quota.acquire"] = BusError("internal", "redis down")
    await harness.start_ingress()
    ws = await harness.dial(harness.cloudonix_url(), handshake=False)
    assert (await closed(ws))[:2] == (1011, "Internal server error")
    assert harness.config.creates == []


async def test_run_create_failure_releases_the_lease(harness: Harness):
    harness.config.fail["run.create"] = RuntimeError("insert failed")
    await harness.start_ingress()
    ws = await harness.dial(harness.cloudonix_url(), handshake=False)
    assert (await closed(ws))[:2] == (1011, "Internal server error")
    await harness.changes.wait(harness.config.all_leases_released)
    assert harness.runner.offers_seen == 0


async def test_wrong_url_shape_is_explained(harness: Harness):
    await harness.start_ingress()
    ws = await harness.dial(harness.url(agent=f"cloudonix/{AGENT_UUID}", provider="cloudonix"), handshake=False)
    code, reason, _ = await closed(ws)
    assert code == 1008
    assert reason == "Invalid Agent Stream URL: expected /api/v1/agent-stream/{agent_uuid}"


# ------------------------------------------------------------------------------------------------ handshake (5)
async def expect_failed_run(h: Harness, code: int, reason: str, ws) -> None:
    got = await closed(ws)
    assert got[:2] == (code, reason)
    terminal = await h.changes.wait(lambda: h.events.terminal())
    assert len(terminal) == 1
    name, body = terminal[0]
    assert name == "call.failed"
    assert body["state"] == "failed"
    assert body["reason"] == reason
    run = h.config.only_run
    assert body["run_id"] == run.id and body["call_id"] == run.call_id
    assert body["quota_lease_id"] == h.config.creates[0].quota_lease_id
    await h.changes.wait(h.config.all_leases_released)
    assert h.config.released == [h.config.creates[0].quota_lease_id]
    assert h.runner.offers_seen == 0
    assert h.events.named("call.started") == []


async def test_missing_domain(harness: Harness):
    await harness.start_ingress()
    ws = await harness.dial(harness.cloudonix_url(Domain=None))
    await expect_failed_run(harness, 4400, "Missing Domain query parameter", ws)


async def test_unknown_domain(harness: Harness):
    await harness.start_ingress()
    ws = await harness.dial(harness.cloudonix_url(Domain="Other"))
    await expect_failed_run(harness, 4400, "Unknown Cloudonix domain: other.cloudonix.net", ws)


async def test_domain_of_another_organization_does_not_match(harness: Harness):
    match = harness.config.telephony.pop((ORG_ID, "cloudonix", DOMAIN))
    harness.config.telephony[(ORG_ID + 1, "cloudonix", DOMAIN)] = match
    await harness.start_ingress()
    ws = await harness.dial()
    await expect_failed_run(harness, 4400, f"Unknown Cloudonix domain: {DOMAIN}", ws)


async def test_configuration_missing_bearer_token(harness: Harness):
    key = (ORG_ID, "cloudonix", DOMAIN)
    harness.config.telephony[key] = harness.config.telephony[key].model_copy(update={"has_credentials": False})
    await harness.start_ingress()
    ws = await harness.dial()
    await expect_failed_run(harness, 4400, "Cloudonix configuration missing bearer_token", ws)


@pytest.mark.parametrize(("frames", "reason"), [
    ([json.dumps({"event": "start"})], "Expected connected event"),
    ([b"\x00binary"], "Expected connected event (got a binary frame)"),
    (["garbage"], "Expected connected event (got invalid JSON)"),
    ([carrier_connected(), json.dumps({"event": "media"})], "Expected start event"),
    ([carrier_connected(), b"\x01"], "Expected start event (got a binary frame)"),
    ([carrier_connected(), json.dumps({"event": "start", "start": None})], "Missing start metadata"),
    ([carrier_connected(), json.dumps({"event": "start", "start": {"streamSid": "MZ", "accountSid": "acme"}})],
     "Missing stream identifiers: callSid, session"),
])
async def test_malformed_handshake(harness: Harness, frames, reason):
    await harness.start_ingress()
    ws = await harness.dial(handshake=False)
    for frame in frames:
        await ws.send(frame)
    await expect_failed_run(harness, 4400, reason, ws)


async def test_session_validation_failed(harness: Harness):
    harness.callcontrol.valid_sessions = set()
    await harness.start_ingress()
    ws = await harness.dial()
    await expect_failed_run(harness, 4400, "Cloudonix session validation failed", ws)
    assert [(v.telephony_config_id, v.carrier_call_id, v.confirm) for v in harness.callcontrol.validations] == [
        (CONFIG_ID, SESSION, True)]


async def test_call_control_unreachable(harness: Harness):
    await harness.callcontrol.stop()
    await harness.start_ingress()
    ws = await harness.dial()
    await expect_failed_run(harness, 1011, "Internal server error", ws)


async def test_handshake_timeout(harness: Harness):
    await harness.start_ingress(handshake_timeout_s=0.4)
    ws = await harness.dial(handshake=False)
    await ws.send(carrier_connected())  # ... and never a start
    await expect_failed_run(harness, 4408, "Handshake timeout", ws)


async def test_carrier_gone_during_handshake(harness: Harness):
    await harness.start_ingress()
    ws = await harness.dial(handshake=False)
    await ws.send(carrier_connected())
    await harness.changes.wait(lambda: harness.config.creates)
    await ws.close()
    terminal = await harness.changes.wait(lambda: harness.events.terminal())
    assert terminal[0][1]["reason"] == "Carrier disconnected during handshake"
    await harness.changes.wait(harness.config.all_leases_released)


# ------------------------------------------------------------------------------------------------ offer (7)
async def test_no_runner_available(harness: Harness):
    await harness.runner.stop()
    await harness.start_ingress(offer_timeout_s=0.5)
    ws = await harness.dial()
    code, reason, _ = await closed(ws)
    assert (code, reason) == (1013, "No agent runner available")
    name, body = (await harness.changes.wait(lambda: harness.events.terminal()))[0]
    assert (name, body["state"], body["reason"]) == ("call.failed", "failed", "No agent runner available")
    # the run had reached "running" before the offer
    assert harness.config.only_run.state == "running"
    assert len(harness.events.named("call.started")) == 1
    await harness.changes.wait(harness.config.all_leases_released)


async def test_busy_runners_are_retried_until_one_accepts(harness: Harness):
    harness.runner.reject_first = 2  # at_capacity twice
    await harness.start_ingress()
    ws = await harness.dial()
    await harness.changes.wait(lambda: harness.runner.calls)
    assert harness.runner.offers_seen == 3
    await ws.close()
    await harness.changes.wait(lambda: harness.events.terminal())


async def test_offer_reply_lost_but_runner_heartbeating_counts_as_accepted(harness: Harness):
    harness.runner.never_reply = True
    await harness.start_ingress(offer_timeout_s=0.8)
    ws = await harness.dial()
    await harness.changes.wait(lambda: harness.runner.calls)
    assert harness.ingress is not None
    (live,) = harness.ingress.calls
    await asyncio.wait_for(live.answered.wait(), 5)
    assert harness.runner.offers_seen == 1  # not offered twice
    assert harness.events.terminal() == []
    await ws.close()
    await harness.changes.wait(lambda: harness.events.terminal())


async def test_draining_ingress_refuses_new_sockets(harness: Harness):
    svc = await harness.start_ingress()
    svc.begin_drain()
    ws = await harness.dial(handshake=False)
    assert (await closed(ws))[:2] == (1012, "Service restarting")
    assert_nothing_created(harness)


async def test_caller_hanging_up_during_the_offer_abandons_it(harness: Harness):
    await harness.runner.stop()  # nobody takes the offer: ingress keeps retrying ...
    await harness.start_ingress(offer_timeout_s=20)
    ws = await harness.dial()
    await harness.changes.wait(lambda: harness.config.updates)  # handshake done, run running, offering
    loop = asyncio.get_running_loop()
    hung_up = loop.time()
    await ws.send(json.dumps({"event": "stop"}))
    assert (await closed(ws))[:2] == (1000, "Caller hung up")
    assert loop.time() - hung_up < 5  # ... but stops as soon as the caller is gone
    name, body = (await harness.changes.wait(lambda: harness.events.terminal()))[0]
    assert (name, body["reason"]) == ("call.ended", "caller_hangup")
    await harness.changes.wait(harness.config.all_leases_released)
