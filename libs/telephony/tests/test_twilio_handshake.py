"""Twilio Media Streams openings on the per-call socket and on Agent Stream; frames come from a queue."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import ValidationError

from voicebus.bus.messages import TelephonyMatch
from voicebus.telephony.dialects.twilio_media import TwilioMediaCodec
from voicebus.telephony.providers.twilio.config import TwilioCredentials
from voicebus.telephony.providers.twilio.fake import carrier_connected, carrier_start, carrier_start_message
from voicebus.telephony.providers.twilio.handshake import agent_stream, media_socket
from voicebus.telephony.stream import CarrierDisconnected, Frame, StreamContext, StreamRefused, StreamStart
from voicebus.telephony.webhook import WebhookRequest

ACCOUNT = "AC" + "9a" * 16
CALL = "CA" + "8b" * 16
STREAM = "MZ" + "7c" * 16
TOKEN = "vbtok-single-use-abc"


class Services:
    def __init__(self, *, known: bool = True, has_credentials: bool = True, signature_ok: bool = True) -> None:
        self.known, self.has_credentials, self.signature_ok = known, has_credentials, signature_ok
        self.calls: list[tuple[str, Any]] = []

    async def match_telephony(self, organization_id: int, provider: str, account_id: str) -> TelephonyMatch | None:
        self.calls.append(("match", (organization_id, provider, account_id)))
        if not self.known:
            return None
        return TelephonyMatch(telephony_config_id=12, provider=provider, name="main", account_id=account_id,
                              has_credentials=self.has_credentials)

    async def confirm_call(self, telephony_config_id: int, carrier_call_id: str) -> bool:
        self.calls.append(("confirm", (telephony_config_id, carrier_call_id)))
        return True

    async def verify_upgrade(self, telephony_config_id: int) -> tuple[bool, str]:
        self.calls.append(("verify", telephony_config_id))
        return self.signature_ok, "" if self.signature_ok else "signature does not match"


def frames(*items: Frame | None):
    """None: the carrier disconnects. After the list the carrier stays silent."""
    queue: asyncio.Queue[Frame | None] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def receive() -> Frame:
        item = await queue.get()
        if item is None:
            raise CarrierDisconnected(1001)
        return item

    return receive


def ctx(services: Services | None = None, *, signed: bool = True, timeout_s: float = 2.0) -> StreamContext:
    headers = {"x-twilio-signature": "c2lnbmF0dXJl"} if signed else {}
    return StreamContext(params={"provider": "twilio"},
                         upgrade=WebhookRequest("GET", "wss://vb.example/api/v1/agent-stream/a1", headers),
                         organization_id=3, services=services or Services(), timeout_s=timeout_s,
                         telephony_config_id=55)


def start(**over: Any) -> str:
    args: dict[str, Any] = dict(stream_sid=STREAM, call_sid=CALL, account_sid=ACCOUNT,
                                custom_parameters={"vb_token": TOKEN, "from": "+15551230001", "to": "+15551230002"})
    args.update(over)
    return carrier_start(**args)


def start_with(mutate: Any) -> str:
    msg = carrier_start_message(stream_sid=STREAM, call_sid=CALL, account_sid=ACCOUNT,
                                custom_parameters={"vb_token": TOKEN})
    mutate(msg)
    return json.dumps(msg)


# ------------------------------------------------------------------------------------------ media socket
async def test_media_socket_success() -> None:
    s = await media_socket(frames(carrier_connected(), start()), ctx())
    assert isinstance(s, StreamStart)
    assert (s.provider, s.telephony_config_id, s.carrier_call_ref, s.stream_id) == ("twilio", 55, CALL, STREAM)
    assert isinstance(s.codec, TwilioMediaCodec) and s.codec.stream_sid == STREAM and s.codec.sample_rate == 8000
    assert (s.caller_number, s.called_number) == ("+15551230001", "+15551230002")
    assert s.gathered_context == {"twilio_call_sid": CALL, "twilio_stream_sid": STREAM}
    assert s.token == TOKEN and s.confirmed is False
    assert s.log_fields["callSid"] == CALL and s.log_fields["accountSid"] == ACCOUNT
    assert s.log_fields["customParameters"] == {"from": "+15551230001", "to": "+15551230002"}
    assert TOKEN not in json.dumps(s.log_fields) + json.dumps(s.gathered_context) + repr(s)


async def test_media_socket_without_caller_parameters() -> None:
    s = await media_socket(frames(carrier_connected(), start(custom_parameters={"vb_token": TOKEN})), ctx())
    assert (s.caller_number, s.called_number) == (None, None) and "customParameters" not in s.log_fields


@pytest.mark.parametrize(("opening", "kind", "reason"), [
    ([start()], "handshake", "Expected connected event"),
    (["not json", start()], "handshake", "Expected connected event (got invalid JSON)"),
    ([b"\x00\x01", start()], "handshake", "Expected connected event (got a binary frame)"),
    (["[1, 2]"], "handshake", "Expected connected event (got JSON that is not an object)"),
    ([carrier_connected(), carrier_connected()], "handshake", "Expected start event"),
    ([carrier_connected(), '{"event": "start"}'], "handshake", "Missing start metadata"),
    ([carrier_connected(), start(call_sid="")], "handshake", "Missing stream identifiers: callSid"),
    ([carrier_connected(), start_with(lambda m: m["start"].pop("accountSid"))], "handshake",
     "Missing stream identifiers: accountSid"),
    ([carrier_connected(), start_with(lambda m: (m["start"].pop("streamSid"), m.pop("streamSid")))], "handshake",
     "Missing stream identifiers: streamSid"),
    ([carrier_connected(), start(call_sid="CA\n1")], "handshake", "Invalid stream identifiers: callSid"),
    ([carrier_connected(), start_with(lambda m: m["start"].update(mediaFormat={"encoding": "audio/l16",
                                                                                "sampleRate": 16000,
                                                                                "channels": 1}))],
     "handshake", "Unsupported media format audio/l16/16000/1; expected audio/x-mulaw/8000/1"),
    ([carrier_connected(), start_with(lambda m: m["start"].update(customParameters=["x"]))], "handshake",
     "Invalid start.customParameters: not an object"),
    ([carrier_connected(), start_with(lambda m: m["start"].update(customParameters={"vb_token": TOKEN,
                                                                                      "big": "x" * 5000}))],
     "handshake", "start.customParameters larger than 4096 bytes"),
    ([carrier_connected(), start(custom_parameters={})], "unauthorized", "Missing media socket token"),
    ([carrier_connected(), start(custom_parameters={"vb_token": "  "})], "unauthorized", "Missing media socket token"),
    ([carrier_connected(), start(custom_parameters={"vb_token": 42})], "unauthorized", "Missing media socket token"),
    ([carrier_connected(), start(custom_parameters={"vb_token": "x" * 600})], "unauthorized",
     "Invalid media socket token"),
])
async def test_media_socket_refusals(opening: list[Frame], kind: str, reason: str) -> None:
    with pytest.raises(StreamRefused) as info:
        await media_socket(frames(*opening), ctx())
    assert (info.value.kind, info.value.reason) == (kind, reason)


async def test_media_socket_timeout_is_one_deadline_for_the_whole_opening() -> None:
    with pytest.raises(StreamRefused) as info:
        await media_socket(frames(carrier_connected()), ctx(timeout_s=0.05))
    assert (info.value.kind, info.value.reason) == ("timeout", "Handshake timeout")


async def test_media_socket_carrier_gone() -> None:
    with pytest.raises(CarrierDisconnected):
        await media_socket(frames(carrier_connected(), None), ctx())


# ------------------------------------------------------------------------------------------ agent stream
async def test_agent_stream_success_matches_the_account_and_verifies_the_upgrade() -> None:
    services = Services()
    s = await agent_stream(frames(carrier_connected(), start(custom_parameters={})), ctx(services))
    assert services.calls == [("match", (3, "twilio", ACCOUNT)), ("verify", 12)]
    assert (s.provider, s.telephony_config_id, s.carrier_call_ref, s.stream_id) == ("twilio", 12, CALL, STREAM)
    assert s.confirmed is False and s.token is None
    assert s.gathered_context == {"twilio_call_sid": CALL, "twilio_stream_sid": STREAM}


async def test_agent_stream_requires_the_signature_header_before_reading() -> None:
    services = Services()
    with pytest.raises(StreamRefused) as info:
        await agent_stream(frames(), ctx(services, signed=False))
    assert (info.value.kind, info.value.reason) == ("handshake", "Missing X-Twilio-Signature")
    assert services.calls == []


@pytest.mark.parametrize(("services", "reason"), [
    (Services(known=False), f"Unknown Twilio account: {ACCOUNT}"),
    (Services(has_credentials=False), "Twilio configuration missing auth_token"),
    (Services(signature_ok=False), "Twilio signature validation failed"),
])
async def test_agent_stream_refusals(services: Services, reason: str) -> None:
    with pytest.raises(StreamRefused) as info:
        await agent_stream(frames(carrier_connected(), start()), ctx(services))
    assert (info.value.kind, info.value.reason) == ("handshake", reason)


async def test_agent_stream_unknown_account_is_echoed_safely() -> None:
    with pytest.raises(StreamRefused) as info:
        await agent_stream(frames(carrier_connected(), start(account_sid="AC\u202eevil" + "x" * 80)),
                           ctx(Services(known=False)))
    assert info.value.reason.isascii() and len(info.value.reason) < 80


async def test_agent_stream_opening_errors_are_the_same_as_media_socket() -> None:
    with pytest.raises(StreamRefused) as info:
        await agent_stream(frames(start()), ctx())
    assert info.value.reason == "Expected connected event"


# ------------------------------------------------------------------------------------------ credentials
def test_credentials_validation() -> None:
    c = TwilioCredentials(account_sid=" AC" + "AB" * 16 + " ", auth_token="sekrit-xyz",
                          from_numbers=["+14155550100", " +14155550100"])
    assert c.account_sid == "AC" + "ab" * 16 and c.from_numbers == ["+14155550100"]
    assert "sekrit-xyz" not in repr(c) and "sekrit-xyz" not in str(c)
    with pytest.raises(ValidationError, match="'AC' followed by 32 hexadecimal digits"):
        TwilioCredentials(account_sid="AC123", auth_token="t")
    with pytest.raises(ValidationError, match=r"from_numbers\[1\] must be an E.164 number"):
        TwilioCredentials(account_sid=ACCOUNT, auth_token="t", from_numbers=["+14155550100", "4155550100"])
    with pytest.raises(ValidationError, match="auth_token"):
        TwilioCredentials(account_sid=ACCOUNT, auth_token="")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TwilioCredentials(account_sid=ACCOUNT, auth_token="t", region="us1")  # type: ignore[call-arg]
    assert TwilioCredentials(account_sid=ACCOUNT, auth_token="t").from_numbers == []


def test_ui_fields() -> None:
    from voicebus.telephony import get_spec

    spec = get_spec("twilio")
    assert spec is not None
    fields = {f.name: f for f in spec.ui_fields}
    assert (fields["account_sid"].type, fields["account_sid"].sensitive) == ("text", False)
    assert (fields["auth_token"].type, fields["auth_token"].sensitive) == ("password", True)
    assert (fields["from_numbers"].type, fields["from_numbers"].required) == ("string-array", False)
    assert spec.account_id_field == "account_sid"
