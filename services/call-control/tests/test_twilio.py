"""call-control with Twilio over real NATS: signatures made by the official ``twilio`` SDK, and the REST
actions against the simulator's Twilio API stand-in on real HTTP."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from voicebus.bus.messages import (
    BindNumberRequest,
    BindNumberResult,
    CallInfoRequest,
    CallInfoResult,
    HangupRequest,
    InitiateRequest,
    InitiateResult,
    LegRegister,
    VerifyRequest,
    VerifyResult,
)
from voicebus.bus.rpc import BusError
from voicebus.bus.subjects import CTL_BIND_NUMBER, CTL_CALL_INFO, CTL_INITIATE, CTL_VERIFY
from voicebus.call_control.service import CallControlService
from voicebus.cli.embedded import free_port
from voicebus.simulator.twilio.rest import RunningTwilioApi, run_twilio_api

if TYPE_CHECKING:
    from conftest import Stack
else:
    Stack = Any

ORG = 7
TWILIO_CONFIG_ID = 31
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-token-9c8b7a6f"
FROM = ["+14155550100", "+14155550101"]
PUBLIC_URL = "https://voice.example.test"
WEBHOOK_URL = f"{PUBLIC_URL}/api/v1/telephony/inbound/run"


@dataclass
class Twilio:
    stack: Stack
    api: RunningTwilioApi
    service: CallControlService  # this module's replica: the stack's own one does not know the stand-in's URL
    public_url: str


@pytest.fixture
async def twilio(stack: Stack) -> AsyncIterator[Twilio]:
    async with run_twilio_api(ACCOUNT_SID, AUTH_TOKEN, FROM, ring_ms=50, max_call_s=5) as api:
        stack.add_config(TWILIO_CONFIG_ID, "twilio", {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                                                      "from_numbers": FROM})
        # The callee's answer fetch and status callbacks go to a closed local port: this module tests what
        # call-control asks of Twilio, not ingress's answers.
        public_url = f"http://127.0.0.1:{free_port()}"
        svc = stack.make_service(api_urls={"twilio": api.url}, public_url=public_url, instance_id="cc-twilio")
        await svc.start()
        yield Twilio(stack, api, svc, public_url)


def sdk_signed(url: str, params: dict[str, str], token: str = AUTH_TOKEN, **headers: str) -> VerifyRequest:
    """A webhook exactly as Twilio sends it, signed by Twilio's own SDK (the independent check)."""
    signature = RequestValidator(token).compute_signature(url, params)
    body = urlencode(params).encode()
    return VerifyRequest(telephony_config_id=TWILIO_CONFIG_ID, method="POST", url=url,
                         headers={"Content-Type": "application/x-www-form-urlencoded",
                                  "X-Twilio-Signature": signature, **headers},
                         body_b64=base64.b64encode(body).decode())


def voice_params(call_sid: str = "CA" + "1" * 32) -> dict[str, str]:
    return {"AccountSid": ACCOUNT_SID, "CallSid": call_sid, "From": "+14155559999", "To": FROM[0],
            "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01"}


async def verify(stack: Stack, req: VerifyRequest) -> VerifyResult:
    return await stack.ask(CTL_VERIFY, req, VerifyResult, timeout=10)


# ------------------------------------------------------------------------------------------ verify
async def test_sdk_signed_webhook_is_valid_and_tampering_is_refused(stack: Stack, twilio: Twilio) -> None:
    req = sdk_signed(WEBHOOK_URL, voice_params())
    assert (await verify(stack, req)) == VerifyResult(valid=True, reason="", replayed=False)
    tampered = req.model_copy(update={"body_b64": base64.b64encode(
        urlencode({**voice_params(), "To": "+14155550199"}).encode()).decode()})
    res = await verify(stack, tampered)
    assert (res.valid, res.reason) == (False, "signature does not match")
    missing = req.model_copy(update={"headers": {"Content-Type": "application/x-www-form-urlencoded"}})
    assert (await verify(stack, missing)).reason == "missing X-Twilio-Signature"
    wrong_token = sdk_signed(WEBHOOK_URL, voice_params(), token="not-the-token")
    assert not (await verify(stack, wrong_token)).valid


async def test_replayed_delivery_with_the_same_idempotency_token(stack: Stack, twilio: Twilio) -> None:
    token = "a1b2c3d4-e5f6-7a8b-9c0d-idem"
    first = await verify(stack, sdk_signed(WEBHOOK_URL, voice_params(), **{"I-Twilio-Idempotency-Token": token}))
    again = await verify(stack, sdk_signed(WEBHOOK_URL, voice_params(), **{"I-Twilio-Idempotency-Token": token}))
    assert (first.valid, first.replayed) == (True, False)
    assert (again.valid, again.replayed) == (True, True)


async def test_media_socket_upgrade_signed_over_the_wss_url(stack: Stack, twilio: Twilio) -> None:
    url = "wss://voice.example.test/api/v1/telephony/media/c0ffee42"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, {})
    req = VerifyRequest(telephony_config_id=TWILIO_CONFIG_ID, method="GET", url=url,
                        headers={"X-Twilio-Signature": signature})
    assert (await verify(stack, req)).valid
    other = req.model_copy(update={"url": url.replace("c0ffee42", "c0ffee43")})
    assert not (await verify(stack, other)).valid


# ------------------------------------------------------------------------------------------ REST
async def test_initiate_creates_the_call_with_answer_and_status_urls(stack: Stack, twilio: Twilio) -> None:
    res: InitiateResult = await twilio.service.initiate(InitiateRequest(
        call_id="tw000001", run_id=91, organization_id=ORG, telephony_config_id=TWILIO_CONFIG_ID,
        to_number="+14155550177", ring_timeout_s=20))
    assert res.carrier_call_id.startswith("CA") and res.from_number == FROM[0] and res.status == "queued"
    call = twilio.api.state.calls[res.carrier_call_id]
    assert (call.to, call.from_, call.timeout_s, call.method) == ("+14155550177", FROM[0], 20, "POST")
    assert call.url == f"{twilio.public_url}/api/v1/telephony/answer/91"
    assert call.status_callback == f"{twilio.public_url}/api/v1/telephony/twilio/status-callback/91"
    assert set(call.status_callback_events) == {"initiated", "ringing", "answered", "completed"}
    leg = await stack.leg("tw000001") or {}
    assert (leg["provider"], leg["direction"], leg["carrier_call_id"]) == ("twilio", "outbound", res.carrier_call_id)
    again = await twilio.service.initiate(InitiateRequest(
        call_id="tw000001", run_id=91, organization_id=ORG, telephony_config_id=TWILIO_CONFIG_ID,
        to_number="+14155550177"))
    assert again == res and len(twilio.api.state.calls) == 1  # one call at Twilio


async def test_initiate_refusals_from_twilio(stack: Stack, twilio: Twilio) -> None:
    def req(call_id: str, **kw: Any) -> InitiateRequest:
        return InitiateRequest(call_id=call_id, run_id=92, organization_id=ORG, telephony_config_id=TWILIO_CONFIG_ID,
                               **{"to_number": "+14155550177", **kw})

    with pytest.raises(BusError) as e:
        await twilio.service.initiate(req("tw000002", to_number="0800-NOT-E164"))
    assert e.value.code == "carrier_invalid_number"
    with pytest.raises(BusError) as e:
        await twilio.service.initiate(req("tw000003", from_number="+14155550999"))
    assert e.value.code == "invalid_request" and "2 from_numbers" in e.value.message
    stack.config.configs[TWILIO_CONFIG_ID].credentials["auth_token"] = "rotated-elsewhere"
    with pytest.raises(BusError) as e:
        await twilio.service.initiate(req("tw000004"))
    assert e.value.code == "carrier_auth_failed" and "rotated-elsewhere" not in e.value.message
    assert twilio.api.state.calls == {}
    for call_id in ("tw000002", "tw000003", "tw000004"):
        assert await stack.leg(call_id) is None


async def test_confirm_call_info_and_hangup_of_an_inbound_call(stack: Stack, twilio: Twilio) -> None:
    sid = "CA" + "2" * 32
    twilio.api.state.register_inbound(sid, "+14155559999", FROM[0])
    res = await twilio.service.leg_register(_leg(sid, "tw000005", confirm=True))
    assert (res.confirmed, res.status) == (True, 200)
    info: CallInfoResult = await twilio.service.call_info(CallInfoRequest(call_id="tw000005", organization_id=ORG))
    assert (info.status, info.raw_status) == ("answered", "in-progress")
    hung = await twilio.service.hangup(_hangup("tw000005"))
    assert hung.outcome == "hung_up"
    assert [h["status"] for h in twilio.api.state.calls[sid].hangups] == ["completed"]
    info = await twilio.service.call_info(CallInfoRequest(call_id="tw000005", organization_id=ORG))
    assert info.status == "completed" and info.duration_s is not None


async def test_unknown_call_is_not_confirmed_and_its_hangup_counts_as_ended(stack: Stack, twilio: Twilio) -> None:
    sid = "CA" + "3" * 32
    res = await twilio.service.leg_register(_leg(sid, "tw000006", confirm=True))
    assert (res.confirmed, res.status) == (False, 404) and await stack.leg("tw000006") is None
    await twilio.service.leg_register(_leg(sid, "tw000006"))
    assert (await twilio.service.hangup(_hangup("tw000006"))).outcome == "already_ended"


async def test_outbound_call_hangup_while_ringing(stack: Stack, twilio: Twilio) -> None:
    twilio.api.state.ring_ms = 5000  # keep it ringing
    res = await twilio.service.initiate(InitiateRequest(
        call_id="tw000007", run_id=93, organization_id=ORG, telephony_config_id=TWILIO_CONFIG_ID,
        to_number="+14155550178"))
    hung = await twilio.service.hangup(_hangup("tw000007", run_id=93))
    assert hung.outcome == "hung_up"
    call = twilio.api.state.calls[res.carrier_call_id]
    await asyncio.wait_for(call.ended.wait(), 5)
    assert call.status in ("completed", "canceled")


async def test_bind_number_points_voice_url_at_voicebus(stack: Stack, twilio: Twilio) -> None:
    res: BindNumberResult = await twilio.service.bind_number(BindNumberRequest(
        organization_id=ORG, telephony_config_id=TWILIO_CONFIG_ID, number=FROM[1], voice_url=WEBHOOK_URL))
    assert (res.number, res.voice_url) == (FROM[1], WEBHOOK_URL) and res.number_sid.startswith("PN")
    assert twilio.api.state.number_by_e164(FROM[1]).voice_url == WEBHOOK_URL  # type: ignore[union-attr]
    with pytest.raises(BusError) as e:
        await twilio.service.bind_number(BindNumberRequest(
            organization_id=ORG, telephony_config_id=TWILIO_CONFIG_ID, number="+14155550999", voice_url=WEBHOOK_URL))
    assert e.value.code == "carrier_invalid_number" and "not on this Twilio account" in e.value.message


async def test_the_bus_subjects_reach_twilio(stack: Stack, twilio: Twilio) -> None:
    """Over NATS, through a replica configured by VOICEBUS_CARRIER_API_URLS-style overrides."""
    await stack.service.stop()  # leave only the Twilio-configured replica on the queue group
    res = await stack.ask(CTL_INITIATE, InitiateRequest(
        call_id="tw000008", run_id=94, organization_id=ORG, telephony_config_id=TWILIO_CONFIG_ID,
        to_number="+14155550179"), InitiateResult)
    info = await stack.ask(CTL_CALL_INFO, CallInfoRequest(call_id="tw000008", organization_id=ORG), CallInfoResult)
    assert res.carrier_call_id in twilio.api.state.calls and info.raw_status
    bound = await stack.ask(CTL_BIND_NUMBER, BindNumberRequest(
        organization_id=ORG, telephony_config_id=TWILIO_CONFIG_ID, number=FROM[0], voice_url=WEBHOOK_URL),
        BindNumberResult)
    assert bound.voice_url == WEBHOOK_URL


def _leg(sid: str, call_id: str, confirm: bool = False) -> LegRegister:
    return LegRegister(call_id=call_id, run_id=95, organization_id=ORG, telephony_config_id=TWILIO_CONFIG_ID,
                       carrier_call_id=sid, confirm=confirm)


def _hangup(call_id: str, run_id: int = 95) -> HangupRequest:
    return HangupRequest(call_id=call_id, run_id=run_id, organization_id=ORG, reason="agent_hangup")
