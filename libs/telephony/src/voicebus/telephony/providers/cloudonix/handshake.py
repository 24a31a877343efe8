"""Cloudonix's side of the Agent Stream handshake: ``Domain`` -> stored configuration, then
``connected`` and ``start``, then session validation.

Improvements over the reference implementation (docs/agent-stream.md lists them): the whole handshake
has one deadline instead of one per read; binary or non-JSON frames get a 4400 with a specific reason
instead of an unhandled exception (1011); the close reason names the missing identifiers; the media
format is checked, since any other encoding would be played back as noise; the matched configuration id
is returned so the run is stamped with it and later hangups use the right account's credentials.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any

from voicebus.telephony.agent_stream import (
    CLOSE_HANDSHAKE,
    CLOSE_HANDSHAKE_TIMEOUT,
    Frame,
    HandshakeError,
    HandshakeServices,
    ReceiveFrame,
    StreamStart,
    echo_safe,
)
from voicebus.telephony.providers.cloudonix.config import normalize_domain
from voicebus.telephony.providers.cloudonix.media import SAMPLE_RATE, TwilioCompatibleCodec, parse_json_object

PROVIDER = "cloudonix"
MAX_IDENTIFIER = 256
MAX_CUSTOM_PARAMETERS_BYTES = 4096
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_IDENTIFIERS = (("streamSid", "streamSid"), ("callSid", "callSid"), ("session", "session"))
_MULAW = ("audio/x-mulaw", "audio/mulaw", "audio/pcmu", "pcmu")


def _domain_from(params: Mapping[str, str]) -> str:
    raw = params.get("Domain", "")
    if not raw.strip():
        raise HandshakeError(CLOSE_HANDSHAKE, "Missing Domain query parameter")
    domain = normalize_domain(raw)
    if len(domain) > 253 or not _DOMAIN.match(domain):
        raise HandshakeError(CLOSE_HANDSHAKE, "Invalid Domain query parameter: not a domain name")
    return domain


async def _next_frame(receive: ReceiveFrame, deadline: float) -> Frame:
    """Next frame before the handshake deadline; CarrierDisconnected propagates to ingress as is."""
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise HandshakeError(CLOSE_HANDSHAKE_TIMEOUT, "Handshake timeout")
    try:
        return await asyncio.wait_for(receive(), remaining)
    except TimeoutError as e:
        raise HandshakeError(CLOSE_HANDSHAKE_TIMEOUT, "Handshake timeout") from e


def _expect_event(frame: Frame, event: str) -> dict[str, Any]:
    msg, problem = parse_json_object(frame)
    if msg is None:
        raise HandshakeError(CLOSE_HANDSHAKE, f"Expected {event} event ({problem})")
    if msg.get("event") != event:
        raise HandshakeError(CLOSE_HANDSHAKE, f"Expected {event} event")
    return msg


def _identifiers(msg: dict[str, Any], start: dict[str, Any]) -> dict[str, str]:
    values: dict[str, Any] = {key: start.get(key) for key, _ in _IDENTIFIERS}
    if values["streamSid"] in (None, ""):
        values["streamSid"] = msg.get("streamSid")  # Twilio framing repeats streamSid at the top level
    missing = [name for key, name in _IDENTIFIERS if not isinstance(values[key], str) or not values[key].strip()]
    if missing:
        raise HandshakeError(CLOSE_HANDSHAKE, "Missing stream identifiers: " + ", ".join(missing))
    invalid = [name for key, name in _IDENTIFIERS
               if len(values[key]) > MAX_IDENTIFIER or not values[key].isprintable()]
    if invalid:
        raise HandshakeError(CLOSE_HANDSHAKE, "Invalid stream identifiers: " + ", ".join(invalid))
    return {key: values[key].strip() for key, _ in _IDENTIFIERS}


def _check_media_format(fmt: Any) -> None:
    """Absent is fine (Cloudonix streams mu-law 8 kHz); anything else declared explicitly is refused."""
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise HandshakeError(CLOSE_HANDSHAKE, "Invalid start.mediaFormat: not an object")
    encoding = fmt.get("encoding")
    rate = fmt.get("sampleRate")
    channels = fmt.get("channels")
    ok_encoding = encoding is None or (isinstance(encoding, str) and encoding.lower().split(";")[0] in _MULAW)
    ok_rate = rate is None or str(rate) == str(SAMPLE_RATE)
    ok_channels = channels is None or str(channels) == "1"
    if not (ok_encoding and ok_rate and ok_channels):
        shown = echo_safe(f"{encoding}/{rate}/{channels}", 40)
        raise HandshakeError(CLOSE_HANDSHAKE, f"Unsupported media format {shown}; expected audio/x-mulaw/8000/1")


def _str_or_none(value: Any) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


class CloudonixHandshake:
    provider = PROVIDER

    async def perform(
        self,
        receive: ReceiveFrame,
        *,
        params: Mapping[str, str],
        organization_id: int,
        services: HandshakeServices,
        timeout_s: float,
    ) -> StreamStart:
        deadline = asyncio.get_running_loop().time() + timeout_s
        domain = _domain_from(params)

        match = await services.match_telephony(organization_id, PROVIDER, domain)
        if match is None:
            raise HandshakeError(CLOSE_HANDSHAKE, f"Unknown Cloudonix domain: {echo_safe(domain, 90)}")
        if not match.has_credentials:
            raise HandshakeError(CLOSE_HANDSHAKE, "Cloudonix configuration missing bearer_token")

        _expect_event(await _next_frame(receive, deadline), "connected")
        msg = _expect_event(await _next_frame(receive, deadline), "start")
        start = msg.get("start")
        if not isinstance(start, dict):
            raise HandshakeError(CLOSE_HANDSHAKE, "Missing start metadata")
        ids = _identifiers(msg, start)
        _check_media_format(start.get("mediaFormat"))

        if not await services.validate_session(match.telephony_config_id, ids["session"]):
            raise HandshakeError(CLOSE_HANDSHAKE, "Cloudonix session validation failed")

        log_fields: dict[str, Any] = {
            "session": ids["session"],
            "callSid": ids["callSid"],
            "streamSid": ids["streamSid"],
            "accountSid": start.get("accountSid"),
            "context": start.get("context"),
            "tracks": start.get("tracks"),
            "mediaFormat": start.get("mediaFormat"),
        }
        custom = start.get("customParameters")
        if isinstance(custom, dict) and custom and len(json.dumps(custom)) <= MAX_CUSTOM_PARAMETERS_BYTES:
            log_fields["customParameters"] = custom  # logged for the operator; never merged into the context
        return StreamStart(
            provider=PROVIDER,
            telephony_config_id=match.telephony_config_id,
            carrier_call_ref=ids["session"],
            stream_id=ids["streamSid"],
            codec=TwilioCompatibleCodec(ids["streamSid"]),
            caller_number=_str_or_none(start.get("from")),
            called_number=_str_or_none(start.get("to")),
            gathered_context={
                "cloudonix_session": ids["session"],
                "cloudonix_call_sid": ids["callSid"],
                "cloudonix_stream_sid": ids["streamSid"],
            },
            log_fields={k: v for k, v in log_fields.items() if v is not None},
        )


HANDSHAKE = CloudonixHandshake()
