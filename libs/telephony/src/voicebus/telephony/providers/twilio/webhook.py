"""Twilio's webhook formats: inbound voice webhooks, status callbacks (call and Stream), and TwiML.

Twilio posts ``application/x-www-form-urlencoded`` bodies with documented field names (``CallSid``,
``AccountSid``, ``From``, ``To``, ``Direction``, ``CallStatus``, ...). The answer is TwiML: for a call
voicebus takes, ``<Connect><Stream>`` pointing at the per-call media socket. ``<Stream url>`` must not
carry a query string, so the socket's single-use token rides a ``<Parameter>`` and comes back in the
``start`` frame's ``customParameters`` (see :mod:`.handshake`).

Markup is built with :mod:`xml.etree.ElementTree`, never by string formatting, so a caller-controlled
value (a refusal message, a URL) cannot inject TwiML verbs.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from voicebus.telephony.calls import CallStatus
from voicebus.telephony.webhook import (
    MAX_WEBHOOK_BODY,
    Direction,
    InboundCall,
    Markup,
    MediaSocket,
    StatusUpdate,
    WebhookParseError,
    WebhookRequest,
)

PROVIDER = "twilio"
TOKEN_PARAMETER = "vb_token"
MAX_FIELD = 256  # Twilio's values are SIDs, numbers, country codes and short words
_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")

# CallStatus values (https://www.twilio.com/docs/voice/api/call-resource#call-status-values) and the
# StatusCallbackEvent words, mapped onto voicebus's normalized vocabulary.
CALL_STATUS: dict[str, CallStatus] = {
    "queued": "initiated",
    "initiated": "initiated",
    "ringing": "ringing",
    "in-progress": "answered",
    "answered": "answered",
    "completed": "completed",
    "busy": "busy",
    "no-answer": "no-answer",
    "failed": "failed",
    "canceled": "canceled",
}
# <Stream statusCallback> events (https://www.twilio.com/docs/voice/twiml/stream#statuscallback).
STREAM_EVENT: dict[str, CallStatus] = {
    "stream-started": "answered",
    "stream-stopped": "completed",
    "stream-error": "failed",
}
_INBOUND_FIELDS = ("FromCountry", "ToCountry", "CallStatus", "ApiVersion", "CallerName")
_STATUS_FIELDS = ("CallStatus", "StreamEvent", "StreamSid", "StreamError", "SequenceNumber", "Timestamp",
                  "CallbackSource", "AnsweredBy", "SipResponseCode", "ErrorCode")


def normalize_status(raw: str) -> CallStatus | None:
    return CALL_STATUS.get(raw.strip().lower())


def _bounded(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    v = value.strip()
    if len(v) > MAX_FIELD:
        raise WebhookParseError(f"Twilio webhook field {name} is longer than {MAX_FIELD} characters")
    return v or None


def _form(req: WebhookRequest) -> dict[str, str]:
    if len(req.body) > MAX_WEBHOOK_BODY:
        raise WebhookParseError(f"Twilio webhook body is larger than {MAX_WEBHOOK_BODY} bytes")
    if req.content_type not in ("application/x-www-form-urlencoded", ""):
        raise WebhookParseError("Twilio webhooks are application/x-www-form-urlencoded, got "
                                f"{req.content_type[:60]!r}")
    return req.form()


def _required(form: dict[str, str], name: str, what: str) -> str:
    value = _bounded(form.get(name), name)
    if not value:
        raise WebhookParseError(f"Twilio {what} is missing {name}")
    return value


class TwilioWebhooks:
    """The :class:`~voicebus.telephony.webhook.WebhookDialect` of Twilio (stateless)."""

    # Twilio's seed path: POST /api/v1/telephony/twiml is the same answer webhook as inbound/run.
    aliases = {"twiml": "answer"}

    def detect(self, req: WebhookRequest) -> bool:
        try:
            if req.header("x-twilio-signature") or req.header("i-twilio-idempotency-token"):
                return True
            if len(req.body) > MAX_WEBHOOK_BODY:
                return False
            form = req.form()
            account = form.get("AccountSid", "")
            return bool(_ACCOUNT_SID.match(account) and form.get("CallSid") and form.get("ApiVersion"))
        except Exception:  # detection must never take a request down: it is only "not mine"
            return False

    def parse_inbound(self, req: WebhookRequest) -> InboundCall:
        form = _form(req)
        call_sid = _required(form, "CallSid", "voice webhook")
        account_sid = _required(form, "AccountSid", "voice webhook")
        if not _ACCOUNT_SID.match(account_sid):
            raise WebhookParseError("Twilio voice webhook AccountSid is not an Account SID (AC + 32 hex digits)")
        raw_direction = (_bounded(form.get("Direction"), "Direction") or "inbound").lower()
        direction: Direction = "inbound" if raw_direction == "inbound" else "outbound"
        fields: dict[str, Any] = {"CallSid": call_sid, "AccountSid": account_sid, "Direction": raw_direction}
        for name in _INBOUND_FIELDS:
            value = _bounded(form.get(name), name)
            if value is not None:
                fields[name] = value
        idem = _bounded(req.header("i-twilio-idempotency-token"), "I-Twilio-Idempotency-Token")
        return InboundCall(
            provider=PROVIDER,
            account_id=account_sid,
            carrier_call_id=call_sid,
            from_number=_bounded(form.get("From"), "From"),
            to_number=_bounded(form.get("To"), "To"),
            direction=direction,
            idempotency_key=idem,
            fields=fields,
        )

    def answer_stream(self, socket: MediaSocket, call: InboundCall | None) -> Markup:
        response = ET.Element("Response")
        connect = ET.SubElement(response, "Connect")
        attrs = {"url": socket.url}
        if socket.status_url:
            attrs["statusCallback"] = socket.status_url
            attrs["statusCallbackMethod"] = "POST"
        stream = ET.SubElement(connect, "Stream", attrs)
        ET.SubElement(stream, "Parameter", {"name": TOKEN_PARAMETER, "value": socket.token})
        return _markup(response)

    def answer_refusal(self, message: str) -> Markup:
        response = ET.Element("Response")
        say = ET.SubElement(response, "Say")
        say.text = message
        ET.SubElement(response, "Hangup")
        return _markup(response)

    def parse_status(self, req: WebhookRequest) -> StatusUpdate:
        form = _form(req)
        call_sid = _required(form, "CallSid", "status callback")
        stream_event = _bounded(form.get("StreamEvent"), "StreamEvent")
        if stream_event is not None:
            raw = stream_event
            status = STREAM_EVENT.get(stream_event.lower())
        else:
            raw = _required(form, "CallStatus", "status callback")
            status = normalize_status(raw)
        duration = _duration(form)
        fields: dict[str, Any] = {}
        for name in _STATUS_FIELDS:
            value = _bounded(form.get(name), name)
            if value is not None:
                fields[name] = value
        return StatusUpdate(carrier_call_id=call_sid, status=status, raw_status=raw, duration_s=duration,
                            fields=fields)


def _duration(form: dict[str, str]) -> int | None:
    for name in ("CallDuration", "Duration"):
        value = (form.get(name) or "").strip()
        if value:
            if not value.isdigit() or len(value) > 9:
                raise WebhookParseError(f"Twilio status callback {name} is not a whole number of seconds")
            return int(value)
    return None


def _markup(root: ET.Element) -> Markup:
    body = ET.tostring(root, encoding="unicode", short_empty_elements=True)
    return Markup(body='<?xml version="1.0" encoding="UTF-8"?>' + body, media_type="application/xml")


DIALECT = TwilioWebhooks()
