"""Twilio Media Streams framing, the carrier's side: what Twilio or Cloudonix send, and how they read
what voicebus sends. For the simulator and tests only; no service imports it.

Frames are written from Twilio's documentation, not from the voicebus codec, so a test that feeds
these to :class:`~voicebus.telephony.dialects.twilio_media.TwilioMediaCodec` checks the codec against
the protocol rather than against itself.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from voicebus.audio import ulaw_to_pcm16

SAMPLE_RATE = 8000
ENCODING = "audio/x-mulaw"


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def carrier_connected() -> str:
    return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def carrier_start_message(
    *,
    stream_sid: str,
    call_sid: str,
    account_sid: str,
    session: str | None = None,
    from_number: str | None = None,
    to_number: str | None = None,
    context: str | None = None,
    custom_parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``start`` event as a dict, for callers that alter it (negative handshakes).

    ``session``, ``from``, ``to`` and ``context`` are Cloudonix's additions to Twilio's ``start``.
    """
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


def parse_server_frame(frame: str | bytes) -> ServerMessage:
    """What voicebus sent to the carrier, as the carrier sees it."""
    if isinstance(frame, bytes | bytearray):
        return ServerOther(None, "got a binary frame")
    try:
        msg = json.loads(frame)
    except ValueError:
        return ServerOther(None, "got invalid JSON")
    if not isinstance(msg, dict):
        return ServerOther(None, "got JSON that is not an object")
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
