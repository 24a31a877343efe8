"""The Twilio REST client against requests captured with httpx.MockTransport (no network)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import pytest

from voicebus.telephony import get_spec
from voicebus.telephony.calls import CarrierError, DialRequest
from voicebus.telephony.providers.twilio.config import TwilioCredentials
from voicebus.telephony.providers.twilio.fake import call_resource, error_body
from voicebus.telephony.providers.twilio.rest import TwilioClient, client

ACCOUNT = "AC" + "12" * 16
TOKEN = "super-secret-auth-token-7781"
CALL = "CA" + "34" * 16
CREDS = TwilioCredentials(account_sid=ACCOUNT, auth_token=TOKEN)
API = "http://twilio.test:9000"
BASE = f"/2010-04-01/Accounts/{ACCOUNT}"
DIAL = DialRequest(to_number="+14155550100", from_number="+15005550006",
                   answer_url="https://vb.example/api/v1/telephony/answer/9",
                   status_url="https://vb.example/api/v1/telephony/twilio/status-callback/9", ring_timeout_s=20)

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


async def run(recorder: Recorder, action: str, *args: object, base_url: str = API) -> object:
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder)) as http:
        c = TwilioClient(base_url, ACCOUNT, TOKEN, http, backoff_s=0.0)
        return await getattr(c, action)(*args)


def form(request: httpx.Request) -> dict[str, list[str]]:
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    return parse_qs(request.content.decode())


def basic() -> str:
    return "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()


async def refused(recorder: Recorder, action: str, *args: object) -> CarrierError:
    with pytest.raises(CarrierError) as info:
        await run(recorder, action, *args)
    assert TOKEN not in str(info.value) and TOKEN not in info.value.message
    return info.value


# ------------------------------------------------------------------------------------------ hangup
async def test_hangup_posts_status_completed_with_basic_auth() -> None:
    rec = Recorder(httpx.Response(200, json=call_resource(sid=CALL, account_sid=ACCOUNT, status="completed")))
    assert await run(rec, "hangup", CALL) == "hung_up"
    (req,) = rec.requests
    assert (req.method, req.url.host, req.url.port, req.url.path) == ("POST", "twilio.test", 9000,
                                                                      f"{BASE}/Calls/{CALL}.json")
    assert req.headers["authorization"] == basic()
    assert form(req) == {"Status": ["completed"]}


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (404, error_body(404, 20404, "The requested resource was not found"), "already_ended"),
    (400, error_body(400, 21220, "Call is not in-progress. Cannot redirect."), "already_ended"),
])
async def test_hangup_of_an_ended_call(status: int, body: dict[str, object], outcome: str) -> None:
    assert await run(Recorder(httpx.Response(status, json=body)), "hangup", CALL) == outcome


@pytest.mark.parametrize("status", [401, 403])
async def test_hangup_auth_failures(status: int) -> None:
    e = await refused(Recorder(httpx.Response(status, json=error_body(status, 20003, "Authenticate"))), "hangup", CALL)
    assert (e.code, e.status) == ("carrier_auth_failed", status)
    assert ACCOUNT in e.message


async def test_hangup_retries_a_server_error_then_succeeds() -> None:
    rec = Recorder(httpx.Response(503), httpx.Response(200, json={}))
    assert await run(rec, "hangup", CALL) == "hung_up"
    assert len(rec.requests) == 2


async def test_hangup_call_sid_cannot_add_a_path_segment() -> None:
    rec = Recorder(httpx.Response(200, json={}))
    await run(rec, "hangup", "CA1/../../Other")
    assert rec.requests[0].url.raw_path.decode().endswith("/Calls/CA1%2F..%2F..%2FOther.json")


# ------------------------------------------------------------------------------------------ confirm
@pytest.mark.parametrize(("status", "answer", "expected"), [
    (200, "in-progress", (True, 200)), (200, "ringing", (True, 200)), (200, "queued", (True, 200)),
    (200, "completed", (False, 200)), (200, "canceled", (False, 200)), (404, None, (False, 404)),
    (401, None, (False, 401)),
])
async def test_confirm_call(status: int, answer: str | None, expected: tuple[bool, int]) -> None:
    body = call_resource(sid=CALL, account_sid=ACCOUNT, status=answer) if answer else error_body(status, 1, "x")
    rec = Recorder(httpx.Response(status, json=body))
    assert await run(rec, "confirm_call", CALL) == expected
    assert (rec.requests[0].method, rec.requests[0].url.path) == ("GET", f"{BASE}/Calls/{CALL}.json")


# ------------------------------------------------------------------------------------------ dial
async def test_dial_creates_the_call_as_twilio_documents() -> None:
    rec = Recorder(httpx.Response(201, json=call_resource(sid=CALL, account_sid=ACCOUNT, status="queued")))
    result = await run(rec, "dial", DIAL)
    assert (result.carrier_call_id, result.status) == (CALL, "queued")  # type: ignore[attr-defined]
    (req,) = rec.requests
    assert (req.method, req.url.path) == ("POST", f"{BASE}/Calls.json")
    assert req.headers["authorization"] == basic()
    assert form(req) == {
        "To": ["+14155550100"], "From": ["+15005550006"], "Url": [DIAL.answer_url], "Method": ["POST"],
        "StatusCallback": [DIAL.status_url], "StatusCallbackMethod": ["POST"],
        "StatusCallbackEvent": ["initiated", "ringing", "answered", "completed"], "Timeout": ["20"],
    }


@pytest.mark.parametrize("code", [21211, 21212, 21214, 21217, 13223])
async def test_dial_invalid_number_carries_twilio_message(code: int) -> None:
    message = f"The phone number you are attempting to call is not valid (code {code})."
    e = await refused(Recorder(httpx.Response(400, json=error_body(400, code, message))), "dial", DIAL)
    assert (e.code, e.status) == ("carrier_invalid_number", 400)
    assert e.message == f"Twilio error {code}: {message}"


async def test_dial_auth_failure_and_other_errors() -> None:
    e = await refused(Recorder(httpx.Response(401, json=error_body(401, 20003, "Authenticate"))), "dial", DIAL)
    assert e.code == "carrier_auth_failed"
    e = await refused(Recorder(httpx.Response(400, json=error_body(400, 21201, "No 'To' number is specified"))),
                      "dial", DIAL)
    assert e.code == "carrier_error"
    assert e.message == "Twilio answered 400 to the call creation (error 21201: No 'To' number is specified)"


async def test_dial_is_never_retried() -> None:
    rec = Recorder(httpx.Response(503))
    e = await refused(rec, "dial", DIAL)
    assert e.code == "carrier_error" and len(rec.requests) == 1


async def test_dial_refuses_non_e164_numbers_before_calling_twilio() -> None:
    rec = Recorder(httpx.Response(201, json={}))
    bad = DialRequest(to_number="0044 20 7946", from_number="+15005550006", answer_url="a", status_url="s")
    e = await refused(rec, "dial", bad)
    assert e.code == "carrier_invalid_number" and rec.requests == []


async def test_dial_answer_without_sid_is_an_error() -> None:
    e = await refused(Recorder(httpx.Response(201, json={"status": "queued"})), "dial", DIAL)
    assert e.code == "carrier_error"


# ------------------------------------------------------------------------------------------ call info
async def test_call_info_normalizes_status_duration_and_price() -> None:
    body = call_resource(sid=CALL, account_sid=ACCOUNT, status="completed", duration="61", price="-0.02150",
                         price_unit="EUR")
    info = await run(Recorder(httpx.Response(200, json=body)), "call_info", CALL)
    assert (info.status, info.raw_status, info.duration_s, info.price, info.price_unit) == (  # type: ignore[attr-defined]
        "completed", "completed", 61, 0.0215, "EUR")


async def test_call_info_of_a_live_call_has_no_price_yet() -> None:
    body = call_resource(sid=CALL, account_sid=ACCOUNT, status="in-progress")
    info = await run(Recorder(httpx.Response(200, json=body)), "call_info", CALL)
    assert (info.status, info.duration_s, info.price) == ("answered", None, None)  # type: ignore[attr-defined]


async def test_call_info_errors() -> None:
    e = await refused(Recorder(httpx.Response(404, json=error_body(404, 20404, "not found"))), "call_info", CALL)
    assert (e.code, e.status) == ("carrier_error", 404)
    body = call_resource(sid=CALL, account_sid=ACCOUNT, status="completed", price="n/a")
    e = await refused(Recorder(httpx.Response(200, json=body)), "call_info", CALL)
    assert e.message == "Twilio answered a call with a malformed duration or price"


# ------------------------------------------------------------------------------------------ bind number
async def test_bind_number_looks_the_number_up_then_sets_voice_url() -> None:
    voice_url = "https://vb.example/api/v1/telephony/inbound/run"
    rec = Recorder(
        httpx.Response(200, json={"incoming_phone_numbers": [
            {"sid": "PN" + "0" * 32, "phone_number": "+15551230099"},
            {"sid": "PN" + "9" * 32, "phone_number": "+15551230002"}]}),
        httpx.Response(200, json={"sid": "PN" + "9" * 32, "voice_url": voice_url}),
    )
    result = await run(rec, "bind_number", "+15551230002", voice_url)
    assert (result.number, result.number_sid, result.voice_url) == ("+15551230002", "PN" + "9" * 32, voice_url)  # type: ignore[attr-defined]
    lookup, update = rec.requests
    assert (lookup.method, lookup.url.path) == ("GET", f"{BASE}/IncomingPhoneNumbers.json")
    assert dict(lookup.url.params) == {"PhoneNumber": "+15551230002"}
    assert (update.method, update.url.path) == ("POST", f"{BASE}/IncomingPhoneNumbers/{'PN' + '9' * 32}.json")
    assert form(update) == {"VoiceUrl": [voice_url], "VoiceMethod": ["POST"]}
    assert all(r.headers["authorization"] == basic() for r in rec.requests)


async def test_bind_number_not_on_the_account() -> None:
    rec = Recorder(httpx.Response(200, json={"incoming_phone_numbers": []}))
    e = await refused(rec, "bind_number", "+15551230002", "https://vb.example/x")
    assert (e.code, e.message) == ("carrier_invalid_number", "number +15551230002 is not on this Twilio account")
    assert len(rec.requests) == 1


# ------------------------------------------------------------------------------------------ factory, secrets
async def test_factory_builds_a_client_and_never_shows_the_token() -> None:
    spec = get_spec("twilio")
    assert spec is not None and spec.rest is client
    async with httpx.AsyncClient() as http:
        c = client(CREDS, "", http)
        assert c.api_url == "https://api.twilio.com" and c.base.endswith(f"/2010-04-01/Accounts/{ACCOUNT}")
        assert TOKEN not in repr(c)
        from voicebus.telephony.providers.cloudonix.config import CloudonixCredentials

        with pytest.raises(CarrierError) as info:
            client(CloudonixCredentials(domain_id="acme", bearer_token="b"), API, http)
        assert info.value.code == "carrier_error"


async def test_unreachable_twilio_is_a_carrier_error_without_secrets() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        c = TwilioClient(API, ACCOUNT, TOKEN, http, backoff_s=0.0)
        with pytest.raises(CarrierError) as info:
            await c.hangup(CALL)
    assert info.value.code == "carrier_error" and TOKEN not in str(info.value)
