"""X-Twilio-Signature: our verifier against the official twilio SDK, which signs and validates independently."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from voicebus.telephony.providers.twilio.config import TwilioCredentials
from voicebus.telephony.providers.twilio.fake import inbound_form, signed_form, signed_json, signed_upgrade
from voicebus.telephony.providers.twilio.verify import VERIFIER, url_variants
from voicebus.telephony.webhook import WebhookRequest

ACCOUNT = "AC" + "5f" * 16
TOKEN = "0123456789abcdef0123456789abcdef"
SHARED = "whsk_shared_secret_for_sha256"
CREDS = TwilioCredentials(account_sid=ACCOUNT, auth_token=TOKEN)
URL = "https://vb.example.com/api/v1/telephony/inbound/run"
FORM = inbound_form(call_sid="CA" + "1" * 32, account_sid=ACCOUNT, from_number="+15551230001",
                    to_number="+15551230002", caller_name="Ada Lovelace")
NOW = 1_700_000_000.0


def verify(req: WebhookRequest, creds: TwilioCredentials = CREDS):
    return VERIFIER.verify(req, creds, now=NOW)


def form_request(url: str, params: dict[str, str], signature: str, **headers: str) -> WebhookRequest:
    return WebhookRequest("POST", url, {"content-type": "application/x-www-form-urlencoded",
                                        "x-twilio-signature": signature, **headers}, urlencode(params).encode())


# ------------------------------------------------------------------------------------------ accepted
def test_sdk_sha1_signature_is_accepted_and_the_idempotency_token_is_the_replay_key() -> None:
    signature = RequestValidator(TOKEN).compute_signature(URL, FORM)
    verdict = verify(form_request(URL, FORM, signature, **{"i-twilio-idempotency-token": "idem-42"}))
    assert (verdict.ok, verdict.reason, verdict.replay_key) == (True, "", "idem-42")


def test_without_an_idempotency_token_there_is_no_replay_key() -> None:
    verdict = verify(form_request(URL, FORM, RequestValidator(TOKEN).compute_signature(URL, FORM)))
    assert verdict.ok and verdict.replay_key is None


def test_sdk_sha256_signature_with_the_auth_token_is_accepted() -> None:
    signature = RequestValidator(TOKEN).compute_signature(URL, FORM, "HMAC_SHA256")
    settings = {"x-twilio-webhooks-signature-settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"}
    assert verify(form_request(URL, FORM, signature, **settings)).ok
    # the same signature without the settings header is judged as SHA-1, and fails
    assert verify(form_request(URL, FORM, signature)).reason == "signature does not match"


def test_sha256_signature_uses_the_shared_key_when_one_is_stored() -> None:
    creds = TwilioCredentials(account_sid=ACCOUNT, auth_token=TOKEN, webhook_shared_key=SHARED)
    settings = {"x-twilio-webhooks-signature-settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"}
    good = RequestValidator(SHARED).compute_signature(URL, FORM, "HMAC_SHA256")
    assert verify(form_request(URL, FORM, good, **settings), creds).ok
    with_token = RequestValidator(TOKEN).compute_signature(URL, FORM, "HMAC_SHA256")
    assert verify(form_request(URL, FORM, with_token, **settings), creds).reason == "signature does not match"
    # plain SHA-1 webhooks (no settings header) still use the auth token
    assert verify(form_request(URL, FORM, RequestValidator(TOKEN).compute_signature(URL, FORM)), creds).ok


def test_unsupported_algorithm_is_refused() -> None:
    req = form_request(URL, FORM, RequestValidator(TOKEN).compute_signature(URL, FORM),
                       **{"x-twilio-webhooks-signature-settings": "key=k,algorithm=HMAC_MD5"})
    assert verify(req).reason == "unsupported signature algorithm 'HMAC_MD5'"


def test_fake_signed_requests_are_accepted() -> None:
    assert verify(signed_form(URL, FORM, TOKEN)).ok
    assert verify(signed_json(URL + "?run_id=3", b'{"CallSid":"CA1"}', TOKEN)).ok
    assert verify(signed_upgrade("wss://vb.example.com/api/v1/telephony/media/call-1", TOKEN)).ok


def test_repeated_form_fields_are_signed_as_the_sdk_signs_them() -> None:
    pairs = [("StatusCallbackEvent", "ringing"), ("StatusCallbackEvent", "answered"), ("CallSid", "CA1")]
    assert verify(signed_form(URL, pairs, TOKEN)).ok


def test_json_body_is_covered_by_body_sha256() -> None:
    req = signed_json(URL, b'{"CallSid":"CA1"}', TOKEN)
    assert verify(replace(req, body=b'{"CallSid":"CA2"}')).reason == "body does not match bodySHA256"
    unsigned_body = WebhookRequest("POST", URL, {"content-type": "application/json",
                                                 "x-twilio-signature": req.headers["x-twilio-signature"]}, b"{}")
    assert verify(unsigned_body).reason == "a application/json body must be signed with bodySHA256 in the URL"


def test_ws_upgrade_is_a_get_signed_over_the_url_alone() -> None:
    url = "wss://vb.example.com/api/v1/telephony/media/call-1"
    req = signed_upgrade(url, TOKEN)
    assert req.method == "GET"
    assert req.headers["x-twilio-signature"] == RequestValidator(TOKEN).compute_signature(url, {})
    assert verify(req).ok
    assert verify(replace(req, url=url.replace("call-1", "call-2"))).reason == "signature does not match"


# ------------------------------------------------------------------------------------------ refused
def test_tampered_param_is_refused() -> None:
    req = signed_form(URL, FORM, TOKEN)
    tampered = replace(req, body=req.body.replace(b"%2B15551230001", b"%2B15559999999"))
    assert tampered.body != req.body
    assert verify(tampered).reason == "signature does not match"


def test_added_param_is_refused() -> None:
    req = signed_form(URL, FORM, TOKEN)
    assert verify(replace(req, body=req.body + b"&Extra=1")).reason == "signature does not match"


def test_wrong_token_is_refused() -> None:
    assert verify(signed_form(URL, FORM, "another-token")).reason == "signature does not match"


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_header_is_refused(value: str | None) -> None:
    req = signed_form(URL, FORM, TOKEN)
    headers = {k: v for k, v in req.headers.items() if k != "x-twilio-signature"}
    if value is not None:
        headers["x-twilio-signature"] = value
    assert verify(replace(req, headers=headers)).reason == "missing X-Twilio-Signature"


@pytest.mark.parametrize("url", [
    URL + "?run_id=1",
    URL.replace("https://", "http://"),
    URL.replace("vb.example.com", "evil.example.com"),
    URL.replace("/inbound/run", "/twiml"),
])
def test_altered_url_is_refused(url: str) -> None:
    req = signed_form(URL, FORM, TOKEN)
    assert verify(replace(req, url=url)).reason == "signature does not match"


@pytest.mark.parametrize(("signature", "reason"), [
    ("x" * 300, "malformed X-Twilio-Signature"),
    ("säkerhet", "malformed X-Twilio-Signature"),
])
def test_malformed_header_is_refused(signature: str, reason: str) -> None:
    req = signed_form(URL, FORM, TOKEN)
    assert verify(replace(req, headers={**req.headers, "x-twilio-signature": signature})).reason == reason


def test_non_twilio_credentials_and_odd_requests_fail_closed() -> None:
    from voicebus.telephony.providers.cloudonix.config import CloudonixCredentials

    req = signed_form(URL, FORM, TOKEN)
    other = CloudonixCredentials(domain_id="acme", bearer_token="x")
    assert VERIFIER.verify(req, other, now=NOW).reason == "the configuration does not hold Twilio credentials"
    assert verify(replace(req, body=b"\xff\xfe")).reason == "form body is not UTF-8"
    assert verify(replace(req, url="https://vb.example.com:99999/x")).reason == "malformed request (ValueError)"
    assert verify(replace(req, body=b"a" * 70_000)).reason == "body too large"


def test_reasons_never_echo_the_token() -> None:
    req = signed_form(URL, FORM, TOKEN)
    for candidate in (replace(req, body=req.body + b"&x=1"), replace(req, headers={}),
                      replace(req, url="https://h:bad/")):
        assert TOKEN not in verify(candidate).reason


# ------------------------------------------------------------------------------------------ agreement with the SDK
def test_url_variants_match_the_sdk() -> None:
    from urllib.parse import urlparse

    from twilio.request_validator import add_port, remove_port

    for url in ("https://h.example/p?q=1", "https://h.example:443/p", "http://h.example:8080/p?x=1&y=2",
                "wss://h.example/api/v1/telephony/media/c", "http://127.0.0.1:8000/api"):
        assert url_variants(url) == (remove_port(urlparse(url)), add_port(urlparse(url)))


SIGNED_URL = "https://vb.example.com:443/api/v1/telephony/inbound/run?run_id=7"
CASES = [
    # (name, url the carrier signed, params signed, url we see, params we see, token used to sign)
    ("exact", SIGNED_URL, FORM, SIGNED_URL, FORM, TOKEN),
    ("default port dropped", SIGNED_URL, FORM, SIGNED_URL.replace(":443", ""), FORM, TOKEN),
    ("default port added", URL, FORM, URL.replace(".com/", ".com:443/"), FORM, TOKEN),
    ("non-default port", "https://vb.example.com:8443/x", FORM, "https://vb.example.com:8443/x", FORM, TOKEN),
    ("port changed", "https://vb.example.com:8443/x", FORM, "https://vb.example.com:9443/x", FORM, TOKEN),
    ("query changed", SIGNED_URL, FORM, SIGNED_URL.replace("7", "8"), FORM, TOKEN),
    ("param changed", URL, FORM, URL, {**FORM, "To": "+15550000000"}, TOKEN),
    ("param removed", URL, FORM, URL, {k: v for k, v in FORM.items() if k != "CallerName"}, TOKEN),
    ("param added", URL, FORM, URL, {**FORM, "Digits": "1"}, TOKEN),
    ("empty value", URL, {**FORM, "CallToken": ""}, URL, {**FORM, "CallToken": ""}, TOKEN),
    ("unicode value", URL, {**FORM, "CallerName": "Zoë Ångström"}, URL, {**FORM, "CallerName": "Zoë Ångström"},
     TOKEN),
    ("wrong token", URL, FORM, URL, FORM, "not-the-token"),
    ("no params", URL, {}, URL, {}, TOKEN),
    ("http scheme", "http://vb.example.com/run", FORM, "http://vb.example.com:80/run", FORM, TOKEN),
]


@pytest.mark.parametrize(("name", "signed_url", "signed", "seen_url", "seen", "token"), CASES,
                         ids=[c[0] for c in CASES])
def test_acceptance_agrees_with_request_validator(name: str, signed_url: str, signed: dict[str, str],
                                                   seen_url: str, seen: dict[str, str], token: str) -> None:
    for algorithm in (None, "HMAC_SHA256"):
        signature = RequestValidator(token).compute_signature(signed_url, signed, algorithm)
        sdk = RequestValidator(TOKEN).validate(seen_url, seen, signature, algorithm)
        headers = {"x-twilio-webhooks-signature-settings": f"key=k,algorithm={algorithm}"} if algorithm else {}
        ours = verify(form_request(seen_url, seen, signature, **headers))
        assert ours.ok is sdk, f"{name} ({algorithm}): sdk={sdk} ours={ours}"
    # the table must exercise both outcomes to be worth anything
    assert name not in ("exact", "wrong token") or (sdk is (name == "exact"))


def test_table_has_both_outcomes() -> None:
    outcomes = {RequestValidator(TOKEN).validate(c[3], c[4], RequestValidator(c[5]).compute_signature(c[1], c[2]))
                for c in CASES}
    assert outcomes == {True, False}
