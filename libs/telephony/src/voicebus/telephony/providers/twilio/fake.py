"""Twilio's side, for the simulator and tests: what Twilio sends and how it reads what voicebus sends.

- Media Streams frames: re-exported from :mod:`voicebus.telephony.dialects.twilio_media_carrier`.
- Webhook bodies with the fields Twilio documents for voice webhooks
  (https://www.twilio.com/docs/usage/webhooks/voice-webhooks), call status callbacks
  (https://www.twilio.com/docs/voice/api/call-resource#statuscallback) and ``<Stream>`` status callbacks
  (https://www.twilio.com/docs/voice/twiml/stream#statuscallback).
- Signing with the official ``twilio`` SDK (``RequestValidator.compute_signature``), imported lazily so
  only tests and the simulator need the package. This module never imports voicebus's verifier or
  webhook dialect: it is the independent side those are checked against.
- TwiML read the way Twilio reads it (``xml.etree``), REST resources as Twilio answers them.
- ``CONTRACT``: this carrier's kit for the provider contract suite.

Services never import this module (``registry.load_fake("twilio")``).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from pydantic import BaseModel

from voicebus.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voicebus.telephony.calls import BindResult, CallInfo, DialRequest
from voicebus.telephony.contract import ContractKit, Exchange, MarkupTarget, RestCase, SentFrame, StreamOpening
from voicebus.telephony.dialects.twilio_media_carrier import (
    ServerClear,
    ServerMark,
    ServerMedia,
    ServerMessage,
    ServerOther,
    carrier_connected,
    carrier_dtmf,
    carrier_mark,
    carrier_media,
    carrier_start,
    carrier_start_message,
    carrier_stop,
    parse_server_frame,
)
from voicebus.telephony.providers.twilio.config import TwilioCredentials
from voicebus.telephony.stream import Frame
from voicebus.telephony.webhook import Markup, WebhookRequest

__all__ = [
    "CONTRACT", "ServerClear", "ServerMark", "ServerMedia", "ServerMessage", "ServerOther", "Twiml",
    "call_resource", "carrier_connected", "carrier_dtmf", "carrier_mark", "carrier_media", "carrier_start",
    "carrier_start_message", "carrier_stop", "inbound_form", "new_sid", "parse_server_frame", "read_twiml",
    "sign", "signed_form", "signed_json", "signed_upgrade", "status_form", "stream_status_form",
]

API_VERSION = "2010-04-01"
FORM = "application/x-www-form-urlencoded"
TWILIO_UA = "TwilioProxy/1.1"


def new_sid(prefix: str) -> str:
    """A SID of Twilio's shape: two letters and 32 lower-case hex digits (CA call, MZ stream, PN number)."""
    return prefix + secrets.token_hex(16)


# --------------------------------------------------------------------------- webhook bodies
def inbound_form(*, call_sid: str, account_sid: str, from_number: str, to_number: str,
                 direction: str = "inbound", call_status: str = "ringing", from_country: str = "US",
                 to_country: str = "US", caller_name: str | None = None, **extra: str) -> dict[str, str]:
    """The body of Twilio's voice webhook (the number's VoiceUrl, or a call's Url once answered)."""
    form = {
        "AccountSid": account_sid,
        "ApiVersion": API_VERSION,
        "CallSid": call_sid,
        "CallStatus": call_status,
        "CallToken": "",
        "Called": to_number,
        "CalledCountry": to_country,
        "Caller": from_number,
        "CallerCountry": from_country,
        "Direction": direction,
        "From": from_number,
        "FromCountry": from_country,
        "To": to_number,
        "ToCountry": to_country,
    }
    if caller_name is not None:
        form["CallerName"] = caller_name
    form.update(extra)
    return form


def status_form(*, call_sid: str, account_sid: str, call_status: str, from_number: str = "+15005550006",
                to_number: str = "+14155550100", direction: str = "outbound-api", duration_s: int | None = None,
                sequence: int = 0, **extra: str) -> dict[str, str]:
    """A call's StatusCallback; ``CallDuration`` (and ``Duration``, in minutes) come with ``completed``."""
    form = {
        "AccountSid": account_sid,
        "ApiVersion": API_VERSION,
        "CallSid": call_sid,
        "CallStatus": call_status,
        "CallbackSource": "call-progress-events",
        "Called": to_number,
        "Caller": from_number,
        "Direction": direction,
        "From": from_number,
        "SequenceNumber": str(sequence),
        "Timestamp": "Mon, 16 Aug 2021 03:45:01 +0000",
        "To": to_number,
    }
    if duration_s is not None:
        form["CallDuration"] = str(duration_s)
        form["Duration"] = str(max(1, -(-duration_s // 60)))
    form.update(extra)
    return form


def stream_status_form(*, call_sid: str, account_sid: str, stream_sid: str, event: str,
                       error: str | None = None) -> dict[str, str]:
    """A ``<Stream statusCallback>`` request: StreamEvent is stream-started, stream-stopped or stream-error."""
    form = {
        "AccountSid": account_sid,
        "CallSid": call_sid,
        "StreamSid": stream_sid,
        "StreamName": stream_sid,
        "StreamEvent": event,
        "Timestamp": "2021-08-16T03:45:01.000Z",
    }
    if error is not None:
        form["StreamError"] = error
    return form


# --------------------------------------------------------------------------- signing (official SDK)
def sign(auth_token: str, url: str, params: Mapping[str, Any] | None, algorithm: str | None = None) -> str:
    from twilio.request_validator import RequestValidator  # tests and the simulator only

    return RequestValidator(auth_token).compute_signature(url, params or {}, algorithm)


def _headers(signature: str, content_type: str | None, *, algorithm: str | None, idempotency_token: str | None,
             extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"x-twilio-signature": signature, "user-agent": TWILIO_UA}
    if content_type:
        headers["content-type"] = content_type
    if algorithm:
        headers["x-twilio-webhooks-signature-settings"] = f"key=webhooks_sharedkey_test,algorithm={algorithm}"
    if idempotency_token:
        headers["i-twilio-idempotency-token"] = idempotency_token
    headers.update({k.lower(): v for k, v in (extra or {}).items()})
    return headers


def signed_form(url: str, form: Mapping[str, str] | Sequence[tuple[str, str]], auth_token: str, *,
                algorithm: str | None = None, idempotency_token: str | None = None,
                headers: Mapping[str, str] | None = None) -> WebhookRequest:
    """A form POST as Twilio sends it. Repeated fields may be given as pairs."""
    pairs = list(form.items()) if isinstance(form, Mapping) else list(form)
    multi: dict[str, list[str]] = {}
    for k, v in pairs:
        multi.setdefault(k, []).append(v)
    signature = sign(auth_token, url, _MultiDict(multi), algorithm)
    return WebhookRequest("POST", url, _headers(signature, FORM, algorithm=algorithm,
                                                idempotency_token=idempotency_token, extra=headers),
                          urlencode(pairs).encode("utf-8"))


def signed_json(url: str, body: bytes, auth_token: str, *, algorithm: str | None = None) -> WebhookRequest:
    """A JSON POST: Twilio appends ``bodySHA256`` to the URL and signs the URL alone."""
    parts = urlsplit(url)
    digest = hashlib.sha256(body).hexdigest()
    query = f"{parts.query}&bodySHA256={digest}" if parts.query else f"bodySHA256={digest}"
    signed_url = urlunsplit(parts._replace(query=query))
    signature = sign(auth_token, signed_url, {}, algorithm)
    return WebhookRequest("POST", signed_url, _headers(signature, "application/json", algorithm=algorithm,
                                                       idempotency_token=None, extra=None), body)


def signed_upgrade(url: str, auth_token: str) -> WebhookRequest:
    """The Media Streams WebSocket upgrade: a GET of the wss URL, signed over the URL with no params."""
    return WebhookRequest("GET", url, _headers(sign(auth_token, url, {}), None, algorithm=None,
                                               idempotency_token=None, extra={"upgrade": "websocket"}))


class _MultiDict(dict[str, list[str]]):
    """What the SDK's ``get_values`` accepts for repeated fields (``getall``, as Flask's MultiDict)."""

    def getall(self, name: str) -> list[str]:
        return self[name]


# --------------------------------------------------------------------------- TwiML, as Twilio reads it
@dataclass(frozen=True)
class Twiml:
    """The verbs Twilio would act on: a ``<Connect><Stream>`` target, or words to say before hanging up."""

    stream_url: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    status_callback: str | None = None
    status_callback_method: str | None = None
    say: list[str] = field(default_factory=list)
    hangup: bool = False
    verbs: list[str] = field(default_factory=list)


def read_twiml(text: str | bytes) -> Twiml:
    """Raises ``xml.etree.ElementTree.ParseError`` or ``ValueError`` for markup Twilio would reject."""
    root = ET.fromstring(text)
    if root.tag != "Response":
        raise ValueError(f"TwiML root must be <Response>, got <{root.tag}>")
    out = Twiml(verbs=[child.tag for child in root])
    for verb in root:
        if verb.tag == "Connect":
            streams = verb.findall("Stream")
            if len(streams) != 1:
                raise ValueError("<Connect> must hold exactly one <Stream>")
            stream = streams[0]
            url = stream.get("url") or ""
            if not url.startswith(("wss://", "ws://")):
                raise ValueError("<Stream url> must be a ws(s):// URL")
            if urlsplit(url).query:
                raise ValueError("<Stream url> must not carry a query string (Twilio drops it)")
            params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
            out = replace(out, stream_url=url, parameters=params, status_callback=stream.get("statusCallback"),
                          status_callback_method=stream.get("statusCallbackMethod"))
        elif verb.tag == "Say":
            out.say.append(verb.text or "")
        elif verb.tag == "Hangup":
            out = replace(out, hangup=True)
    return out


# --------------------------------------------------------------------------- REST resources
def call_resource(*, sid: str, account_sid: str, status: str, to_number: str = "+14155550100",
                  from_number: str = "+15005550006", direction: str = "outbound-api", duration: str | None = None,
                  price: str | None = None, price_unit: str = "USD") -> dict[str, Any]:
    """A Call resource as the Calls API answers it (fields voicebus reads, plus their neighbours)."""
    return {
        "sid": sid, "account_sid": account_sid, "api_version": API_VERSION, "status": status,
        "direction": direction, "to": to_number, "to_formatted": to_number, "from": from_number,
        "from_formatted": from_number, "duration": duration, "price": price, "price_unit": price_unit,
        "answered_by": None, "caller_name": None, "parent_call_sid": None, "queue_time": "0",
        "date_created": "Tue, 31 Aug 2010 20:36:28 +0000", "start_time": None, "end_time": None,
        "uri": f"/{API_VERSION}/Accounts/{account_sid}/Calls/{sid}.json",
    }


def error_body(status: int, code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status}


# --------------------------------------------------------------------------- the contract kit
_ACCOUNT = "AC" + "0123456789abcdef" * 2
_TOKEN = "twilio-contract-auth-token-0001"
_CALL = "CA" + "a1" * 16
_STREAM = "MZ" + "b2" * 16
_NUMBER_SID = "PN" + "c3" * 16
_BASE = rf"/2010-04-01/Accounts/{_ACCOUNT}"


def _creds(token: str) -> TwilioCredentials:
    return TwilioCredentials(account_sid=_ACCOUNT, auth_token=token, from_numbers=["+15005550006"])


def _token_of(credentials: BaseModel) -> str:
    assert isinstance(credentials, TwilioCredentials)
    return credentials.auth_token


def _inbound(url: str, credentials: BaseModel) -> WebhookRequest:
    form = inbound_form(call_sid=_CALL, account_sid=_ACCOUNT, from_number="+15551230001", to_number="+15551230002")
    return signed_form(url, form, _token_of(credentials), idempotency_token="idem-contract-1")


def _status(url: str, credentials: BaseModel, word: str) -> WebhookRequest:
    if word.startswith("stream-"):
        form = stream_status_form(call_sid=_CALL, account_sid=_ACCOUNT, stream_sid=_STREAM, event=word)
    else:
        form = status_form(call_sid=_CALL, account_sid=_ACCOUNT, call_status=word,
                           duration_s=17 if word == "completed" else None)
    return signed_form(url, form, _token_of(credentials))


def _upgrade(url: str, credentials: BaseModel) -> WebhookRequest:
    return signed_upgrade(url, _token_of(credentials))


def _tamper_field(req: WebhookRequest) -> WebhookRequest:
    body = req.body.replace(b"%2B15551230001", b"%2B15559990001") if req.body else req.body
    if body == req.body:
        body = req.body + b"&Injected=1"
    return replace(req, body=body)


def _tamper_url(req: WebhookRequest) -> WebhookRequest:
    parts = urlsplit(req.url)
    return replace(req, url=urlunsplit(parts._replace(path=parts.path + "x")))


def _tamper_host(req: WebhookRequest) -> WebhookRequest:
    parts = urlsplit(req.url)
    return replace(req, url=urlunsplit(parts._replace(netloc="evil.example")))


def _markup_target(markup: Markup) -> MarkupTarget:
    twiml = read_twiml(markup.body)
    if twiml.stream_url is None:
        raise ValueError("TwiML has no <Connect><Stream>")
    if twiml.status_callback is not None and twiml.status_callback_method != "POST":
        raise ValueError("statusCallback without statusCallbackMethod=POST")
    return MarkupTarget(url=twiml.stream_url, token=twiml.parameters.get("vb_token"),
                        status_url=twiml.status_callback)


def _refusal_text(markup: Markup) -> str:
    twiml = read_twiml(markup.body)
    if not twiml.hangup or twiml.stream_url is not None:
        raise ValueError("a refusal must <Hangup/> and open no stream")
    return " ".join(twiml.say)


def _media_socket_opening(token: str) -> StreamOpening:
    start = carrier_start(stream_sid=_STREAM, call_sid=_CALL, account_sid=_ACCOUNT,
                          custom_parameters={"vb_token": token, "from": "+15551230001", "to": "+15551230002"})
    return StreamOpening(frames=(carrier_connected(), start), carrier_call_ref=_CALL, stream_id=_STREAM)


def _agent_stream_opening() -> StreamOpening:
    start = carrier_start(stream_sid=_STREAM, call_sid=_CALL, account_sid=_ACCOUNT)
    return StreamOpening(frames=(carrier_connected(), start), carrier_call_ref=_CALL, stream_id=_STREAM,
                         params={"provider": "twilio"}, headers={"x-twilio-signature": "c2lnbmVk"},
                         account_id=_ACCOUNT)


def _media_frame(pcm16: bytes, seq: int) -> Frame:
    return carrier_media(_STREAM, pcm16_to_ulaw(pcm16), seq, timestamp_ms=seq * 20)


def _parse_sent(frame: Frame) -> SentFrame:
    msg = parse_server_frame(frame)
    if isinstance(msg, ServerMedia):
        return SentFrame("media", pcm16=msg.pcm16)
    if isinstance(msg, ServerClear):
        return SentFrame("clear")
    if isinstance(msg, ServerMark):
        return SentFrame("mark", name=msg.name)
    return SentFrame("other")


def _call(status: str, **kw: Any) -> dict[str, Any]:
    return call_resource(sid=_CALL, account_sid=_ACCOUNT, status=status, **kw)


def _rest_cases() -> tuple[RestCase, ...]:
    call_path = rf"{_BASE}/Calls/{_CALL}\.json"
    dial = DialRequest(to_number="+14155550100", from_number="+15005550006",
                       answer_url="https://vb.example/api/v1/telephony/answer/7",
                       status_url="https://vb.example/api/v1/telephony/twilio/status-callback/7", ring_timeout_s=25)
    dial_fields: dict[str, str | list[str]] = {
        "To": "+14155550100", "From": "+15005550006", "Url": dial.answer_url, "Method": "POST",
        "StatusCallback": dial.status_url, "StatusCallbackMethod": "POST",
        "StatusCallbackEvent": ["initiated", "ringing", "answered", "completed"], "Timeout": "25",
    }
    numbers = {"incoming_phone_numbers": [{"sid": _NUMBER_SID, "phone_number": "+15551230002",
                                           "voice_url": "https://old.example/voice"}]}
    voice_url = "https://vb.example/api/v1/telephony/inbound/run"
    calls = rf"{_BASE}/Calls\.json"
    not_found = error_body(404, 20404, "The requested resource was not found")
    auth = error_body(401, 20003, "Authenticate")
    return (
        RestCase("hangup", "hangup", (_CALL,),
                 (Exchange("POST", call_path, 200, _call("completed"), {"Status": "completed"}),), "hung_up"),
        RestCase("hangup of an ended call", "hangup", (_CALL,),
                 (Exchange("POST", call_path, 404, not_found, {"Status": "completed"}),), "already_ended"),
        RestCase("hangup with a wrong token", "hangup", (_CALL,), (Exchange("POST", call_path, 401, auth),),
                 error="carrier_auth_failed"),
        RestCase("confirm a live call", "confirm_call", (_CALL,),
                 (Exchange("GET", call_path, 200, _call("in-progress")),), (True, 200)),
        RestCase("confirm an ended call", "confirm_call", (_CALL,),
                 (Exchange("GET", call_path, 200, _call("completed")),), (False, 200)),
        RestCase("confirm an unknown call", "confirm_call", (_CALL,), (Exchange("GET", call_path, 404, not_found),),
                 (False, 404)),
        RestCase("dial", "dial", (dial,), (Exchange("POST", calls, 201, _call("queued"), dial_fields),),
                 {"carrier_call_id": _CALL, "status": "queued"}),
        RestCase("dial an invalid number", "dial", (dial,),
                 (Exchange("POST", calls, 400,
                           error_body(400, 21211, "The 'To' number +14155550100 is not a valid phone number.")),),
                 error="carrier_invalid_number"),
        RestCase("dial with a wrong token", "dial", (dial,), (Exchange("POST", calls, 401, auth),),
                 error="carrier_auth_failed"),
        RestCase("call info", "call_info", (_CALL,),
                 (Exchange("GET", call_path, 200, _call("completed", duration="42", price="-0.01300")),),
                 CallInfo(carrier_call_id=_CALL, status="completed", raw_status="completed", duration_s=42,
                          price=0.013, price_unit="USD")),
        RestCase("bind a number", "bind_number", ("+15551230002", voice_url),
                 (Exchange("GET", rf"{_BASE}/IncomingPhoneNumbers\.json", 200, numbers,
                           {"PhoneNumber": "+15551230002"}),
                  Exchange("POST", rf"{_BASE}/IncomingPhoneNumbers/{_NUMBER_SID}\.json", 200,
                           {"sid": _NUMBER_SID, "phone_number": "+15551230002", "voice_url": voice_url},
                           {"VoiceUrl": voice_url, "VoiceMethod": "POST"})),
                 BindResult(number="+15551230002", number_sid=_NUMBER_SID, voice_url=voice_url)),
        RestCase("bind a number that is not on the account", "bind_number", ("+15551230009", voice_url),
                 (Exchange("GET", rf"{_BASE}/IncomingPhoneNumbers\.json", 200, {"incoming_phone_numbers": []},
                           {"PhoneNumber": "+15551230009"}),),
                 error="carrier_invalid_number"),
    )


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _audio_sample() -> bytes:
    return ulaw_to_pcm16(bytes(range(256)) * 2)  # every mu-law code: exact through encode/decode


CONTRACT = ContractKit(
    provider="twilio",
    credentials=_creds(_TOKEN),
    wrong_credentials=_creds("not-the-" + _TOKEN),
    inbound_webhook=_inbound,
    inbound_expect={"provider": "twilio", "account_id": _ACCOUNT, "carrier_call_id": _CALL,
                    "from_number": "+15551230001", "to_number": "+15551230002", "direction": "inbound",
                    "idempotency_key": "idem-contract-1"},
    status_webhook=_status,
    status_cases=(("queued", "initiated"), ("initiated", "initiated"), ("ringing", "ringing"),
                  ("in-progress", "answered"), ("answered", "answered"), ("completed", "completed"),
                  ("busy", "busy"), ("no-answer", "no-answer"), ("failed", "failed"), ("canceled", "canceled"),
                  ("stream-started", "answered"), ("stream-stopped", "completed"), ("stream-error", "failed"),
                  ("paused", None)),
    signed_upgrade=_upgrade,
    signature_headers=("x-twilio-signature",),
    tamperings={"a form field changed": _tamper_field, "the path changed": _tamper_url,
                "the host changed": _tamper_host},
    read_markup=_markup_target,
    read_refusal=_refusal_text,
    media_socket_opening=_media_socket_opening,
    agent_stream_opening=_agent_stream_opening,
    media_frame=_media_frame,
    parse_sent=_parse_sent,
    audio_sample=_audio_sample(),
    rest_cases=_rest_cases(),
    auth_header=_basic(_ACCOUNT, _TOKEN),
)
