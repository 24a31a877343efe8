"""Cloudonix Agent Stream handshake and media framing, without a socket: frames come from a queue."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct

import pytest

from voicebus.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voicebus.bus.messages import TelephonyMatch
from voicebus.telephony import get_spec
from voicebus.telephony.dialects.twilio_media import TwilioMediaCodec as TwilioCompatibleCodec
from voicebus.telephony.dialects.twilio_media_carrier import (
    ServerClear,
    ServerMark,
    ServerMedia,
    carrier_connected,
    carrier_dtmf,
    carrier_mark,
    carrier_media,
    carrier_start,
    carrier_stop,
    parse_server_frame,
)
from voicebus.telephony.stream import (
    AudioIn,
    CarrierDisconnected,
    DtmfIn,
    Frame,
    Ignored,
    MarkIn,
    MediaCodec,
    StopIn,
    StreamContext,
    StreamRefused,
    echo_safe,
)
from voicebus.telephony.webhook import WebhookRequest

HANDSHAKE = get_spec("cloudonix").stream.agent_stream  # type: ignore[union-attr]

DOMAIN = "acme.cloudonix.net"


class FakeServices:
    def __init__(self, *, known: dict[str, TelephonyMatch] | None = None, valid_sessions: set[str] | None = None):
        self.known = known if known is not None else {
            DOMAIN: TelephonyMatch(telephony_config_id=7, provider="cloudonix", name="main", account_id=DOMAIN,
                                   has_credentials=True)
        }
        self.valid = valid_sessions if valid_sessions is not None else {"sess-1"}
        self.matched: list[tuple[int, str, str]] = []
        self.validated: list[tuple[int, str]] = []

    async def match_telephony(self, organization_id: int, provider: str, account_id: str) -> TelephonyMatch | None:
        self.matched.append((organization_id, provider, account_id))
        return self.known.get(account_id)

    async def confirm_call(self, telephony_config_id: int, carrier_call_id: str) -> bool:
        self.validated.append((telephony_config_id, carrier_call_id))
        return carrier_call_id in self.valid

    async def verify_upgrade(self, telephony_config_id: int) -> tuple[bool, str]:
        raise AssertionError("Cloudonix does not sign its socket upgrade")


def frames(*items: Frame | None):
    """A receive() over fixed frames; ``None`` means the carrier disconnects; after the list it stays silent."""
    queue: asyncio.Queue[Frame | None] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def receive() -> Frame:
        item = await queue.get()
        if item is None:
            raise CarrierDisconnected(1001)
        return item

    return receive


def start_frame(**overrides: object) -> str:
    args = dict(stream_sid="MZ1", call_sid="CA1", session="sess-1", account_sid="acme", context="inbound",
                from_number="+15550001",
                to_number="+15550002")
    args.update(overrides)
    return carrier_start(**args)  # type: ignore[arg-type]


async def perform(receive, params: dict[str, str] | None = None, services: FakeServices | None = None,
                  timeout_s: float = 2.0):
    ctx = StreamContext(params={"Domain": "acme"} if params is None else params,
                        upgrade=WebhookRequest("GET", "wss://voicebus.example/api/v1/agent-stream/x", {}),
                        organization_id=3, services=services or FakeServices(), timeout_s=timeout_s)
    return await HANDSHAKE(receive, ctx)


async def refused(receive, **kw: object) -> StreamRefused:
    with pytest.raises(StreamRefused) as info:
        await perform(receive, **kw)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------------------------------------ handshake
async def test_success_returns_everything_the_run_needs():
    services = FakeServices()
    start = await perform(frames(carrier_connected(), start_frame(custom_parameters={"lang": "en"})),
                          services=services)
    assert services.matched == [(3, "cloudonix", DOMAIN)]
    assert services.validated == [(7, "sess-1")]
    assert start.provider == "cloudonix"
    assert start.telephony_config_id == 7
    assert start.carrier_call_ref == "sess-1"
    assert start.stream_id == "MZ1"
    assert (start.caller_number, start.called_number) == ("+15550001", "+15550002")
    assert start.gathered_context == {"cloudonix_session": "sess-1", "cloudonix_call_sid": "CA1",
                                      "cloudonix_stream_sid": "MZ1"}
    assert start.log_fields["session"] == "sess-1"
    assert start.log_fields["callSid"] == "CA1"
    assert start.log_fields["streamSid"] == "MZ1"
    assert start.log_fields["accountSid"] == "acme"
    assert start.log_fields["context"] == "inbound"
    assert start.log_fields["tracks"] == ["inbound"]
    assert start.log_fields["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert start.log_fields["customParameters"] == {"lang": "en"}
    assert isinstance(start.codec, MediaCodec)
    assert start.codec.sample_rate == 8000


@pytest.mark.parametrize("params", [{}, {"Domain": ""}, {"Domain": "   "}])
async def test_missing_domain(params):
    services = FakeServices()
    e = await refused(frames(), params=params, services=services)
    assert (e.kind, e.reason) == ("handshake", "Missing Domain query parameter")
    assert services.matched == []  # refused before asking config


async def test_invalid_domain():
    e = await refused(frames(), params={"Domain": "acme/../x"})
    assert (e.kind, e.reason) == ("handshake", "Invalid Domain query parameter: not a domain name")


async def test_unknown_domain_is_normalized_in_the_reason():
    e = await refused(frames(), params={"Domain": "Other."})
    assert (e.kind, e.reason) == ("handshake", "Unknown Cloudonix domain: other.cloudonix.net")


async def test_configuration_without_bearer_token():
    services = FakeServices(known={DOMAIN: TelephonyMatch(telephony_config_id=7, provider="cloudonix", name="x",
                                                          account_id=DOMAIN, has_credentials=False)})
    e = await refused(frames(carrier_connected(), start_frame()), services=services)
    assert (e.kind, e.reason) == ("handshake", "Cloudonix configuration missing bearer_token")


@pytest.mark.parametrize(("first", "reason"), [
    (json.dumps({"event": "start"}), "Expected connected event"),
    (json.dumps({"hello": 1}), "Expected connected event"),
    (b"\x00\x01binary", "Expected connected event (got a binary frame)"),
    ("not json{", "Expected connected event (got invalid JSON)"),
    ("[1, 2]", "Expected connected event (got JSON that is not an object)"),
])
async def test_bad_connected(first, reason):
    e = await refused(frames(first, start_frame()))
    assert (e.kind, e.reason) == ("handshake", reason)


@pytest.mark.parametrize(("second", "reason"), [
    (json.dumps({"event": "media"}), "Expected start event"),
    (b"\xff", "Expected start event (got a binary frame)"),
    ("{{", "Expected start event (got invalid JSON)"),
    (json.dumps({"event": "start"}), "Missing start metadata"),
    (json.dumps({"event": "start", "start": "x"}), "Missing start metadata"),
])
async def test_bad_start(second, reason):
    e = await refused(frames(carrier_connected(), second))
    assert (e.kind, e.reason) == ("handshake", reason)


async def test_missing_identifiers_are_named():
    msg = {"event": "start", "start": {"callSid": "CA1", "session": "", "accountSid": "acme"}}
    e = await refused(frames(carrier_connected(), json.dumps(msg)))
    assert (e.kind, e.reason) == ("handshake", "Missing stream identifiers: streamSid, session")


async def test_stream_sid_may_come_from_the_top_level():
    msg = {"event": "start", "streamSid": "MZtop", "start": {"callSid": "CA1", "session": "sess-1"}}
    start = await perform(frames(carrier_connected(), json.dumps(msg)))
    assert start.stream_id == "MZtop"


async def test_absurd_identifiers_are_refused():
    e = await refused(frames(carrier_connected(), start_frame(call_sid="x" * 1000)))
    assert (e.kind, e.reason) == ("handshake", "Invalid stream identifiers: callSid")


async def test_unsupported_media_format():
    msg = json.loads(start_frame())
    msg["start"]["mediaFormat"] = {"encoding": "audio/l16", "sampleRate": 16000, "channels": 1}
    e = await refused(frames(carrier_connected(), json.dumps(msg)))
    assert e.kind == "handshake"
    assert e.reason == "Unsupported media format audio/l16/16000/1; expected audio/x-mulaw/8000/1"


async def test_session_validation_failed():
    services = FakeServices(valid_sessions=set())
    e = await refused(frames(carrier_connected(), start_frame()), services=services)
    assert (e.kind, e.reason) == ("handshake", "Cloudonix session validation failed")
    assert services.validated == [(7, "sess-1")]


async def test_services_errors_propagate_as_is():
    class Down(FakeServices):
        async def confirm_call(self, telephony_config_id: int, carrier_call_id: str) -> bool:
            raise StreamRefused("internal", "Internal server error")

    e = await refused(frames(carrier_connected(), start_frame()), services=Down())
    assert (e.kind, e.reason) == ("internal", "Internal server error")


@pytest.mark.parametrize("sent", [(), (carrier_connected(),)])
async def test_handshake_timeout_is_one_overall_deadline(sent):
    loop = asyncio.get_running_loop()
    began = loop.time()
    e = await refused(frames(*sent), timeout_s=0.3)
    elapsed = loop.time() - began
    assert (e.kind, e.reason) == ("timeout", "Handshake timeout")
    assert 0.25 <= elapsed < 2.0


async def test_disconnect_during_handshake_propagates():
    with pytest.raises(CarrierDisconnected):
        await perform(frames(carrier_connected(), None))


def test_agent_stream_is_found_through_the_registry():
    spec = get_spec("cloudonix")
    assert spec is not None and spec.supports_agent_stream and "agent_stream" in spec.capabilities
    assert get_spec("vonage").supports_agent_stream is False  # type: ignore[union-attr]


def test_echo_safe_strips_control_characters_and_long_values():
    assert echo_safe("ok-name_1.2") == "ok-name_1.2"
    assert echo_safe("a\nb\x00c") == "a?b?c"
    assert echo_safe("é") == "?"
    long = echo_safe("y" * 100)
    assert len(long) == 48 and long.endswith("...")


# ------------------------------------------------------------------------------------------------ media
def tone(n_samples: int, amplitude: int = 8000) -> bytes:
    return b"".join(struct.pack("<h", int(amplitude * math.sin(2 * math.pi * 440 * i / 8000)))
                    for i in range(n_samples))


def test_decode_media_to_pcm16():
    codec = TwilioCompatibleCodec("MZ1")
    ulaw = pcm16_to_ulaw(tone(160))
    msg = codec.decode(carrier_media("MZ1", ulaw, seq=2, timestamp_ms=20))
    assert isinstance(msg, AudioIn)
    assert msg.pcm16 == ulaw_to_pcm16(ulaw)
    assert len(msg.pcm16) == 320


def test_media_round_trip_both_directions():
    codec = TwilioCompatibleCodec("MZ1")
    pcm = tone(160)
    out = json.loads(codec.encode_audio(pcm))
    assert out["event"] == "media" and out["streamSid"] == "MZ1" and set(out) == {"event", "streamSid", "media"}
    parsed = parse_server_frame(codec.encode_audio(pcm))
    assert isinstance(parsed, ServerMedia)
    assert parsed.ulaw == pcm16_to_ulaw(pcm)
    assert len(parsed.ulaw) == 160  # 20 ms of mu-law at 8 kHz
    # mu-law is lossy, but a decoded frame survives a second trip unchanged, and stays close to the source
    back = parsed.pcm16
    assert pcm16_to_ulaw(back) == parsed.ulaw
    src = struct.unpack("<160h", pcm)
    dst = struct.unpack("<160h", back)
    assert max(abs(a - b) for a, b in zip(src, dst, strict=True)) < 300


def test_odd_pcm_is_rejected_not_garbled():
    with pytest.raises(ValueError):
        TwilioCompatibleCodec("MZ1").encode_audio(b"\x00\x01\x02")


def test_clear_and_mark_frames():
    codec = TwilioCompatibleCodec("MZ9")
    assert json.loads(codec.encode_clear()) == {"event": "clear", "streamSid": "MZ9"}
    assert json.loads(codec.encode_mark("m1")) == {"event": "mark", "streamSid": "MZ9", "mark": {"name": "m1"}}
    assert parse_server_frame(codec.encode_clear()) == ServerClear()
    assert parse_server_frame(codec.encode_mark("m1")) == ServerMark("m1")


def test_decode_events():
    codec = TwilioCompatibleCodec("MZ1")
    assert codec.decode(carrier_dtmf("MZ1", "5")) == DtmfIn("5")
    assert codec.decode(carrier_dtmf("MZ1", "#")) == DtmfIn("#")
    assert codec.decode(carrier_mark("MZ1", "greeting-end")) == MarkIn("greeting-end")
    assert codec.decode(carrier_stop("MZ1", "CA1", "acme")) == StopIn()


@pytest.mark.parametrize(("frame", "problem"), [
    (b"\x00\x01", "got a binary frame"),
    ("nope", "got invalid JSON"),
    (carrier_dtmf("MZ1", "x"), "dtmf.digit is not one of 0-9, *, #, A-D"),
    (carrier_dtmf("MZ1", "12"), "dtmf.digit is not one of 0-9, *, #, A-D"),
    (json.dumps({"event": "media", "media": {"payload": "!!!notbase64"}}), "media.payload is not valid base64"),
    (json.dumps({"event": "media", "media": {}}), "media.payload is missing"),
    (json.dumps({"event": "media", "streamSid": "other", "media": {"payload": "AAAA"}}),
     "streamSid does not match the one from start"),
    (json.dumps({"event": "mark", "mark": {}}), "mark.name is missing or too long"),
    (carrier_connected(), "unexpected connected event after the handshake"),
    (json.dumps({"no": "event"}), "event is missing or not a string"),
])
def test_malformed_frames_are_ignored_with_a_reason(frame, problem):
    msg = TwilioCompatibleCodec("MZ1").decode(frame)
    assert isinstance(msg, Ignored)
    assert msg.problem == problem


def test_outbound_track_and_unknown_events_are_ignored_silently():
    codec = TwilioCompatibleCodec("MZ1")
    outbound = json.dumps({"event": "media", "media": {"track": "outbound",
                                                       "payload": base64.b64encode(b"\xff" * 160).decode()}})
    assert codec.decode(outbound) == Ignored("media", None)
    assert codec.decode(json.dumps({"event": "keepalive"})) == Ignored("keepalive", None)
