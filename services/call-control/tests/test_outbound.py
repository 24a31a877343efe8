"""ctl.initiate, ctl.call_info and ctl.bind_number over real NATS, against the test-only carrier on real HTTP."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from voicebus.bus.messages import (
    BindNumberRequest,
    BindNumberResult,
    CallInfoRequest,
    CallInfoResult,
    InitiateRequest,
    InitiateResult,
)
from voicebus.bus.rpc import BusError
from voicebus.bus.subjects import CTL_BIND_NUMBER, CTL_CALL_INFO, CTL_INITIATE

if TYPE_CHECKING:
    from conftest import Stack
else:
    Stack = Any

ORG, CONFIG_ID, FAKE_CONFIG_ID, FAKE_KEY = 7, 11, 21, "key-5e6f7a8b9c0d"  # as in conftest.py
FAKE_FROM = ["+15550100001", "+15550100002"]
PUBLIC_URL = "https://voice.example.test"


async def initiate(stack: Stack, call_id: str, *, to: str = "+15550109001", config_id: int = FAKE_CONFIG_ID,
                   org: int = ORG, run_id: int = 77, **kw: Any) -> InitiateResult:
    return await stack.ask(CTL_INITIATE, InitiateRequest(
        call_id=call_id, run_id=run_id, organization_id=org, telephony_config_id=config_id, to_number=to, **kw),
        InitiateResult)


async def call_info(stack: Stack, call_id: str, org: int = ORG) -> CallInfoResult:
    return await stack.ask(CTL_CALL_INFO, CallInfoRequest(call_id=call_id, organization_id=org), CallInfoResult)


async def bind(stack: Stack, number: str, voice_url: str, *, config_id: int = FAKE_CONFIG_ID,
               org: int = ORG) -> BindNumberResult:
    return await stack.ask(CTL_BIND_NUMBER, BindNumberRequest(organization_id=org, telephony_config_id=config_id,
                                                              number=number, voice_url=voice_url), BindNumberResult)


def dials(stack: Stack) -> int:
    return sum(1 for method, path, _ in stack.fake.carrier.seen if (method, path) == ("POST", "/calls"))


# ------------------------------------------------------------------------------------------ initiate
async def test_initiate_dials_with_answer_and_status_urls_and_registers_the_leg(stack: Stack) -> None:
    res = await initiate(stack, "out00001", ring_timeout_s=25)
    call = stack.fake.carrier.calls[res.carrier_call_id]
    assert (res.from_number, res.status) == (FAKE_FROM[0], "queued")
    assert (call.to, call.from_, call.timeout) == ("+15550109001", FAKE_FROM[0], 25)
    assert call.answer_url == f"{PUBLIC_URL}/api/v1/telephony/answer/77"
    assert call.status_url == f"{PUBLIC_URL}/api/v1/telephony/{stack.fake.name}/status-callback/77"
    leg = await stack.leg("out00001") or {}
    assert (leg["direction"], leg["carrier_call_id"], leg["run_id"], leg["provider"], leg["state"]) == (
        "outbound", res.carrier_call_id, 77, stack.fake.name, "live")


async def test_requested_from_number_must_be_one_of_the_configuration(stack: Stack) -> None:
    res = await initiate(stack, "out00002", from_number="+1 (555) 010-0002")
    assert res.from_number == FAKE_FROM[1]  # the stored form is what the carrier gets
    assert stack.fake.carrier.calls[res.carrier_call_id].from_ == FAKE_FROM[1]
    with pytest.raises(BusError) as e:
        await initiate(stack, "out00003", from_number="+15550199999")
    assert (e.value.code, e.value.message) == ("invalid_request",
                                               "from_number is not one of the configuration's 2 from_numbers")
    assert all(n not in e.value.message for n in FAKE_FROM)
    assert dials(stack) == 1 and await stack.leg("out00003") is None


async def test_configuration_without_from_numbers(stack: Stack) -> None:
    stack.config.configs[FAKE_CONFIG_ID].credentials["from_numbers"] = []
    with pytest.raises(BusError) as e:
        await initiate(stack, "out00004")
    assert (e.value.code, e.value.message) == ("invalid_request", "configuration has no from_numbers")
    with pytest.raises(BusError) as e:  # the field exists: an empty list allows no caller id at all
        await initiate(stack, "out00004", from_number="+15550100001")
    assert e.value.code == "invalid_request" and "0 from_numbers" in e.value.message
    assert dials(stack) == 0


async def test_initiate_twice_dials_once(stack: Stack) -> None:
    first = await initiate(stack, "out00005")
    config_requests = stack.config.requests
    second = await initiate(stack, "out00005", to="+15550109002")
    assert second == first and dials(stack) == 1
    assert stack.config.requests == config_requests


async def test_concurrent_initiates_on_two_replicas_dial_once(stack: Stack) -> None:
    other = stack.make_service(instance_id="cc-o")
    await other.start()
    results = await asyncio.gather(*(initiate(stack, "out00006") for _ in range(4)))
    assert len({r.carrier_call_id for r in results}) == 1 and dials(stack) == 1


async def test_replay_registers_a_leg_the_first_request_did_not(stack: Stack) -> None:
    """A replica that died between dialing and registering: the replay restores the leg from its record."""
    first = await initiate(stack, "out00007")
    kv = await stack.nc.jetstream().key_value(f"{stack.subjects.prefix}_ctl_legs")
    await kv.delete("out00007")
    assert await stack.leg("out00007") is None
    assert await initiate(stack, "out00007") == first
    assert (await stack.leg("out00007") or {})["carrier_call_id"] == first.carrier_call_id


async def test_invalid_number_is_a_specific_error_and_a_retry_may_dial(stack: Stack) -> None:
    with pytest.raises(BusError) as e:
        await initiate(stack, "out00008", to="+1555-bad")
    assert e.value.code == "carrier_invalid_number" and "invalid number" in e.value.message
    assert await stack.leg("out00008") is None
    res = await initiate(stack, "out00008", to="+15550109003")  # the claim was released
    assert stack.fake.carrier.calls[res.carrier_call_id].to == "+15550109003"


async def test_wrong_api_key(stack: Stack) -> None:
    stack.config.configs[FAKE_CONFIG_ID].credentials["api_key"] = "key-wrong-1234"
    with pytest.raises(BusError) as e:
        await initiate(stack, "out00009")
    assert e.value.code == "carrier_auth_failed" and "key-wrong-1234" not in e.value.message
    assert FAKE_KEY not in e.value.message


async def test_carrier_failure_after_retries(stack: Stack) -> None:
    stack.fake.carrier.fail_next = [500, 502, 503]
    with pytest.raises(BusError) as e:
        await initiate(stack, "out0000a")
    assert e.value.code == "carrier_error" and "503" in e.value.message
    assert await stack.leg("out0000a") is None


async def test_initiate_refusals(stack: Stack) -> None:
    with pytest.raises(BusError) as e:
        await initiate(stack, "out0000b", config_id=CONFIG_ID)
    assert (e.value.code, e.value.message) == ("not_supported", "Cloudonix cannot dial")
    with pytest.raises(BusError) as e:
        await initiate(stack, "out0000b", org=ORG + 1)
    assert e.value.code == "not_found" and f"organization {ORG + 1}" in e.value.message
    with pytest.raises(BusError) as e:
        await initiate(stack, "out0000b", to="  ")
    assert e.value.code == "invalid_request" and "to_number" in e.value.message
    with pytest.raises(BusError) as e:
        await initiate(stack, "out.000b")
    assert e.value.code == "invalid_request" and "call id" in e.value.message
    await stack.register("FK7777", "out0000c", config_id=FAKE_CONFIG_ID)  # an inbound leg holds this call id
    with pytest.raises(BusError) as e:
        await initiate(stack, "out0000c")
    assert e.value.code == "conflict"
    assert dials(stack) == 0


async def test_outbound_call_is_hung_up_by_call_id(stack: Stack) -> None:
    res = await initiate(stack, "out0000d")
    hung = await stack.hangup("out0000d", run_id=77)
    assert hung.outcome == "hung_up"
    assert ("DELETE", f"/calls/{res.carrier_call_id}", 204) in stack.fake.carrier.seen
    assert (await stack.leg("out0000d") or {})["state"] == "ended"


# ------------------------------------------------------------------------------------------ call_info
async def test_call_info_by_call_id(stack: Stack) -> None:
    res = await initiate(stack, "out0000e")
    info = await call_info(stack, "out0000e")
    assert info == CallInfoResult(status="initiated", raw_status="queued", duration_s=42, price=-0.013,
                                  price_unit="USD")
    assert ("GET", f"/calls/{res.carrier_call_id}", 200) in stack.fake.carrier.seen
    await stack.hangup("out0000e", run_id=77)
    assert (await call_info(stack, "out0000e")).status == "completed"


async def test_call_info_refusals(stack: Stack) -> None:
    with pytest.raises(BusError) as e:
        await call_info(stack, "nocall01")
    assert e.value.code == "not_found" and "nocall01" in e.value.message
    await initiate(stack, "out0000f")
    with pytest.raises(BusError) as e:
        await call_info(stack, "out0000f", org=ORG + 1)
    assert e.value.code == "not_found"
    await stack.register(stack.session("ci-cx"), "out00010")
    with pytest.raises(BusError) as e:
        await call_info(stack, "out00010")
    assert (e.value.code, e.value.message) == ("not_supported", "Cloudonix cannot call_info")
    with pytest.raises(BusError) as e:
        await call_info(stack, "FK9998", org=ORG)  # a carrier id is not a call id: nothing is registered under it
    assert e.value.code == "not_found"


# ------------------------------------------------------------------------------------------ bind_number
async def test_bind_number(stack: Stack) -> None:
    url = f"{PUBLIC_URL}/api/v1/telephony/inbound/run"
    res = await bind(stack, "+15550100001", url)
    assert (res.number, res.voice_url) == ("+15550100001", url) and res.number_sid.startswith("PN")
    assert stack.fake.carrier.numbers == {"+15550100001": url}


async def test_bind_number_refusals(stack: Stack) -> None:
    with pytest.raises(BusError) as e:
        await bind(stack, "+15550100001", "ftp://x")
    assert e.value.code == "invalid_request" and "voice_url" in e.value.message
    with pytest.raises(BusError) as e:
        await bind(stack, " ", f"{PUBLIC_URL}/x")
    assert e.value.code == "invalid_request" and "number" in e.value.message
    with pytest.raises(BusError) as e:
        await bind(stack, "+15550100001", f"{PUBLIC_URL}/x", org=ORG + 1)
    assert e.value.code == "not_found"
    with pytest.raises(BusError) as e:
        await bind(stack, "+15550100001", f"{PUBLIC_URL}/x", config_id=CONFIG_ID)
    assert (e.value.code, e.value.message) == ("not_supported", "Cloudonix cannot bind_number")
    assert stack.fake.carrier.numbers == {}
