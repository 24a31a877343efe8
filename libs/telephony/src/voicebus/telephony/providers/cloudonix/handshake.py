"""Cloudonix's side of the Agent Stream handshake: ``Domain`` -> stored configuration, then
``connected`` and ``start`` (Twilio Media Streams framing plus ``session``), then session confirmation.

Improvements over the reference implementation (docs/agent-stream.md lists them): the whole handshake
has one deadline instead of one per read; binary or non-JSON frames get a specific refusal instead of
an unhandled exception; the reason names the missing identifiers; the media format is checked; the
matched configuration id is returned so the run is stamped with it and later hangups use the right
account's credentials.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any

from voicebus.telephony.dialects.twilio_media import (
    TwilioMediaCodec,
    check_media_format,
    expect_event,
    identifiers,
    start_body,
    str_or_none,
)
from voicebus.telephony.providers.cloudonix.config import normalize_domain
from voicebus.telephony.stream import ReceiveFrame, StreamContext, StreamRefused, StreamStart, echo_safe, next_frame

PROVIDER = "cloudonix"
MAX_CUSTOM_PARAMETERS_BYTES = 4096
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_IDENTIFIERS = ("streamSid", "callSid", "session")


def _domain_from(params: Mapping[str, str]) -> str:
    raw = params.get("Domain", "")
    if not raw.strip():
        raise StreamRefused("handshake", "Missing Domain query parameter")
    domain = normalize_domain(raw)
    if len(domain) > 253 or not _DOMAIN.match(domain):
        raise StreamRefused("handshake", "Invalid Domain query parameter: not a domain name")
    return domain


async def agent_stream(receive: ReceiveFrame, ctx: StreamContext) -> StreamStart:
    deadline = asyncio.get_running_loop().time() + ctx.timeout_s
    domain = _domain_from(ctx.params)

    match = await ctx.services.match_telephony(ctx.organization_id, PROVIDER, domain)
    if match is None:
        raise StreamRefused("handshake", f"Unknown Cloudonix domain: {echo_safe(domain, 90)}")
    if not match.has_credentials:
        raise StreamRefused("handshake", "Cloudonix configuration missing bearer_token")

    expect_event(await next_frame(receive, deadline), "connected")
    msg = expect_event(await next_frame(receive, deadline), "start")
    start = start_body(msg)
    ids = identifiers(msg, start, _IDENTIFIERS)
    check_media_format(start.get("mediaFormat"))

    if not await ctx.services.confirm_call(match.telephony_config_id, ids["session"]):
        raise StreamRefused("handshake", "Cloudonix session validation failed")

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
        codec=TwilioMediaCodec(ids["streamSid"]),
        caller_number=str_or_none(start.get("from")),
        called_number=str_or_none(start.get("to")),
        gathered_context={
            "cloudonix_session": ids["session"],
            "cloudonix_call_sid": ids["callSid"],
            "cloudonix_stream_sid": ids["streamSid"],
        },
        log_fields={k: v for k, v in log_fields.items() if v is not None},
        confirmed=True,
    )
