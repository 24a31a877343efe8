"""Carrier webhooks and per-call media sockets on a real ingress, with config and call-control stood in
on real NATS: every refusal (status, body, nothing created), the answer markup, the token's rules, and
status callbacks onto the bus. The Twilio dialect is used because it is the reference; signatures are
call-control's business (its stand-in here answers each ``ctl.verify`` as the test says).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from services.ingress.tests.conftest import AGENT_UUID, ORG_ID, WAIT_S, Harness, closed
from voicebus.bus.messages import InboundRoute, QuotaAcquireRequest, RunCreate, VerifyResult
from voicebus.bus.rpc import BusError
from voicebus.telephony.dialects.twilio_media_carrier import carrier_connected, carrier_start
from voicebus.telephony.providers.twilio.fake import inbound_form, read_twiml, status_form, stream_status_form

ACCOUNT = "AC" + "5a" * 16
NUMBER = "+15005550006"
TWILIO_CONFIG = 77
CALL_SID = "CA" + "7c" * 16
FORM = {"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": "checked-by-call-control"}


@pytest.fixture
async def routed(harness: Harness) -> Harness:
    harness.config.routes[("twilio", ACCOUNT, NUMBER)] = InboundRoute(
        organization_id=ORG_ID, telephony_config_id=TWILIO_CONFIG, phone_number_id=5, number=NUMBER,
        agent=harness.config.agents[AGENT_UUID])
    await harness.start_ingress()
    return harness


def _base(h: Harness) -> str:
    assert h.ingress is not None
    return f"http://127.0.0.1:{h.ingress.port}"


async def _post(h: Harness, path: str, form: dict[str, str] | None = None, *, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=WAIT_S) as http:
        content = body if body is not None else urlencode(form or {}).encode()
        return await http.post(_base(h) + path, content=content, headers={**FORM, **(headers or {})})


def _inbound(**kw: str) -> dict[str, str]:
    args: dict[str, Any] = dict(call_sid=CALL_SID, account_sid=ACCOUNT, from_number="+15005550100", to_number=NUMBER)
    args.update(kw)
    return inbound_form(**args)


async def _media_socket(h: Harness, url: str, token: str | None) -> ClientConnection:
    ws = await connect(url, open_timeout=WAIT_S, close_timeout=2)
    await ws.send(carrier_connected())
    await ws.send(carrier_start(stream_sid="MZ" + "1" * 32, call_sid=CALL_SID, account_sid=ACCOUNT,
                                custom_parameters={"vb_token": token} if token is not None else {}))
    return ws


def _nothing_created(h: Harness) -> None:
    assert h.config.creates == [] and h.config.acquired == [] and h.callcontrol.validations == []


# ---------------------------------------------------------------------------------------------- refusals
async def test_unrecognized_webhook_is_a_400(routed: Harness) -> None:
    resp = await _post(routed, "/api/v1/telephony/inbound/run", {"hello": "world"}, headers={"x-twilio-signature": ""})
    assert resp.status_code == 400
    assert resp.text == "Unrecognized carrier webhook: no provider recognizes this request"
    _nothing_created(routed)


async def test_body_over_the_limit_is_a_413(routed: Harness) -> None:
    resp = await _post(routed, "/api/v1/telephony/inbound/run", body=b"x" * (64 * 1024 + 1))
    assert resp.status_code == 413 and "larger than 65536 bytes" in resp.text
    _nothing_created(routed)


async def test_malformed_twilio_webhook_names_what_is_missing(routed: Harness) -> None:
    form = _inbound()
    del form["CallSid"]
    resp = await _post(routed, "/api/v1/telephony/twiml", form)
    assert resp.status_code == 400 and resp.text.startswith("Malformed Twilio webhook: "), resp.text
    assert "CallSid" in resp.text
    _nothing_created(routed)


@pytest.mark.parametrize(("form", "said"), [
    (_inbound(AccountSid="AC" + "00" * 16), "This number is not configured. Goodbye."),
    (_inbound(To="+15005550999", Called="+15005550999"), "The number you called is not configured. Goodbye."),
])
async def test_unknown_account_or_number_gets_twiml_that_says_so(routed: Harness, form: dict[str, str],
                                                                  said: str) -> None:
    resp = await _post(routed, "/api/v1/telephony/inbound/run", form)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/xml")
    twiml = read_twiml(resp.text)
    assert (twiml.say, twiml.hangup, twiml.stream_url) == ([said], True, None)
    _nothing_created(routed)
    assert routed.callcontrol.verifies == []  # nothing to verify against: no stored secret


async def test_bad_signature_is_a_403_with_the_reason_and_creates_nothing(routed: Harness) -> None:
    routed.callcontrol.verdicts = [VerifyResult(valid=False, reason="signature does not match")]
    resp = await _post(routed, "/api/v1/telephony/inbound/run", _inbound())
    assert (resp.status_code, resp.text) == (403, "Signature validation failed: signature does not match")
    (asked,) = routed.callcontrol.verifies
    assert asked.telephony_config_id == TWILIO_CONFIG and asked.method == "POST"
    assert asked.url == f"{_base(routed)}/api/v1/telephony/inbound/run"  # what Twilio signed
    assert asked.headers["x-twilio-signature"] == "checked-by-call-control"
    _nothing_created(routed)


async def test_replayed_delivery_is_a_409(routed: Harness) -> None:
    routed.callcontrol.verdicts = [VerifyResult(valid=True, replayed=True)]
    resp = await _post(routed, "/api/v1/telephony/inbound/run", _inbound())
    assert resp.status_code == 409 and resp.text.startswith("Replayed request")
    _nothing_created(routed)


async def test_call_control_down_is_a_retryable_503(routed: Harness) -> None:
    routed.callcontrol.verify_error = BusError("internal", "boom")
    resp = await _post(routed, "/api/v1/telephony/inbound/run", _inbound())
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    _nothing_created(routed)


async def test_config_down_answers_markup_with_a_retryable_503(routed: Harness) -> None:
    routed.config.fail["inbound.route"] = BusError("internal", "database down")
    resp = await _post(routed, "/api/v1/telephony/inbound/run", _inbound())
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert read_twiml(resp.text).say == ["We cannot take your call right now. Please try again later."]
    _nothing_created(routed)


async def test_concurrent_call_limit_gets_busy_markup_and_no_run(routed: Harness) -> None:
    routed.config.limit = 0
    resp = await _post(routed, "/api/v1/telephony/inbound/run", _inbound())
    assert resp.status_code == 200
    assert read_twiml(resp.text).say == ["All our lines are busy. Please call again later."]
    assert routed.config.creates == []


# ---------------------------------------------------------------------------------------------- inbound call
async def _answered(h: Harness) -> tuple[str, str, RunCreate]:
    resp = await _post(h, "/api/v1/telephony/inbound/run", _inbound())
    assert resp.status_code == 200, resp.text
    twiml = read_twiml(resp.text)
    assert twiml.stream_url is not None, resp.text
    (create,) = h.config.creates
    return twiml.stream_url, twiml.parameters["vb_token"], create


async def test_inbound_webhook_creates_the_run_records_the_leg_and_points_at_a_media_socket(routed: Harness) -> None:
    url, token, create = await _answered(routed)
    assert re.fullmatch(rf"ws://127\.0\.0\.1:\d+/api/v1/telephony/media/{create.call_id}", url)
    assert len(token) >= 40
    assert re.fullmatch(r"WR-TEL-IN-\d{8}", create.name) and (create.call_type, create.mode) == ("inbound", "twilio")
    assert create.initial_context == {"caller_number": "+15005550100", "called_number": NUMBER,
                                      "direction": "inbound", "provider": "twilio",
                                      "telephony_configuration_id": TWILIO_CONFIG}
    assert create.gathered_context == {"call_id": CALL_SID}
    assert routed.config.runs[next(iter(routed.config.runs))].telephony_configuration_id == TWILIO_CONFIG
    (leg,) = routed.callcontrol.validations
    assert (leg.call_id, leg.telephony_config_id, leg.carrier_call_id, leg.confirm) == (
        create.call_id, TWILIO_CONFIG, CALL_SID, False)
    twiml = read_twiml((await _post(routed, "/api/v1/telephony/inbound/run", _inbound(CallSid="CA" + "8" * 32))).text)
    assert twiml.status_callback is not None and twiml.status_callback.endswith("/api/v1/telephony/twilio/"
                                                                               "status-callback/1002")


async def test_media_socket_claims_the_token_once(routed: Harness) -> None:
    url, token, create = await _answered(routed)
    ws = await _media_socket(routed, url, token)
    await routed.changes.wait(lambda: routed.runner.calls)
    offer = routed.runner.only_call.offer
    assert (offer.call_id, offer.provider) == (create.call_id, "twilio")
    assert routed.callcontrol.verifies[-1].method == "GET"  # the signed upgrade
    assert routed.callcontrol.verifies[-1].url == url
    running = [u for u in routed.config.updates if u.state == "running"]
    assert running and running[0].gathered_context == {"twilio_call_sid": CALL_SID,
                                                       "twilio_stream_sid": "MZ" + "1" * 32}

    again = await _media_socket(routed, url, token)
    assert (await closed(again))[:2] == (4401, "Media socket token already used")
    await ws.close()
    await routed.changes.wait(lambda: routed.events.terminal())
    assert [(n, b["reason"]) for n, b in routed.events.terminal()] == [("call.ended", "caller_hangup")]


@pytest.mark.parametrize(("token", "reason"), [
    ("not-the-token", "Media socket token invalid"),
    (None, "Missing media socket token"),
])
async def test_wrong_or_missing_token_is_refused_and_the_call_still_waits(routed: Harness, token: str | None,
                                                                         reason: str) -> None:
    url, right, _ = await _answered(routed)
    bad = await _media_socket(routed, url, token)
    assert (await closed(bad))[:2] == (4401, reason)
    assert routed.config.updates[-1].state is None  # the run was not touched by the stranger's socket
    good = await _media_socket(routed, url, right)
    await routed.changes.wait(lambda: routed.runner.calls)
    await good.close()


async def test_unsigned_upgrade_is_refused(routed: Harness) -> None:
    url, token, _ = await _answered(routed)
    routed.callcontrol.verdicts = [VerifyResult(valid=False, reason="missing X-Twilio-Signature")]
    ws = await _media_socket(routed, url, token)
    assert (await closed(ws))[:2] == (4401, "Signature validation failed: missing X-Twilio-Signature")


async def test_expired_token_is_refused(routed: Harness) -> None:
    assert routed.ingress is not None
    routed.ingress.settings.media_token_ttl_s = 0.001  # every token is already past its lifetime when used
    url, token, _ = await _answered(routed)
    ws = await _media_socket(routed, url, token)
    assert (await closed(ws))[:2] == (4401, "Media socket token expired")


async def test_socket_for_no_waiting_call(routed: Harness) -> None:
    assert routed.ingress is not None
    ws = await _media_socket(routed, f"ws://127.0.0.1:{routed.ingress.port}/api/v1/telephony/media/{'0' * 32}", "x")
    assert (await closed(ws))[:2] == (4404, "No call is waiting for this media socket")


# ---------------------------------------------------------------------------------------------- status callbacks
async def test_status_callbacks_are_verified_normalized_and_published(routed: Harness) -> None:
    _, _, create = await _answered(routed)
    run_id = next(iter(routed.config.runs))
    path = f"/api/v1/telephony/twilio/status-callback/{run_id}"
    started = stream_status_form(call_sid=CALL_SID, account_sid=ACCOUNT, stream_sid="MZ" + "1" * 32,
                                 event="stream-started")
    assert (await _post(routed, path, started)).status_code == 204
    done = status_form(call_sid=CALL_SID, account_sid=ACCOUNT, call_status="completed", duration_s=42)
    assert (await _post(routed, path, done)).status_code == 204
    assert (await _post(routed, path, done)).status_code == 204  # a retried delivery: same event id

    await routed.changes.wait(lambda: len(routed.events.named("call.status")) >= 2)
    events = routed.events.named("call.status")
    assert [(e["status"], e["raw_status"], e["duration_s"]) for e in events[:2]] == [
        ("answered", "stream-started", None), ("completed", "completed", 42)]
    assert {e["call_id"] for e in events} == {create.call_id}
    assert len({e["event_id"] for e in events}) == 2  # the retry is de-duplicated by JetStream


async def test_status_callback_refusals(routed: Harness) -> None:
    await _answered(routed)
    run_id = next(iter(routed.config.runs))
    done = status_form(call_sid=CALL_SID, account_sid=ACCOUNT, call_status="completed")
    assert (await _post(routed, f"/api/v1/telephony/twilio/status-callback/{run_id + 50}", done)).status_code == 404
    assert (await _post(routed, f"/api/v1/telephony/plivo/status-callback/{run_id}", done)).status_code == 404
    routed.callcontrol.verdicts = [VerifyResult(valid=False, reason="signature does not match")]
    resp = await _post(routed, f"/api/v1/telephony/twilio/status-callback/{run_id}", done)
    assert (resp.status_code, resp.text) == (403, "Signature validation failed: signature does not match")
    assert routed.events.named("call.status") == []


# ---------------------------------------------------------------------------------------------- outbound answer
async def _outbound_run(h: Harness) -> int:
    """A run as config's initiate-call leaves it: outbound, created, holding a lease, configuration set."""
    lease = await h.config.acquire(QuotaAcquireRequest(organization_id=ORG_ID, holder="f" * 32))
    run = await h.config.create_run(RunCreate(
        organization_id=ORG_ID, agent_uuid=AGENT_UUID, name="WR-TEL-OUT-00000001", call_type="outbound",
        mode="twilio", call_id="f" * 32, initial_context={"called_number": "+15005550200"},
        quota_lease_id=lease.lease_id))
    h.config.runs[run.id] = run.model_copy(update={"telephony_configuration_id": TWILIO_CONFIG})
    return run.id


async def test_outbound_answer_is_answered_again_on_a_replay_with_a_fresh_token(routed: Harness) -> None:
    run_id = await _outbound_run(routed)
    form = _inbound(Direction="outbound-api", CallStatus="in-progress")
    first = read_twiml((await _post(routed, f"/api/v1/telephony/answer/{run_id}", form)).text)
    routed.callcontrol.verdicts = [VerifyResult(valid=True, replayed=True)]
    second = read_twiml((await _post(routed, f"/api/v1/telephony/twiml?run_id={run_id}", form)).text)
    assert first.stream_url == second.stream_url == f"ws://127.0.0.1:{routed.ingress.port}/api/v1/telephony/media/" \
                                                   + "f" * 32  # type: ignore[union-attr]
    assert first.parameters["vb_token"] != second.parameters["vb_token"]
    stale = await _media_socket(routed, first.stream_url, first.parameters["vb_token"])  # type: ignore[arg-type]
    assert (await closed(stale))[:2] == (4401, "Media socket token invalid")
    fresh = await _media_socket(routed, second.stream_url, second.parameters["vb_token"])  # type: ignore[arg-type]
    await routed.changes.wait(lambda: routed.runner.calls)
    assert routed.config.renewed  # the socket took over the lease config created for the ringing call
    await fresh.close()


async def test_outbound_answer_for_a_run_that_is_not_waiting(routed: Harness) -> None:
    run_id = await _outbound_run(routed)
    routed.config.runs[run_id] = routed.config.runs[run_id].model_copy(update={"state": "failed"})
    resp = await _post(routed, f"/api/v1/telephony/answer/{run_id}", _inbound(Direction="outbound-api"))
    assert read_twiml(resp.text).say == ["This call has already ended. Goodbye."]
    assert list(routed.config.runs) == [run_id] and routed.runner.calls == {}
    resp = await _post(routed, "/api/v1/telephony/answer/999999", _inbound())
    assert (resp.status_code, resp.text) == (404, "Unknown run 999999")
