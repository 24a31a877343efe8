"""call-control over real NATS against the Cloudonix stand-in."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import pytest
from nats.js.errors import NotFoundError

from voicebus.bus.messages import (
    CallEnded,
    CallHangup,
    HangupRequest,
    HangupResult,
    TelephonyCredentials,
    ValidateSessionRequest,
    ValidateSessionResult,
)
from voicebus.bus.rpc import BusError, request
from voicebus.bus.subjects import (
    CTL_HANGUP,
    CTL_INITIATE,
    CTL_TRANSFER,
    CTL_VALIDATE_SESSION,
    EVT_CALL_ENDED,
    EVT_CALL_FAILED,
    EVT_CALL_HANGUP,
)
from voicebus.call_control.service import actions_bucket

if TYPE_CHECKING:
    from conftest import Stack
else:
    Stack = Any

ORG, CONFIG_ID, TOKEN = 7, 11, "tok-3c1f0a9e5b7d"  # as in conftest.py


async def validate(stack: Stack, session: str, config_id: int = CONFIG_ID) -> ValidateSessionResult:
    return await request(stack.nc, stack.subjects.ctl(CTL_VALIDATE_SESSION),
                         ValidateSessionRequest(telephony_config_id=config_id, session=session),
                         ValidateSessionResult, timeout=10)


def hangup_req(session: str, call_id: str = "c0ffee01", **kw: Any) -> HangupRequest:
    fields: dict[str, Any] = {"call_id": call_id, "run_id": 42, "organization_id": ORG,
                              "telephony_config_id": CONFIG_ID, "carrier_call_ref": session,
                              "reason": "agent_hangup", **kw}
    return HangupRequest(**fields)


async def hangup(stack: Stack, req: HangupRequest) -> HangupResult:
    return await request(stack.nc, stack.subjects.ctl(CTL_HANGUP), req, HangupResult, timeout=15)


async def last_event(stack: Stack, name: str) -> dict[str, Any]:
    msg = await stack.nc.jetstream().get_last_msg(stack.subjects.events_stream, stack.subjects.evt(name))
    return json.loads(msg.data)


# ------------------------------------------------------------------------------------------ validate
async def test_validate_live_session(stack: Stack) -> None:
    assert (stack.ORG, stack.CONFIG_ID, stack.TOKEN) == (ORG, CONFIG_ID, TOKEN)
    res = await validate(stack, stack.session("v-ok"))
    assert (res.valid, res.status, res.detail) == (True, 200, "")
    assert [r.status for r in stack.cloudonix.state.sessions["v-ok"].requests] == [200]


async def test_validate_unknown_or_ended_session(stack: Stack) -> None:
    res = await validate(stack, "no-such-session")
    assert (res.valid, res.status) == (False, 404) and "unknown or already ended" in res.detail
    stack.session("v-ended")
    stack.cloudonix.state.sessions["v-ended"].end("caller")
    res = await validate(stack, "v-ended")
    assert (res.valid, res.status) == (False, 404)


async def test_validate_with_wrong_token(stack: Stack) -> None:
    stack.config.configs[CONFIG_ID].credentials["bearer_token"] = "wrong-token"
    res = await validate(stack, stack.session("v-tok"))
    assert (res.valid, res.status) == (False, 401)
    assert "bearer token" in res.detail and "wrong-token" not in res.detail


async def test_validate_errors(stack: Stack) -> None:
    with pytest.raises(BusError) as e:
        await validate(stack, "s", config_id=999)
    assert e.value.code == "not_found" and "999" in e.value.message
    with pytest.raises(BusError) as e:
        await validate(stack, "   ")
    assert e.value.code == "invalid_request"
    stack.config.configs[CONFIG_ID].credentials["bearer_token"] = ""
    with pytest.raises(BusError) as e:
        await validate(stack, "s")
    assert e.value.code == "carrier_auth_failed" and "no bearer_token" in e.value.message


async def test_carrier_unreachable_is_a_carrier_error(stack: Stack) -> None:
    from voicebus.cli.embedded import free_port

    svc = stack.make_service(api_url=f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(BusError) as e:
        await svc.validate_session(ValidateSessionRequest(telephony_config_id=CONFIG_ID, session="x"))
    assert e.value.code == "carrier_error" and "unreachable" in e.value.message
    assert time.monotonic() - t0 < 3


# ------------------------------------------------------------------------------------------ hangup
async def test_hangup_ends_the_call_and_publishes_events(stack: Stack) -> None:
    session = stack.session("h-ok")
    res = await hangup(stack, hangup_req(session, call_id="call0001"))
    assert (res.outcome, res.status, res.replayed) == ("hung_up", 204, False)
    s = stack.cloudonix.state.sessions[session]
    assert s.state == "ended" and s.ended_by == "rest" and stack.deletes(session) == 1

    hung = CallHangup.model_validate(await last_event(stack, EVT_CALL_HANGUP))
    assert (hung.call_id, hung.run_id, hung.organization_id, hung.source) == ("call0001", 42, ORG, "call-control")
    assert (hung.outcome, hung.status) == ("hung_up", 204)
    ended = CallEnded.model_validate(await last_event(stack, EVT_CALL_ENDED))
    assert (ended.call_id, ended.state, ended.reason, ended.run_id) == ("call0001", "completed", "agent_hangup", 42)


async def test_hangup_with_failed_end_state_publishes_call_failed(stack: Stack) -> None:
    session = stack.session("h-failed")
    await hangup(stack, hangup_req(session, call_id="call0002", reason="runner_lost", end_state="failed"))
    ended = CallEnded.model_validate(await last_event(stack, EVT_CALL_FAILED))
    assert (ended.state, ended.reason) == ("failed", "runner_lost")
    with pytest.raises(NotFoundError):
        await last_event(stack, EVT_CALL_ENDED)


async def test_hangup_without_end_state_publishes_only_the_hangup(stack: Stack) -> None:
    session = stack.session("h-noend")
    await hangup(stack, hangup_req(session, call_id="call0003", end_state=None))
    assert (await last_event(stack, EVT_CALL_HANGUP))["call_id"] == "call0003"
    for name in (EVT_CALL_ENDED, EVT_CALL_FAILED):
        with pytest.raises(NotFoundError):
            await last_event(stack, name)


async def test_already_ended_call_counts_as_success(stack: Stack) -> None:
    session = stack.session("h-gone")
    stack.cloudonix.state.sessions[session].end("caller")
    res = await hangup(stack, hangup_req(session, call_id="call0004"))
    assert (res.outcome, res.status) == ("already_ended", 404)
    assert (await last_event(stack, EVT_CALL_HANGUP))["outcome"] == "already_ended"
    assert (await last_event(stack, EVT_CALL_ENDED))["call_id"] == "call0004"


async def test_replay_does_not_call_the_carrier_again(stack: Stack) -> None:
    session = stack.session("h-replay")
    first = await hangup(stack, hangup_req(session, call_id="call0005"))
    config_requests = stack.config.requests
    second = await hangup(stack, hangup_req(session, call_id="call0005", reason="something else"))
    assert (first.outcome, first.replayed) == ("hung_up", False)
    assert (second.outcome, second.status, second.replayed) == ("hung_up", 204, True)
    assert stack.deletes(session) == 1
    assert stack.config.requests == config_requests  # answered from the record alone
    info = await stack.nc.jetstream().stream_info(stack.subjects.events_stream)
    assert info.state.messages == 2  # one call.hangup, one call.ended: the replay published nothing


async def test_concurrent_duplicates_on_two_replicas_call_the_carrier_once(stack: Stack) -> None:
    session = stack.session("h-race")
    other = stack.make_service(instance_id="cc-b")
    await other.start()
    stack.cloudonix.state.delay_s = 0.3  # keep the first hangup in flight while the second arrives
    req = hangup_req(session, call_id="call0006")
    results = await asyncio.gather(stack.service.hangup(req), other.hangup(req))
    assert sorted(r.replayed for r in results) == [False, True]
    assert {(r.outcome, r.status) for r in results} == {("hung_up", 204)}
    assert stack.deletes(session) == 1


async def test_concurrent_duplicates_over_the_bus(stack: Stack) -> None:
    session = stack.session("h-race-bus")
    other = stack.make_service(instance_id="cc-c")
    await other.start()
    stack.cloudonix.state.delay_s = 0.2
    req = hangup_req(session, call_id="call0007")
    results = await asyncio.gather(*(hangup(stack, req) for _ in range(4)))
    assert [r.replayed for r in results].count(False) == 1
    assert all(r.outcome == "hung_up" for r in results)
    assert stack.deletes(session) == 1


async def test_wrong_token_fails_and_releases_the_claim(stack: Stack) -> None:
    session = stack.session("h-auth")
    creds = stack.config.configs[CONFIG_ID].credentials
    creds["bearer_token"] = "wrong-token"
    with pytest.raises(BusError) as e:
        await hangup(stack, hangup_req(session, call_id="call0008"))
    assert e.value.code == "carrier_auth_failed" and "wrong-token" not in e.value.message
    with pytest.raises(NotFoundError):
        await last_event(stack, EVT_CALL_HANGUP)
    creds["bearer_token"] = TOKEN  # the operator fixes the token; a retry now works
    res = await hangup(stack, hangup_req(session, call_id="call0008"))
    assert (res.outcome, res.replayed) == ("hung_up", False)


async def test_transient_carrier_failure_is_retried(stack: Stack) -> None:
    session = stack.session("h-retry")
    stack.cloudonix.state.fail_next = [503]
    res = await hangup(stack, hangup_req(session, call_id="call0009"))
    assert res.outcome == "hung_up"
    assert [(r.method, r.status) for r in stack.cloudonix.state.sessions[session].requests] == [
        ("DELETE", 503), ("DELETE", 204)]


async def test_persistent_carrier_failure_is_reported(stack: Stack) -> None:
    session = stack.session("h-down")
    stack.cloudonix.state.fail_next = [500, 502, 503]
    with pytest.raises(BusError) as e:
        await hangup(stack, hangup_req(session, call_id="call000a"))
    assert e.value.code == "carrier_error" and "503" in e.value.message
    assert stack.deletes(session) == 3
    res = await hangup(stack, hangup_req(session, call_id="call000a"))  # claim released: a retry may succeed
    assert res.outcome == "hung_up" and not res.replayed


async def test_configuration_of_another_organization_is_refused(stack: Stack) -> None:
    session = stack.session("h-org")
    with pytest.raises(BusError) as e:
        await hangup(stack, hangup_req(session, call_id="call000b", organization_id=ORG + 1))
    assert e.value.code == "not_found"
    assert stack.deletes(session) == 0


async def test_provider_without_rest_support(stack: Stack) -> None:
    stack.config.configs[12] = TelephonyCredentials(
        telephony_config_id=12, organization_id=ORG, provider="twilio",
        credentials={"account_sid": "AC1", "auth_token": "x"})
    with pytest.raises(BusError) as e:
        await hangup(stack, hangup_req("CA123", call_id="call000c", telephony_config_id=12))
    assert e.value.code == "not_supported" and "Twilio" in e.value.message
    stack.config.configs[13] = TelephonyCredentials(telephony_config_id=13, organization_id=ORG,
                                                    provider="nonesuch", credentials={})
    with pytest.raises(BusError) as e:
        await validate(stack, "s", config_id=13)
    assert e.value.code == "not_supported" and "nonesuch" in e.value.message


async def test_invalid_requests(stack: Stack) -> None:
    with pytest.raises(BusError) as e:
        await hangup(stack, hangup_req("s", call_id="a.b"))
    assert e.value.code == "invalid_request" and "call id" in e.value.message
    with pytest.raises(BusError) as e:
        await hangup(stack, hangup_req(" ", call_id="call000d"))
    assert e.value.code == "invalid_request"
    msg = await stack.nc.request(stack.subjects.ctl(CTL_HANGUP), b'{"call_id": "x"}', timeout=5)
    body = json.loads(msg.data)
    assert body["ok"] is False and body["error"]["code"] == "invalid_request"
    assert "run_id" in body["error"]["message"]


@pytest.mark.parametrize("action", [CTL_TRANSFER, CTL_INITIATE])
async def test_transfer_and_initiate_are_not_implemented(stack: Stack, action: str) -> None:
    msg = await stack.nc.request(stack.subjects.ctl(action), b'{"call_id": "x"}', timeout=5)
    assert json.loads(msg.data) == {"ok": False, "error": {
        "code": "not_implemented", "message": f"call-control does not implement {action} yet"}}


# ------------------------------------------------------------------------------------------ claims
async def test_stale_claim_of_a_dead_replica_is_taken_over(stack: Stack) -> None:
    session = stack.session("h-stale")
    kv = await stack.nc.jetstream().key_value(actions_bucket(stack.subjects))
    await kv.create("hangup.call000e", json.dumps(
        {"state": "pending", "by": "dead-replica", "claimed_at": time.time() - 3600}).encode())
    res = await hangup(stack, hangup_req(session, call_id="call000e"))
    assert (res.outcome, res.replayed) == ("hung_up", False)
    record = json.loads((await kv.get("hangup.call000e")).value)
    assert record["state"] == "done" and record["by"] == "cc-a"


async def test_waiter_replays_when_the_holder_records_its_result(stack: Stack) -> None:
    session = stack.session("h-wait-done")
    kv = await stack.nc.jetstream().key_value(actions_bucket(stack.subjects))
    rev = await kv.create("hangup.call000f", json.dumps(
        {"state": "pending", "by": "busy-replica", "claimed_at": time.time()}).encode())
    waiter = asyncio.create_task(stack.service.hangup(hangup_req(session, call_id="call000f")))
    done, _ = await asyncio.wait({waiter}, timeout=0.3)
    assert not done  # waits for the holder instead of calling the carrier
    await kv.update("hangup.call000f", json.dumps(
        {"state": "done", "outcome": "already_ended", "status": 404}).encode(), last=rev)
    res = await asyncio.wait_for(waiter, 5)
    assert (res.outcome, res.status, res.replayed) == ("already_ended", 404, True)
    assert stack.deletes(session) == 0


async def test_waiter_takes_over_when_the_holder_gives_up(stack: Stack) -> None:
    session = stack.session("h-wait-released")
    kv = await stack.nc.jetstream().key_value(actions_bucket(stack.subjects))
    rev = await kv.create("hangup.call0010", json.dumps(
        {"state": "pending", "by": "failing-replica", "claimed_at": time.time()}).encode())
    waiter = asyncio.create_task(stack.service.hangup(hangup_req(session, call_id="call0010")))
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
        await svc.hangup(hangup_req("whatever", call_id="call0011"))
    assert e.value.code == "in_progress"


async def test_one_replica_handles_slow_requests_concurrently(stack: Stack) -> None:
    """A slow carrier must not queue every other request behind it (rpc.serve concurrency)."""
    sessions = [stack.session(f"conc-{i}") for i in range(4)]
    stack.cloudonix.state.delay_s = 0.5
    t0 = time.monotonic()
    results = await asyncio.gather(*(validate(stack, s) for s in sessions))
    assert all(r.valid for r in results)
    assert time.monotonic() - t0 < 1.5  # sequential handling would take >= 2 s
