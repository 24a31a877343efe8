"""Twilio webhooks: detection, inbound parsing, status mapping, and TwiML as Twilio reads it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from urllib.parse import urlencode

import pytest

from voicebus.telephony import get_spec
from voicebus.telephony.providers.twilio.fake import inbound_form, read_twiml, status_form, stream_status_form
from voicebus.telephony.providers.twilio.webhook import DIALECT
from voicebus.telephony.webhook import MediaSocket, WebhookParseError, WebhookRequest

ACCOUNT = "AC" + "ab" * 16
CALL = "CA" + "cd" * 16
STREAM = "MZ" + "ef" * 16
URL = "https://vb.example/api/v1/telephony/inbound/run"
SOCKET = MediaSocket(url="wss://vb.example/api/v1/telephony/media/call-42", token="t0k-&-<secret>",
                     status_url="https://vb.example/api/v1/telephony/twilio/status-callback/42")


def post(form: dict[str, str] | None = None, body: bytes | None = None, **headers: str) -> WebhookRequest:
    return WebhookRequest("POST", URL, {"content-type": "application/x-www-form-urlencoded", **headers},
                          urlencode(form or {}).encode() if body is None else body)


def inbound(**over: str) -> dict[str, str]:
    return inbound_form(call_sid=CALL, account_sid=ACCOUNT, from_number="+15551230001", to_number="+15551230002",
                        **over)


# ------------------------------------------------------------------------------------------ detect
def test_registered_with_every_capability() -> None:
    spec = get_spec("twilio")
    assert spec is not None and spec.webhook is DIALECT and spec.webhook.aliases == {"twiml": "answer"}
    assert spec.stream is not None and spec.stream.sample_rate == 8000
    assert spec.stream.agent_stream is not None and spec.stream.media_socket is not None
    assert spec.verifier is not None and spec.rest is not None
    assert spec.rest_actions == {"hangup", "confirm_call", "dial", "call_info", "bind_number"}
    assert spec.fake == "voicebus.telephony.providers.twilio.fake"
    assert spec.default_api_url == "https://api.twilio.com" and spec.docs_url
    assert spec.sensitive_fields == ("auth_token", "webhook_shared_key")


@pytest.mark.parametrize("req", [
    post({}, **{"x-twilio-signature": "abc"}),
    post({}, **{"i-twilio-idempotency-token": "abc"}),
    post(inbound()),
])
def test_detects_twilio(req: WebhookRequest) -> None:
    assert DIALECT.detect(req)


@pytest.mark.parametrize("req", [
    post({}),
    post({"CallSid": CALL, "AccountSid": ACCOUNT}),  # no ApiVersion
    post({"CallSid": CALL, "AccountSid": "acme.cloudonix.net", "ApiVersion": "2010-04-01"}),
    post(body=b"\xff\xfe\xfd"),
    post(body=b"x" * 100_000),
    WebhookRequest("POST", URL, {"content-type": "application/json"}, b'{"CallSid": "CA1"}'),
])
def test_does_not_detect_others(req: WebhookRequest) -> None:
    assert DIALECT.detect(req) is False


# ------------------------------------------------------------------------------------------ inbound
def test_parse_inbound() -> None:
    call = DIALECT.parse_inbound(post(inbound(caller_name="Ada"), **{"i-twilio-idempotency-token": "idem-1"}))
    assert (call.provider, call.account_id, call.carrier_call_id) == ("twilio", ACCOUNT, CALL)
    assert (call.from_number, call.to_number, call.direction) == ("+15551230001", "+15551230002", "inbound")
    assert call.idempotency_key == "idem-1"
    assert call.fields["FromCountry"] == "US" and call.fields["ToCountry"] == "US"
    assert call.fields["CallStatus"] == "ringing" and call.fields["ApiVersion"] == "2010-04-01"
    assert call.fields["CallerName"] == "Ada"


@pytest.mark.parametrize(("raw", "direction"), [("inbound", "inbound"), ("outbound-api", "outbound"),
                                                 ("outbound-dial", "outbound")])
def test_direction(raw: str, direction: str) -> None:
    assert DIALECT.parse_inbound(post(inbound(direction=raw))).direction == direction


def test_caller_name_is_only_there_when_sent() -> None:
    assert "CallerName" not in DIALECT.parse_inbound(post(inbound())).fields


@pytest.mark.parametrize(("form", "message"), [
    ({"AccountSid": ACCOUNT}, "Twilio voice webhook is missing CallSid"),
    ({"CallSid": CALL}, "Twilio voice webhook is missing AccountSid"),
    ({"CallSid": CALL, "AccountSid": "ACnope"},
     "Twilio voice webhook AccountSid is not an Account SID (AC + 32 hex digits)"),
    ({"CallSid": CALL, "AccountSid": ACCOUNT, "From": "+1" * 200},
     "Twilio webhook field From is longer than 256 characters"),
])
def test_parse_inbound_errors(form: dict[str, str], message: str) -> None:
    with pytest.raises(WebhookParseError) as info:
        DIALECT.parse_inbound(post(form))
    assert str(info.value) == message


def test_parse_inbound_refuses_other_bodies() -> None:
    with pytest.raises(WebhookParseError, match="larger than"):
        DIALECT.parse_inbound(post(body=b"a=" + b"x" * 70_000))
    with pytest.raises(WebhookParseError, match="application/x-www-form-urlencoded"):
        DIALECT.parse_inbound(WebhookRequest("POST", URL, {"content-type": "application/json"}, b"{}"))


# ------------------------------------------------------------------------------------------ TwiML
def test_answer_stream_is_the_documented_twiml() -> None:
    markup = DIALECT.answer_stream(SOCKET, None)
    assert markup.media_type == "application/xml" and markup.status_code == 200
    root = ET.fromstring(markup.body)
    assert root.tag == "Response" and [c.tag for c in root] == ["Connect"]
    connect = root[0]
    assert [c.tag for c in connect] == ["Stream"]
    stream = connect[0]
    assert stream.attrib == {"url": SOCKET.url, "statusCallback": SOCKET.status_url, "statusCallbackMethod": "POST"}
    assert [(p.tag, p.attrib) for p in stream] == [("Parameter", {"name": "vb_token", "value": SOCKET.token})]
    # the token appears once, XML-escaped, in the Parameter only
    assert markup.body.count("t0k-&amp;-&lt;secret&gt;") == 1 and SOCKET.token not in markup.body
    twiml = read_twiml(markup.body)
    assert (twiml.stream_url, twiml.parameters, twiml.status_callback) == (SOCKET.url, {"vb_token": SOCKET.token},
                                                                          SOCKET.status_url)


def test_answer_stream_without_status_url_has_no_status_attributes() -> None:
    bare = MediaSocket(url=SOCKET.url, token="tok")
    stream = ET.fromstring(DIALECT.answer_stream(bare, None).body).find("Connect/Stream")
    assert stream is not None and stream.attrib == {"url": SOCKET.url}


def test_hostile_values_cannot_add_verbs() -> None:
    hostile = MediaSocket(url='wss://vb.example/x"/><Dial>+1900</Dial><Stream url="', token='"/><Hangup/>')
    root = ET.fromstring(DIALECT.answer_stream(hostile, None).body)
    assert [e.tag for e in root.iter()] == ["Response", "Connect", "Stream", "Parameter"]
    assert root.find("Connect/Stream").get("url") == hostile.url  # type: ignore[union-attr]


def test_refusal_says_and_hangs_up() -> None:
    message = "Sorry, <this> number & that one are not configured."
    root = ET.fromstring(DIALECT.answer_refusal(message).body)
    assert [(c.tag, c.text) for c in root] == [("Say", message), ("Hangup", None)]


# ------------------------------------------------------------------------------------------ status
@pytest.mark.parametrize(("raw", "status"), [
    ("queued", "initiated"), ("initiated", "initiated"), ("ringing", "ringing"), ("in-progress", "answered"),
    ("answered", "answered"), ("completed", "completed"), ("busy", "busy"), ("no-answer", "no-answer"),
    ("failed", "failed"), ("canceled", "canceled"), ("In-Progress", "answered"), ("paused", None),
    ("something-new", None),
])
def test_call_status_mapping(raw: str, status: str | None) -> None:
    update = DIALECT.parse_status(post(status_form(call_sid=CALL, account_sid=ACCOUNT, call_status=raw)))
    assert (update.carrier_call_id, update.status, update.raw_status) == (CALL, status, raw)


@pytest.mark.parametrize(("event", "status"), [("stream-started", "answered"), ("stream-stopped", "completed"),
                                               ("stream-error", "failed"), ("stream-paused", None)])
def test_stream_status_mapping(event: str, status: str | None) -> None:
    form = stream_status_form(call_sid=CALL, account_sid=ACCOUNT, stream_sid=STREAM, event=event,
                              error="boom" if event == "stream-error" else None)
    update = DIALECT.parse_status(post(form))
    assert (update.status, update.raw_status, update.fields["StreamSid"]) == (status, event, STREAM)
    assert update.fields.get("StreamError") == ("boom" if event == "stream-error" else None)


def test_duration_from_call_duration_then_duration() -> None:
    done = status_form(call_sid=CALL, account_sid=ACCOUNT, call_status="completed", duration_s=75)
    assert DIALECT.parse_status(post(done)).duration_s == 75
    only_duration = {**status_form(call_sid=CALL, account_sid=ACCOUNT, call_status="completed"), "Duration": "3"}
    assert DIALECT.parse_status(post(only_duration)).duration_s == 3
    assert DIALECT.parse_status(post(status_form(call_sid=CALL, account_sid=ACCOUNT,
                                                 call_status="ringing"))).duration_s is None


@pytest.mark.parametrize(("form", "message"), [
    ({"CallStatus": "ringing"}, "Twilio status callback is missing CallSid"),
    ({"CallSid": CALL}, "Twilio status callback is missing CallStatus"),
    ({"CallSid": CALL, "CallStatus": "completed", "CallDuration": "-4"},
     "Twilio status callback CallDuration is not a whole number of seconds"),
])
def test_status_errors(form: dict[str, str], message: str) -> None:
    with pytest.raises(WebhookParseError) as info:
        DIALECT.parse_status(post(form))
    assert str(info.value) == message
