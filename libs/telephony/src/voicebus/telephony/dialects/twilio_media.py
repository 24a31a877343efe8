"""Twilio Media Streams framing, voicebus's side: JSON text frames, base64 mu-law at 8 kHz.

Used by every carrier that speaks it (Twilio, Cloudonix). The carrier's side of the same framing is in
:mod:`voicebus.telephony.dialects.twilio_media_carrier` (simulator and tests only).

Decoding never raises on carrier input: a malformed frame mid-call becomes :class:`Ignored` with a
``problem`` so ingress can log it, because dropping a live caller over one bad frame is worse than
losing 20 ms of audio.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from voicebus.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voicebus.telephony.stream import (
    AudioIn,
    CarrierMessage,
    DtmfIn,
    Frame,
    Ignored,
    MarkIn,
    StopIn,
    StreamRefused,
    echo_safe,
)

SAMPLE_RATE = 8000
ENCODING = "audio/x-mulaw"
DTMF_DIGITS = frozenset("0123456789*#ABCD")
MAX_MARK_NAME = 256
MAX_IDENTIFIER = 256
_MULAW = ("audio/x-mulaw", "audio/mulaw", "audio/pcmu", "pcmu")


def dumps(obj: dict[str, Any]) -> str:
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


# --------------------------------------------------------------------------- handshake helpers
def expect_event(frame: Frame, event: str) -> dict[str, Any]:
    msg, problem = parse_json_object(frame)
    if msg is None:
        raise StreamRefused("handshake", f"Expected {event} event ({problem})")
    if msg.get("event") != event:
        raise StreamRefused("handshake", f"Expected {event} event")
    return msg


def start_body(msg: dict[str, Any]) -> dict[str, Any]:
    start = msg.get("start")
    if not isinstance(start, dict):
        raise StreamRefused("handshake", "Missing start metadata")
    return start


def identifiers(msg: dict[str, Any], start: dict[str, Any], keys: tuple[str, ...]) -> dict[str, str]:
    """The named identifiers of ``start`` (``streamSid`` may also sit at the top level), checked."""
    values: dict[str, Any] = {key: start.get(key) for key in keys}
    if "streamSid" in values and values["streamSid"] in (None, ""):
        values["streamSid"] = msg.get("streamSid")  # Twilio framing repeats streamSid at the top level
    missing = [key for key in keys if not isinstance(values[key], str) or not values[key].strip()]
    if missing:
        raise StreamRefused("handshake", "Missing stream identifiers: " + ", ".join(missing))
    invalid = [key for key in keys if len(values[key]) > MAX_IDENTIFIER or not values[key].isprintable()]
    if invalid:
        raise StreamRefused("handshake", "Invalid stream identifiers: " + ", ".join(invalid))
    return {key: values[key].strip() for key in keys}


def check_media_format(fmt: Any) -> None:
    """Absent is fine (mu-law 8 kHz is the default); anything else declared explicitly is refused,
    since any other encoding would be played back as noise."""
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise StreamRefused("handshake", "Invalid start.mediaFormat: not an object")
    encoding = fmt.get("encoding")
    rate = fmt.get("sampleRate")
    channels = fmt.get("channels")
    ok_encoding = encoding is None or (isinstance(encoding, str) and encoding.lower().split(";")[0] in _MULAW)
    ok_rate = rate is None or str(rate) == str(SAMPLE_RATE)
    ok_channels = channels is None or str(channels) == "1"
    if not (ok_encoding and ok_rate and ok_channels):
        shown = echo_safe(f"{encoding}/{rate}/{channels}", 40)
        raise StreamRefused("handshake", f"Unsupported media format {shown}; expected audio/x-mulaw/8000/1")


def str_or_none(value: Any) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


# --------------------------------------------------------------------------- the codec
class TwilioMediaCodec:
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
        return dumps({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}})

    def encode_clear(self) -> str:
        return dumps({"event": "clear", "streamSid": self.stream_sid})

    def encode_mark(self, name: str) -> str:
        return dumps({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})
