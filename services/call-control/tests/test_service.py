"""call-control over real NATS: the leg registry and hangup, against the Cloudonix stand-in."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import pytest
from nats.js.errors import NotFoundError

from voicebus.bus.messages import CallEnded, CallHangup, HangupRequest, LegRegister
from voicebus.bus.rpc import BusError
from voicebus.bus.subjects import CTL_TRANSFER, EVT_CALL_ENDED, EVT_CALL_FAILED, EVT_CALL_HANGUP
from voicebus.call_control.service import actions_bucket

if TYPE_CHECKING:
    from conftest import Stack
else:
    Stack = Any

ORG, CONFIG_ID, TOKEN = 7, 11, "tok-3c1f0a9e5b7d"  # as in conftest.py
FAKE_CONFIG_ID = 21


# ------------------------------------------------------------------------------------------ leg_register
async def test_confirmed_leg_is_registered(stack: Stack) -> None:
    assert (stack.ORG, stack.CONFIG_ID, stack.TOKEN) == (ORG, CONFIG_ID, TOKEN)
    res = await stack.register(stack.session("v-ok"), "leg00001", confirm=True)
    assert (res.confirmed, res.status, res.detail) == (True, 200, "")
    assert [r.status for r in stack.cloudonix.state.sessions["v-ok"].requests] == [200]
    leg = await stack.leg("leg00001")
    assert leg is not None
    assert {k: leg[k] for k in ("telephony_config_id", "organization_id", "run_id", "provider", "carrier_call_id",
                                "direction", "state")} == {
        "telephony_config_id": CONFIG_ID, "organization_id": ORG, "run_id": 42, "provider": "cloudonix",
        "carrier_call_id": "v-ok", "direction": "inbound", "state": "live"}
    assert leg["created_at"] <= leg["updated_at"] <= time.time() and leg["ended_at"] is None


async def test_registering_the_same_leg_again_is_a_no_op(stack: Stack) -> None:
    session = stack.session("v-again")
    await stack.register(session, "leg00002")
    first = await stack.leg("leg00002")
    res = await stack.register(session, "leg00002")
    assert (res.confirmed, res.status) == (False, None)  # not asked to confirm: registered as is
    assert await stack.leg("leg00002") == first


async def test_a_call_id_cannot_be_moved_to_another_carrier_call(stack: Stack) -> None:
    await stack.register(stack.session("v-one"), "leg00003")
    with pytest.raises(BusError) as e:
        await stack.register(stack.session("v-two"), "leg00003")
    assert e.value.code == "conflict" and "leg00003" in e.value.message
    assert (await stack.leg("leg00003") or {})["carrier_call_id"] == "v-one"


async def test_unconfirmed_registration_does_not_ask_the_carrier(stack: Stack) -> None:
    session = stack.session("v-noconfirm")
    res = await stack.register(session, "leg00004", confirm=False)
    assert res.confirmed is False and res.status is None
    assert stack.cloudonix.state.sessions[session].requests == []
    assert (await stack.leg("leg00004") or {})["state"] == "live"


async def test_unknown_or_ended_session_is_not_registered(stack: Stack) -> None:
    res = await stack.register("no-such-session", "leg00005", confirm=True)
    assert (res.confirmed, res.status) == (False, 404) and "unknown or already ended" in res.detail
    assert await stack.leg("leg00005") is None
    stack.session("v-ended")
    stack.cloudonix.state.sessions["v-ended"].end("caller")
    res = await stack.register("v-ended", "leg00006", confirm=True)
    assert (res.confirmed, res.status) == (False, 404)
    assert await stack.leg("leg00006") is None


async def test_confirmation_with_wrong_token(stack: Stack) -> None:
    stack.config.configs[CONFIG_ID].credentials["bearer_token"] = "wrong-token"
    res = await stack.register(stack.session("v-tok"), "leg00007", confirm=True)
    assert (res.confirmed, res.status) == (False, 401)
    assert "bearer token" in res.detail and "wrong-token" not in res.detail
    assert await stack.leg("leg00007") is None


async def test_registration_errors(stack: Stack) -> None:
    with pytest.raises(BusError) as e:
        await stack.register("s", "leg00008", config_id=999)
    assert e.value.code == "not_found" and "999" in e.value.message
    with pytest.raises(BusError) as e:
        await stack.register("   ", "leg00008")
    assert e.value.code == "invalid_request" and "carrier_call_id" in e.value.message
    with pytest.raises(BusError) as e:
        await stack.register("s", "a.b")
    assert e.value.code == "invalid_request" and "call id" in e.value.message
    with pytest.raises(BusError) as e:  # config hands out any organization's credentials; call-control refuses
        await stack.register(stack.session("v-org"), "leg00008", org=ORG + 1, confirm=True)
    assert e.value.code == "not_found" and f"organization {ORG + 1}" in e.value.message
    assert stack.cloudonix.state.sessions["v-org"].requests == []
    stack.config.configs[CONFIG_ID].credentials["bearer_token"] = ""
    with pytest.raises(BusError) as e:
        await stack.register("s", "leg00008", confirm=True)
    assert e.value.code == "carrier_auth_failed" and "no bearer_token" in e.value.message
    assert await stack.leg("leg00008") is None


async def test_stored_credentials_that_do_not_validate(stack: Stack) -> None:
    stack.config.configs[CONFIG_ID].credentials["domain_id"] = "not a domain/"
    with pytest.raises(BusError) as e:
        await stack.register("s", "leg00009", confirm=True)
    assert e.value.code == "carrier_auth_failed" and "domain_id" in e.value.message and TOKEN not in e.value.message


async def test_provider_without_confirmation(stack: Stack) -> None:
    with pytest.raises(BusError) as e:
        await stack.register("FK1", "leg0000a", config_id=FAKE_CONFIG_ID, confirm=True)
    assert (e.value.code, e.value.message) == ("not_supported", f"{stack.fake.spec.display_name} cannot confirm_call")
    res = await stack.register("FK1", "leg0000a", config_id=FAKE_CONFIG_ID)  # a signed webhook needs no confirmation
    assert res.confirmed is False and (await stack.leg("leg0000a") or {})["provider"] == stack.fake.name


async def test_unknown_provider(stack: Stack) -> None:
    stack.add_config(13, "nonesuch", {})
    with pytest.raises(BusError) as e:
        await stack.register("s", "leg0000b", config_id=13)
    assert e.value.code == "not_supported" and "nonesuch" in e.value.message


async def test_carrier_unreachable_is_a_carrier_error(stack: Stack) -> None:
    from voicebus.cli.embedded import free_port

    svc = stack.make_service(api_urls={"cloudonix": f"http://127.0.0.1:{free_port()}"})
    await svc.start()
    t0 = time.monotonic()
    with pytest.raises(BusError) as e:
        await svc.leg_register(LegRegister(call_id="leg0000c", run_id=1, organization_id=ORG,
                                           telephony_config_id=CONFIG_ID, carrier_call_id="x", confirm=True))
    assert e.value.code == "carrier_error" and "unreachable" in e.value.message
    assert time.monotonic() - t0 < 3
    assert await stack.leg("leg0000c") is None


async def test_validate_session_is_gone(stack: Stack) -> None:
    with pytest.raises(Exception) as e:
        await stack.nc.request(stack.subjects.ctl("validate_session"), b"{}", timeout=2)
    assert type(e.value).__name__ == "NoRespondersError"


# ------------------------------------------------------------------------------------------ hangup
async def test_hangup_ends_the_call_and_publishes_events(stack: Stack) -> None:
    session = stack.session("h-ok")
    await stack.register(session, "call0001")
    res = await stack.hangup("call0001")
    assert (res.outcome, res.replayed) == ("hung_up", False)
    s = stack.cloudonix.state.sessions[session]
    assert s.state == "ended" and s.ended_by == "rest" and stack.deletes(session) == 1

    hung = CallHangup.model_validate(await stack.last_event(EVT_CALL_HANGUP))
    assert (hung.call_id, hung.run_id, hung.organization_id, hung.source) == ("call0001", 42, ORG, "call-control")
    assert hung.outcome == "hung_up"
    ended = CallEnded.model_validate(await stack.last_event(EVT_CALL_ENDED))
    assert (ended.call_id, ended.state, ended.reason, ended.run_id) == ("call0001", "completed", "agent_hangup", 42)
    leg = await stack.leg("call0001") or {}
    assert (leg["state"], leg["end_reason"]) == ("ended", "agent_hangup") and leg["ended_at"] >= leg["created_at"]


async def test_hangup_with_failed_end_state_publishes_call_failed(stack: Stack) -> None:
    await stack.register(stack.session("h-failed"), "call0002")
    await stack.hangup("call0002", reason="runner_lost", end_state="failed")
    ended = CallEnded.model_validate(await stack.last_event(EVT_CALL_FAILED))
    assert (ended.state, ended.reason) == ("failed", "runner_lost")
    with pytest.raises(NotFoundError):
        await stack.last_event(EVT_CALL_ENDED)


async def test_hangup_without_end_state_publishes_only_the_hangup(stack: Stack) -> None:
    await stack.register(stack.session("h-noend"), "call0003")
    await stack.hangup("call0003", end_state=None)
    assert (await stack.last_event(EVT_CALL_HANGUP))["call_id"] == "call0003"
    for name in (EVT_CALL_ENDED, EVT_CALL_FAILED):
        with pytest.raises(NotFoundError):
            await stack.last_event(name)


async def test_already_ended_call_counts_as_success(stack: Stack) -> None:
    session = stack.session("h-gone")
    await stack.register(session, "call0004")
    stack.cloudonix.state.sessions[session].end("caller")
    res = await stack.hangup("call0004")
    assert res.outcome == "already_ended"
    assert (await stack.last_event(EVT_CALL_HANGUP))["outcome"] == "already_ended"
    assert (await stack.last_event(EVT_CALL_ENDED))["call_id"] == "call0004"


async def test_call_without_a_leg_still_ends_its_run(stack: Stack) -> None:
    res = await stack.hangup("call0012", reason="caller_hangup", end_state="failed")
    assert (res.outcome, res.status, res.replayed) == ("no_leg", None, False)
    assert stack.config.requests == 0  # nothing to ask config about
    ended = CallEnded.model_validate(await stack.last_event(EVT_CALL_FAILED))
    assert (ended.call_id, ended.run_id, ended.reason) == ("call0012", 42, "caller_hangup")
    assert (await stack.last_event(EVT_CALL_HANGUP))["outcome"] == "no_leg"
    again = await stack.hangup("call0012")
    assert (again.outcome, again.replayed) == ("no_leg", True)


async def test_leg_of_another_organization_is_never_touched(stack: Stack) -> None:
    session = stack.session("h-org")
    await stack.register(session, "call000b")
    with pytest.raises(BusError) as e:
        await stack.hangup("call000b", org=ORG + 1)
    assert e.value.code == "not_found" and f"organization {ORG + 1}" in e.value.message
    assert stack.deletes(session) == 0
    with pytest.raises(NotFoundError):
        await stack.last_event(EVT_CALL_HANGUP)
    assert (await stack.hangup("call000b")).outcome == "hung_up"  # the claim was released for the owner


async def test_hangup_naming_another_run_is_refused(stack: Stack) -> None:
    session = stack.session("h-run")
    await stack.register(session, "call0013", run_id=42)
    with pytest.raises(BusError) as e:
        await stack.hangup("call0013", run_id=43)
    assert e.value.code == "invalid_request" and "run 42" in e.value.message
    assert stack.deletes(session) == 0


async def test_configuration_moved_to_another_organization_is_refused(stack: Stack) -> None:
    session = stack.session("h-moved")
    await stack.register(session, "call0014")
    stack.config.configs[CONFIG_ID].organization_id = ORG + 1
    with pytest.raises(BusError) as e:
        await stack.hangup("call0014")
    assert e.value.code == "not_found"
    assert stack.deletes(session) == 0


async def test_replay_does_not_call_the_carrier_again(stack: Stack) -> None:
    session = stack.session("h-replay")
    await stack.register(session, "call0005")
    first = await stack.hangup("call0005")
    config_requests = stack.config.requests
    second = await stack.hangup("call0005", reason="something else")
    assert (first.outcome, first.replayed) == ("hung_up", False)
    assert (second.outcome, second.replayed) == ("hung_up", True)
    assert stack.deletes(session) == 1
    assert stack.config.requests == config_requests  # answered from the record alone
    assert await stack.event_count() == 2  # one call.hangup, one call.ended: the replay published nothing


async def test_concurrent_duplicates_on_two_replicas_call_the_carrier_once(stack: Stack) -> None:
    session = stack.session("h-race")
    await stack.register(session, "call0006")
    other = stack.make_service(instance_id="cc-b")
    await other.start()
    stack.cloudonix.state.delay_s = 0.3  # keep the first hangup in flight while the second arrives
    req = HangupRequest(call_id="call0006", run_id=42, organization_id=ORG, reason="agent_hangup")
    results = await asyncio.gather(stack.service.hangup(req), other.hangup(req))
    assert sorted(r.replayed for r in results) == [False, True]
    assert {r.outcome for r in results} == {"hung_up"}
    assert stack.deletes(session) == 1


async def test_concurrent_duplicates_over_the_bus(stack: Stack) -> None:
    session = stack.session("h-race-bus")
    await stack.register(session, "call0007")
    other = stack.make_service(instance_id="cc-c")
    await other.start()
    stack.cloudonix.state.delay_s = 0.2
    results = await asyncio.gather(*(stack.hangup("call0007") for _ in range(4)))
    assert [r.replayed for r in results].count(False) == 1
    assert all(r.outcome == "hung_up" for r in results)
    assert stack.deletes(session) == 1


async def test_wrong_token_fails_and_releases_the_claim(stack: Stack) -> None:
    session = stack.session("h-auth")
    await stack.register(session, "call0008")
    creds = stack.config.configs[CONFIG_ID].credentials
    creds["bearer_token"] = "wrong-token"
    with pytest.raises(BusError) as e:
        await stack.hangup("call0008")
    assert e.value.code == "carrier_auth_failed" and "wrong-token" not in e.value.message
    with pytest.raises(NotFoundError):
        await stack.last_event(EVT_CALL_HANGUP)
    assert (await stack.leg("call0008") or {})["state"] == "live"
    creds["bearer_token"] = TOKEN  # the operator fixes the token; a retry now works
    res = await stack.hangup("call0008")
    assert (res.outcome, res.replayed) == ("hung_up", False)


async def test_transient_carrier_failure_is_retried(stack: Stack) -> None:
    session = stack.session("h-retry")
    await stack.register(session, "call0009")
    stack.cloudonix.state.fail_next = [503]
    res = await stack.hangup("call0009")
    assert res.outcome == "hung_up"
    assert [(r.method, r.status) for r in stack.cloudonix.state.sessions[session].requests] == [
        ("DELETE", 503), ("DELETE", 204)]


async def test_persistent_carrier_failure_is_reported(stack: Stack) -> None:
    session = stack.session("h-down")
    await stack.register(session, "call000a")
    stack.cloudonix.state.fail_next = [500, 502, 503]
    with pytest.raises(BusError) as e:
        await stack.hangup("call000a")
    assert e.value.code == "carrier_error" and "503" in e.value.message
    assert stack.deletes(session) == 3
    res = await stack.hangup("call000a")  # claim released: a retry may succeed
    assert res.outcome == "hung_up" and not res.replayed


async def test_hangup_through_another_provider(stack: Stack) -> None:
    """The same handler drives any provider with REST hangup: here the test-only carrier."""
    live = stack.fake.carrier.add_call("+15550109999", "+15550100001")
    await stack.register(live, "call0015", config_id=FAKE_CONFIG_ID)
    await stack.register("FK9999", "call0016", config_id=FAKE_CONFIG_ID)
    assert (await stack.hangup("call0015")).outcome == "hung_up"
    assert (await stack.hangup("call0016")).outcome == "already_ended"  # unknown to the carrier: 404 = ended
    assert stack.fake.carrier.seen == [("DELETE", f"/calls/{live}", 204), ("DELETE", "/calls/FK9999", 404)]
    assert stack.fake.carrier.calls[live].status == "completed"


async def test_provider_without_rest_hangup(stack: Stack, bare_provider: str) -> None:
    stack.add_config(12, bare_provider, {"api_key": "k", "signing_secret": "s"})
    await stack.register("B-1", "call000c", config_id=12)
    with pytest.raises(BusError) as e:
        await stack.hangup("call000c")
    assert e.value.code == "not_supported" and e.value.message == f"Bare {bare_provider[4:]} cannot hangup"


async def test_invalid_requests(stack: Stack) -> None:
    with pytest.raises(BusError) as e:
        await stack.hangup("a.b")
    assert e.value.code == "invalid_request" and "call id" in e.value.message
    msg = await stack.nc.request(stack.subjects.ctl("hangup"), b'{"call_id": "x"}', timeout=5)
    body = json.loads(msg.data)
    assert body["ok"] is False and body["error"]["code"] == "invalid_request"
    assert "run_id" in body["error"]["message"]


async def test_transfer_is_not_implemented(stack: Stack) -> None:
    msg = await stack.nc.request(stack.subjects.ctl(CTL_TRANSFER), b'{"call_id": "x"}', timeout=5)
    assert json.loads(msg.data) == {"ok": False, "error": {
        "code": "not_implemented", "message": "call-control does not implement transfer yet"}}


# ------------------------------------------------------------------------------------------ claims
async def test_stale_claim_of_a_dead_replica_is_taken_over(stack: Stack) -> None:
    await stack.register(stack.session("h-stale"), "call000e")
    kv = await stack.nc.jetstream().key_value(actions_bucket(stack.subjects))
    await kv.create("hangup.call000e", json.dumps(
        {"state": "pending", "by": "dead-replica", "claimed_at": time.time() - 3600}).encode())
    res = await stack.hangup("call000e")
    assert (res.outcome, res.replayed) == ("hung_up", False)
    record = json.loads((await kv.get("hangup.call000e")).value or b"{}")
    assert record["state"] == "done" and record["by"] == "cc-a"


async def test_waiter_replays_when_the_holder_records_its_result(stack: Stack) -> None:
    session = stack.session("h-wait-done")
    await stack.register(session, "call000f")
    kv = await stack.nc.jetstream().key_value(actions_bucket(stack.subjects))
    rev = await kv.create("hangup.call000f", json.dumps(
        {"state": "pending", "by": "busy-replica", "claimed_at": time.time()}).encode())
    req = HangupRequest(call_id="call000f", run_id=42, organization_id=ORG, reason="agent_hangup")
    waiter = asyncio.create_task(stack.service.hangup(req))
    done, _ = await asyncio.wait({waiter}, timeout=0.3)
    assert not done  # waits for the holder instead of calling the carrier
    await kv.update("hangup.call000f", json.dumps(
        {"state": "done", "outcome": "already_ended", "status": 404}).encode(), last=rev)
    res = await asyncio.wait_for(waiter, 5)
    assert (res.outcome, res.status, res.replayed) == ("already_ended", 404, True)
    assert stack.deletes(session) == 0


async def test_waiter_takes_over_when_the_holder_gives_up(stack: Stack) -> None:
    session = stack.session("h-wait-released")
    await stack.register(session, "call0010")
    kv = await stack.nc.jetstream().key_value(actions_bucket(stack.subjects))
    rev = await kv.create("hangup.call0010", json.dumps(
        {"state": "pending", "by": "failing-replica", "claimed_at": time.time()}).encode())
    req = HangupRequest(call_id="call0010", run_id=42, organization_id=ORG, reason="agent_hangup")
    waiter = asyncio.create_task(stack.service.hangup(req))
    done, _ = await asyncio.wait({waiter}, timeout=0.3)
    assert not done
    await kv.delete("hangup.call0010", last=rev)
    res = await asyncio.wait_for(waiter, 5)
    assert (res.outcome, res.replayed) == ("hung_up", False)
    assert stack.deletes(session) == 1


async def test_waiter_gives_up_with_in_progress(stack: Stack) -> None:
    svc = stack.make_service(claim_wait_s=0.3)
    await svc.start()
    kv = await stack.nc.jetstream().key_value(actions_bucket(stack.subjects))
    await kv.create("hangup.call0011", json.dumps(
        {"state": "pending", "by": "slow-replica", "claimed_at": time.time()}).encode())
    with pytest.raises(BusError) as e:
        await svc.hangup(HangupRequest(call_id="call0011", run_id=42, organization_id=ORG, reason="x"))
    assert e.value.code == "in_progress" and "hanging up" in e.value.message


async def test_one_replica_handles_slow_requests_concurrently(stack: Stack) -> None:
    """A slow carrier must not queue every other request behind it (rpc.serve concurrency)."""
    sessions = [stack.session(f"conc-{i}") for i in range(4)]
    stack.cloudonix.state.delay_s = 0.5
    t0 = time.monotonic()
    results = await asyncio.gather(*(stack.register(s, f"conc000{i}", confirm=True) for i, s in enumerate(sessions)))
    assert all(r.confirmed for r in results)
    assert time.monotonic() - t0 < 1.5  # sequential handling would take >= 2 s
