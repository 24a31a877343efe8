"""Cloudonix media framing: Twilio-compatible JSON text frames, base64 mu-law at 8 kHz.

Both directions live here so that ingress (the voicebus side) and the carrier simulator (the Cloudonix
side) cannot drift apart: the simulator builds frames with the ``carrier_*`` helpers and reads what
voicebus sends with :func:`parse_server_frame`, ingress uses :class:`TwilioCompatibleCodec`.

Decoding never raises on carrier input: a malformed frame mid-call becomes :class:`Ignored` with a
``problem`` so ingress can log it, because dropping a live caller over one bad frame is worse than
losing 20 ms of audio.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from voicebus.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voicebus.telephony.agent_stream import AudioIn, CarrierMessage, DtmfIn, Frame, Ignored, MarkIn, StopIn

SAMPLE_RATE = 8000
ENCODING = "audio/x-mulaw"
DTMF_DIGITS = frozenset("0123456789*#ABCD")
MAX_MARK_NAME = 256


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def parse_json_object(frame: Frame) -> tuple[dict[str, Any] | None, str | None]:
    """``(message, None)`` for a JSON object in a text frame, else ``(None, what was wrong)``."""
    if isinstance(frame, bytes | bytearray):
        return None, "got a binary frame"
    try:
        msg = json.loads(frame)
    except ValueError:
        return None, "got invalid JSON"
    if not isinstance(msg, dict):
        return None, "got JSON that is not an object"
    return msg, None


class TwilioCompatibleCodec:
    """One call's codec; ``stream_sid`` is echoed on every frame voicebus sends, as Twilio requires."""

    sample_rate = SAMPLE_RATE

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = stream_sid

    # ---- carrier -> voicebus
    def decode(self, frame: Frame) -> CarrierMessage:
        msg, problem = parse_json_object(frame)
        if msg is None:
            return Ignored("frame", problem)
        event = msg.get("event")
        sid = msg.get("streamSid")
        if sid is not None and sid != self.stream_sid and event in ("media", "dtmf", "mark"):
            return Ignored(str(event), "streamSid does not match the one from start")
        if event == "media":
            return self._media(msg.get("media"))
        if event == "dtmf":
            body = msg.get("dtmf")
            digit = body.get("digit") if isinstance(body, dict) else None
            if not isinstance(digit, str) or digit.upper() not in DTMF_DIGITS or len(digit) != 1:
                return Ignored("dtmf", "dtmf.digit is not one of 0-9, *, #, A-D")
            return DtmfIn(digit.upper())
        if event == "mark":
            body = msg.get("mark")
            name = body.get("name") if isinstance(body, dict) else None
            if not isinstance(name, str) or not name or len(name) > MAX_MARK_NAME:
                return Ignored("mark", "mark.name is missing or too long")
            return MarkIn(name)
        if event == "stop":
            return StopIn()
        if event in ("connected", "start"):
            return Ignored(str(event), f"unexpected {event} event after the handshake")
        if not isinstance(event, str):
            return Ignored("frame", "event is missing or not a string")
        return Ignored(event[:32])  # events this protocol may grow (e.g. keep-alives) are not errors

    @staticmethod
    def _media(body: Any) -> CarrierMessage:
        if not isinstance(body, dict):
            return Ignored("media", "media is not an object")
        track = body.get("track")
        if track is not None and track not in ("inbound", "inbound_track"):
            return Ignored("media", None)  # the caller's audio is all voicebus wants; other tracks are echoes
        payload = body.get("payload")
        if not isinstance(payload, str):
            return Ignored("media", "media.payload is missing")
        try:
            ulaw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return Ignored("media", "media.payload is not valid base64")
        if not ulaw:
            return Ignored("media", None)
        return AudioIn(ulaw_to_pcm16(ulaw))

    # ---- voicebus -> carrier
    def encode_audio(self, pcm16: bytes) -> str:
        payload = base64.b64encode(pcm16_to_ulaw(pcm16)).decode("ascii")
        return _dumps({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}})

    def encode_clear(self) -> str:
        return _dumps({"event": "clear", "streamSid": self.stream_sid})

    def encode_mark(self, name: str) -> str:
        return _dumps({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})


# --------------------------------------------------------------------------- the carrier's side (simulator, tests)
def carrier_connected() -> str:
    return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def carrier_start_message(
    *,
    stream_sid: str,
    call_sid: str,
    session: str,
    account_sid: str,
    from_number: str | None = None,
    to_number: str | None = None,
    context: str = "inbound",
    custom_parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``start`` event as a dict, for callers that alter it (the simulator's negative handshakes)."""
    start: dict[str, Any] = {
        "streamSid": stream_sid,
        "callSid": call_sid,
        "session": session,
        "accountSid": account_sid,
        "from": from_number,
        "to": to_number,
        "context": context,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": ENCODING, "sampleRate": SAMPLE_RATE, "channels": 1},
        "customParameters": custom_parameters or {},
    }
    return {"event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
            "start": {k: v for k, v in start.items() if v is not None}}


def carrier_start(**kwargs: Any) -> str:
    return _dumps(carrier_start_message(**kwargs))


def carrier_media(stream_sid: str, ulaw: bytes, seq: int, timestamp_ms: int, chunk: int | None = None) -> str:
    """``seq`` numbers every message of the stream; ``chunk`` only media (defaults to ``seq``)."""
    return _dumps({
        "event": "media",
        "sequenceNumber": str(seq),
        "streamSid": stream_sid,
        "media": {"track": "inbound", "chunk": str(seq if chunk is None else chunk), "timestamp": str(timestamp_ms),
                  "payload": base64.b64encode(ulaw).decode("ascii")},
    })


def carrier_dtmf(stream_sid: str, digit: str, seq: int = 0) -> str:
    return _dumps({"event": "dtmf", "sequenceNumber": str(seq), "streamSid": stream_sid,
                   "dtmf": {"track": "inbound_track", "digit": digit}})


def carrier_mark(stream_sid: str, name: str, seq: int = 0) -> str:
    return _dumps({"event": "mark", "sequenceNumber": str(seq), "streamSid": stream_sid, "mark": {"name": name}})


def carrier_stop(stream_sid: str, call_sid: str = "", account_sid: str = "", seq: int = 0) -> str:
    return _dumps({"event": "stop", "sequenceNumber": str(seq), "streamSid": stream_sid,
                   "stop": {"accountSid": account_sid, "callSid": call_sid}})


@dataclass(frozen=True)
class ServerMedia:
    ulaw: bytes

    @property
    def pcm16(self) -> bytes:
        return ulaw_to_pcm16(self.ulaw)


@dataclass(frozen=True)
class ServerClear:
    pass


@dataclass(frozen=True)
class ServerMark:
    name: str


@dataclass(frozen=True)
class ServerOther:
    message: dict[str, Any] | None
    problem: str | None = None


ServerMessage = ServerMedia | ServerClear | ServerMark | ServerOther


def parse_server_frame(frame: Frame) -> ServerMessage:
    """What voicebus sent to the carrier, as the carrier sees it."""
    msg, problem = parse_json_object(frame)
    if msg is None:
        return ServerOther(None, problem)
    event = msg.get("event")
    if event == "media":
        body = msg.get("media")
        payload = body.get("payload") if isinstance(body, dict) else None
        try:
            return ServerMedia(base64.b64decode(payload or "", validate=True))
        except (binascii.Error, ValueError):
            return ServerOther(msg, "media.payload is not valid base64")
    if event == "clear":
        return ServerClear()
    if event == "mark":
        body = msg.get("mark")
        name = body.get("name") if isinstance(body, dict) else None
        return ServerMark(str(name)) if name else ServerOther(msg, "mark without a name")
    return ServerOther(msg)
