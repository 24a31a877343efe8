"""Twilio's opening on a Media Streams socket (``connected``, then ``start``), for both ways in.

- :func:`media_socket`: the per-call socket that voicebus's own TwiML pointed Twilio at. The call and
  its configuration are known already; what proves the socket belongs to that call is the single-use
  token that TwiML put in ``<Parameter name="vb_token">`` and Twilio echoes in
  ``start.customParameters``. Ingress checks the token; this only extracts it.
- :func:`agent_stream`: ``/api/v1/agent-stream/{agent}?provider=twilio``, where the URL names only the
  agent. The account comes from ``start.accountSid`` and the upgrade's ``X-Twilio-Signature`` must
  verify with that account's auth token (call-control checks it: ingress holds no secret). The header
  is required before anything else so an unsigned stranger costs no bus round trip.

Both read all opening frames under one deadline (``ctx.timeout_s``), since ingress holds a quota slot
while they run.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from voicebus.telephony.dialects.twilio_media import (
    TwilioMediaCodec,
    check_media_format,
    expect_event,
    identifiers,
    start_body,
    str_or_none,
)
from voicebus.telephony.providers.twilio.webhook import TOKEN_PARAMETER
from voicebus.telephony.stream import ReceiveFrame, StreamContext, StreamRefused, StreamStart, echo_safe, next_frame

PROVIDER = "twilio"
MAX_CUSTOM_PARAMETERS_BYTES = 4096
MAX_TOKEN = 512
_IDENTIFIERS = ("streamSid", "callSid", "accountSid")
# customParameters voicebus's TwiML may set besides the token; anything else is logged, never trusted.
_CALLER_KEYS = ("from", "From", "caller")
_CALLED_KEYS = ("to", "To", "called")


async def _opening(receive: ReceiveFrame, ctx: StreamContext) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + ctx.timeout_s
    expect_event(await next_frame(receive, deadline), "connected")
    msg = expect_event(await next_frame(receive, deadline), "start")
    start = start_body(msg)
    ids = identifiers(msg, start, _IDENTIFIERS)
    check_media_format(start.get("mediaFormat"))
    custom = start.get("customParameters")
    if custom is None:
        custom = {}
    if not isinstance(custom, dict):
        raise StreamRefused("handshake", "Invalid start.customParameters: not an object")
    if len(json.dumps(custom)) > MAX_CUSTOM_PARAMETERS_BYTES:
        raise StreamRefused("handshake", f"start.customParameters larger than {MAX_CUSTOM_PARAMETERS_BYTES} bytes")
    return start, ids, custom


def _first(custom: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = str_or_none(custom.get(key))
        if value is not None:
            return value[:64]
    return None


def _log_fields(start: dict[str, Any], ids: dict[str, str], custom: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "callSid": ids["callSid"],
        "streamSid": ids["streamSid"],
        "accountSid": ids["accountSid"],
        "tracks": start.get("tracks"),
        "mediaFormat": start.get("mediaFormat"),
    }
    visible = {k: v for k, v in custom.items() if k != TOKEN_PARAMETER}  # the token is a credential
    if visible:
        fields["customParameters"] = visible
    return {k: v for k, v in fields.items() if v is not None}


def _start(ctx: StreamContext, config_id: int | None, start: dict[str, Any], ids: dict[str, str],
           custom: dict[str, Any], *, token: str | None) -> StreamStart:
    return StreamStart(
        provider=PROVIDER,
        telephony_config_id=config_id,
        carrier_call_ref=ids["callSid"],
        stream_id=ids["streamSid"],
        codec=TwilioMediaCodec(ids["streamSid"]),
        caller_number=_first(custom, _CALLER_KEYS),
        called_number=_first(custom, _CALLED_KEYS),
        gathered_context={"twilio_call_sid": ids["callSid"], "twilio_stream_sid": ids["streamSid"]},
        log_fields=_log_fields(start, ids, custom),
        token=token,
        confirmed=False,
    )


async def media_socket(receive: ReceiveFrame, ctx: StreamContext) -> StreamStart:
    start, ids, custom = await _opening(receive, ctx)
    token = custom.get(TOKEN_PARAMETER)
    if not isinstance(token, str) or not token.strip():
        raise StreamRefused("unauthorized", "Missing media socket token")
    if len(token) > MAX_TOKEN or not token.isprintable():
        raise StreamRefused("unauthorized", "Invalid media socket token")
    return _start(ctx, ctx.telephony_config_id, start, ids, custom, token=token.strip())


async def agent_stream(receive: ReceiveFrame, ctx: StreamContext) -> StreamStart:
    if not (ctx.upgrade.header("x-twilio-signature") or "").strip():
        raise StreamRefused("handshake", "Missing X-Twilio-Signature")
    start, ids, custom = await _opening(receive, ctx)
    account = ids["accountSid"]
    match = await ctx.services.match_telephony(ctx.organization_id, PROVIDER, account)
    if match is None:
        raise StreamRefused("handshake", f"Unknown Twilio account: {echo_safe(account, 40)}")
    if not match.has_credentials:
        raise StreamRefused("handshake", "Twilio configuration missing auth_token")
    ok, _reason = await ctx.services.verify_upgrade(match.telephony_config_id)
    if not ok:
        raise StreamRefused("handshake", "Twilio signature validation failed")
    return _start(ctx, match.telephony_config_id, start, ids, custom, token=None)
