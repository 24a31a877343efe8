"""Twilio end to end through the four services: inbound webhooks, outbound calls, Agent Stream, status
callbacks and every signature refusal, with the simulator playing Twilio's cloud (it signs with the
official ``twilio`` SDK, so what voicebus accepts here is what Twilio sends).
"""

from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tests.e2e.conftest import E2E, TWILIO_FROM, TWILIO_NUMBER, TWILIO_SID, _agent, eventually
from voicebus.cli.demo import create_org
from voicebus.simulator.phone import CallerAction, PhoneScript
from voicebus.simulator.twilio.dial import InboundCall, dial_inbound
from voicebus.simulator.twilio.rest import Callee
from voicebus.simulator.twilio.stream import TwilioStreamCall
from voicebus.simulator.twilio.twiml import Stream


def _sid() -> str:
    return "CA" + uuid.uuid4().hex


def _inbound(e2e: E2E, **kw: Any) -> InboundCall:
    defaults: dict[str, Any] = dict(
        voicebus=e2e.stack.ingress_url, account_sid=TWILIO_SID, auth_token=e2e.twilio_token, to=TWILIO_NUMBER,
        from_="+15005550100", call_sid=_sid(), twilio_api=e2e.twilio.url,
        phone=PhoneScript(actions=[CallerAction.dtmf("1")], max_duration_s=60))
    defaults.update(kw)
    return InboundCall(**defaults)


async def _run_of(e2e: E2E, carrier_call_id: str, terminal: bool = True) -> dict[str, Any]:
    return await e2e.run_for_call(carrier_call_id, terminal=terminal, timeout=30)


async def _sim_call(e2e: E2E, sid: str, wait_ended: float = 10) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
        resp = await http.get(f"{e2e.twilio.url}/_sim/calls/{sid}", params={"wait_ended": wait_ended})
        resp.raise_for_status()
        return dict(resp.json())


async def _status_log(e2e: E2E, run_id: int, want: str) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        resp = await e2e.org.admin.get(f"/api/v1/runs/{run_id}")
        resp.raise_for_status()
        log = resp.json()["logs"].get("status_callbacks") or []
        return log if any(e.get("status") == want for e in log) else None

    return await eventually(probe, 20, f"a {want!r} status callback on run {run_id}")


@pytest.mark.parametrize("path", ["/api/v1/telephony/inbound/run", "/api/v1/telephony/twiml"])
async def test_inbound_call_runs_the_agent_and_is_hung_up_through_the_calls_api(e2e: E2E, path: str) -> None:
    call = _inbound(e2e, path=path)
    report = await dial_inbound(call)

    assert report.outcome == "streamed", report.render()
    assert report.webhooks[0].http_status == 200
    stream = report.stream
    assert stream is not None and stream.error is None, report.render()
    assert stream.first_agent_audio_ms is not None, report.render()
    assert stream.dtmf_sent == ["1"], report.render()
    # The TwiML named a per-call socket; its token rode a <Parameter>, not the URL.
    assert re.search(r'<Stream url="ws://127\.0\.0\.1:\d+/api/v1/telephony/media/[0-9a-f]{32}"', report.twiml)
    assert 'name="vb_token"' in report.twiml and "token" not in report.twiml.split('url="')[1].split('"')[0]

    run = await _run_of(e2e, call.call_sid)
    assert run["state"] == "completed" and run["end_reason"] == "agent_hangup", run
    assert re.fullmatch(r"WR-TEL-IN-\d{8}", run["name"]), run["name"]
    assert (run["call_type"], run["mode"]) == ("inbound", "twilio")
    assert run["telephony_configuration_id"] == e2e.twilio_config_id
    assert run["initial_context"]["caller_number"] == "+15005550100"
    assert run["initial_context"]["called_number"] == TWILIO_NUMBER
    assert run["logs"]["inbound_webhook"]["account_id"] == TWILIO_SID
    assert run["gathered_context"]["twilio_stream_sid"].startswith("MZ")

    # call-control hung the leg up with Twilio's Calls API (Status=completed), found by call id alone.
    sim = await _sim_call(e2e, call.call_sid)
    assert [h.get("status") or h.get("Status") for h in sim["hangups"]] == ["completed"], sim["hangups"]
    # Stream status callbacks, signed by the carrier and verified by call-control, are on the run.
    log = await _status_log(e2e, run["id"], "answered")
    assert log[0]["raw_status"] == "stream-started"
    assert all(c.http_status == 204 for c in report.stream_callbacks), report.stream_callbacks
    await e2e.wait_quota_free()


@pytest.mark.parametrize(("flag", "reason"), [
    ("tamper", "Signature validation failed: signature does not match"),
    ("wrong_token", "Signature validation failed: signature does not match"),
    ("no_signature", "Signature validation failed: missing X-Twilio-Signature"),
])
async def test_bad_signature_is_refused_with_403_and_creates_nothing(e2e: E2E, flag: str, reason: str) -> None:
    before = len(await e2e.runs())
    call = _inbound(e2e, **{flag: True})
    report = await dial_inbound(call)
    assert report.outcome == "error", report.render()
    assert report.webhooks[0].http_status == 403
    assert report.webhooks[0].body == reason
    assert len(await e2e.runs()) == before
    assert await e2e.quota_in_use() == 0


async def test_replayed_webhook_does_not_create_a_second_call(e2e: E2E) -> None:
    call = _inbound(e2e, replay=True, phone=PhoneScript(actions=[CallerAction.hangup()], max_duration_s=30))
    report = await dial_inbound(call)
    assert [w.http_status for w in report.webhooks] == [200, 409], report.render()
    assert "Replayed request" in report.webhooks[1].body
    runs = [r for r in await e2e.runs() if (r.get("gathered_context") or {}).get("call_id") == call.call_sid]
    assert len(runs) == 1, runs
    await e2e.wait_quota_free()


async def test_unknown_number_gets_twiml_that_says_so_and_hangs_up(e2e: E2E) -> None:
    before = len(await e2e.runs())
    report = await dial_inbound(_inbound(e2e, to="+15005550999"))
    assert report.outcome == "refused", report.render()
    assert report.refusal == "The number you called is not configured. Goodbye."
    assert report.verbs[-1] == "<Hangup>"
    assert len(await e2e.runs()) == before


async def test_media_socket_token_is_single_use(e2e: E2E) -> None:
    call = _inbound(e2e, reuse_token=True,
                    phone=PhoneScript(actions=[CallerAction.hangup()], hangup_after_s=1.0, max_duration_s=30))
    report = await dial_inbound(call)
    assert report.outcome == "streamed", report.render()
    assert report.reuse is not None and not report.reuse["accepted"], report.render()
    assert report.reuse["close_code"] == 4401, report.reuse
    assert report.reuse["close_reason"] == "Media socket token already used", report.reuse
    run = await _run_of(e2e, call.call_sid)
    assert (run["state"], run["end_reason"]) == ("completed", "caller_hangup"), run
    await e2e.wait_quota_free()


async def test_media_socket_without_a_waiting_call_is_refused(e2e: E2E) -> None:
    stream = Stream(url=f"{e2e.stack.ingress_ws_url}/api/v1/telephony/media/{uuid.uuid4().hex}",
                    parameters={"vb_token": "guess"})
    async with httpx.AsyncClient(trust_env=False) as http:
        report = await TwilioStreamCall(stream, PhoneScript(max_duration_s=5), account_sid=TWILIO_SID,
                                        call_sid=_sid(), auth_token=e2e.twilio_token, http=http).run()
    assert (report.close_code, report.close_reason) == (4404, "No call is waiting for this media socket")


# ---------------------------------------------------------------------------------------------- outbound
async def _initiate(e2e: E2E, to: str, **body: Any) -> httpx.Response:
    return await e2e.org.admin.post("/api/v1/telephony/initiate-call",
                                    json={"agent_uuid": e2e.agent_uuid, "to": to, **body})


async def test_outbound_call_is_answered_and_runs_the_agent(e2e: E2E) -> None:
    callee = "+15005550201"
    e2e.twilio.state.set_callee(callee, Callee("answer", dtmf="1"))
    resp = await _initiate(e2e, callee)
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["from"] == TWILIO_FROM and created["to"] == callee
    assert re.fullmatch(r"WR-TEL-OUT-\d{8}", created["run_name"])
    sid = created["carrier_call_id"]
    assert sid.startswith("CA")

    run = await _run_of(e2e, sid)
    assert (run["state"], run["end_reason"]) == ("completed", "agent_hangup"), run
    assert (run["call_type"], run["mode"]) == ("outbound", "twilio")
    assert run["initial_context"]["called_number"] == callee
    sim = await _sim_call(e2e, sid)
    assert sim["status"] == "completed" and not sim["errors"], sim
    # Twilio fetched the answer URL (signed) and got TwiML that streams; voicebus hung up through REST.
    assert [r["http_status"] for r in sim["answer_requests"]] == [200], sim["answer_requests"]
    assert sim["streams"], sim
    assert sim["hangups"], sim
    report = e2e.twilio.state.calls[sid].reports[-1]
    assert report.dtmf_sent == ["1"] and report.first_agent_audio_ms is not None
    log = await _status_log(e2e, run["id"], "completed")
    seen = [e["status"] for e in log]
    assert seen[:3] == ["initiated", "ringing", "answered"], seen
    resp = await e2e.org.admin.get(f"/api/v1/runs/{run['id']}")
    assert resp.json()["gathered_context"]["call_duration_s"] == sim["duration"], resp.json()
    # Status and cost, asked of the carrier through call-control.
    resp = await e2e.org.admin.get(f"/api/v1/runs/{run['id']}/carrier-call")
    assert resp.status_code == 200, resp.text
    info = resp.json()
    assert (info["status"], info["duration_s"]) == ("completed", sim["duration"]), info
    assert info["price"] == abs(float(sim["price"])) and info["price_unit"] == "USD", (info, sim["price"])
    assert all(c["http_status"] == 204 for c in sim["status_callbacks"]), sim["status_callbacks"]
    await e2e.wait_quota_free()


@pytest.mark.parametrize(("behaviour", "reason"), [("no-answer", "no-answer"), ("busy", "busy")])
async def test_outbound_call_not_answered_fails_the_run_with_the_carrier_status(e2e: E2E, behaviour: str,
                                                                                 reason: str) -> None:
    callee = f"+1500555030{len(behaviour)}"
    e2e.twilio.state.set_callee(callee, Callee(behaviour))  # type: ignore[arg-type]
    resp = await _initiate(e2e, callee)
    assert resp.status_code == 201, resp.text
    run = await _run_of(e2e, resp.json()["carrier_call_id"])
    assert (run["state"], run["end_reason"]) == ("failed", reason), run
    await e2e.wait_quota_free()


async def test_outbound_call_to_a_number_the_carrier_refuses(e2e: E2E) -> None:
    resp = await _initiate(e2e, "+15005550400", **{"from": "+15005559999"})  # not one of the from_numbers
    assert resp.status_code == 400, resp.text
    assert resp.json()["code"] == "invalid_request", resp.text
    await e2e.wait_quota_free()


@pytest.mark.parametrize(("credentials", "status", "code"), [
    ({"auth_token": "not-the-auth-token"}, 502, "carrier_auth_failed"),
    ({"from_numbers": ["+15005550077"]}, 400, "carrier_invalid_number"),  # a From the account does not own
])
async def test_outbound_carrier_refusal_is_a_specific_error_and_a_failed_run(e2e: E2E, credentials: dict[str, Any],
                                                                             status: int, code: str) -> None:
    org = create_org(e2e.stack, f"refused {code}")
    async with httpx.AsyncClient(base_url=e2e.stack.config_url, trust_env=False, timeout=20,
                                 headers={"Authorization": f"Bearer {org['api_key']}"}) as admin:
        agent = await _agent(admin)
        creds = {"account_sid": TWILIO_SID, "auth_token": e2e.twilio_token, "from_numbers": [TWILIO_FROM],
                 **credentials}
        resp = await admin.post("/api/v1/telephony-configurations",
                                json={"provider": "twilio", "name": "refused", "credentials": creds})
        assert resp.status_code == 201, resp.text
        resp = await admin.post("/api/v1/telephony/initiate-call", json={"agent_uuid": agent, "to": "+15005550500"})
        assert resp.status_code == status, resp.text
        body = resp.json()
        assert body["code"] == code, body
        assert e2e.twilio_token not in resp.text and "not-the-auth-token" not in resp.text
        run = (await admin.get(f"/api/v1/runs/{body['run_id']}")).json()
        assert run["state"] == "failed" and run["end_reason"].startswith(code), run
        assert (await admin.get("/api/v1/quota")).json()["in_use"] == 0


async def test_binding_a_number_points_its_voice_url_at_voicebus(e2e: E2E) -> None:
    numbers = (await e2e.org.admin.get("/api/v1/phone-numbers")).json()
    (number,) = [n for n in numbers if n["number"] == TWILIO_NUMBER]
    resp = await e2e.org.admin.post(f"/api/v1/phone-numbers/{number['id']}/bind")
    assert resp.status_code == 200, resp.text
    inbound_url = f"{e2e.stack.ingress_url}/api/v1/telephony/inbound/run"
    assert resp.json()["voice_url"] == inbound_url
    owned = e2e.twilio.state.number_by_e164(TWILIO_NUMBER)
    assert owned is not None and (owned.voice_url, owned.voice_method) == (inbound_url, "POST")
    assert resp.json()["number_sid"] == owned.sid


# ---------------------------------------------------------------------------------------------- Agent Stream
async def test_agent_stream_with_provider_twilio(e2e: E2E) -> None:
    call_sid = _sid()
    query = urlencode({"provider": "twilio", "from": "+15005550100", "to": TWILIO_NUMBER})
    stream = Stream(url=f"{e2e.stack.ingress_ws_url}/api/v1/agent-stream/{e2e.agent_uuid}?{query}")
    async with httpx.AsyncClient(trust_env=False) as http:
        report = await TwilioStreamCall(stream, PhoneScript(actions=[CallerAction.dtmf("1")], max_duration_s=60),
                                        account_sid=TWILIO_SID, call_sid=call_sid, auth_token=e2e.twilio_token,
                                        http=http).run()
    assert report.error is None and report.first_agent_audio_ms is not None, report.render()
    assert report.close_code == 1000, report.render()
    run = await _run_of(e2e, call_sid)
    assert (run["state"], run["end_reason"], run["mode"]) == ("completed", "agent_hangup", "twilio"), run
    assert re.fullmatch(r"WR-AGS-\d{8}", run["name"])
    assert run["telephony_configuration_id"] == e2e.twilio_config_id
    await e2e.wait_quota_free()


async def test_agent_stream_with_provider_twilio_refuses_a_wrong_signature(e2e: E2E) -> None:
    stream = Stream(url=f"{e2e.stack.ingress_ws_url}/api/v1/agent-stream/{e2e.agent_uuid}?provider=twilio")
    async with httpx.AsyncClient(trust_env=False) as http:
        report = await TwilioStreamCall(stream, PhoneScript(max_duration_s=10), account_sid=TWILIO_SID,
                                        call_sid=_sid(), auth_token="not-the-token", http=http).run()
    assert (report.close_code, report.close_reason) == (4400, "Twilio signature validation failed"), report.render()
