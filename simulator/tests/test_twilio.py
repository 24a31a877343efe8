"""Twilio's cloud as the simulator plays it, against a small in-test FastAPI app playing voicebus.

The app checks every signature with the official SDK's ``RequestValidator.validate`` (the independent
check), answers TwiML, and plays the agent on a plain WebSocket endpoint: no product code involved.
"""

from __future__ import annotations

import asyncio
import audioop
import base64
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response
from twilio.request_validator import RequestValidator

from voicebus.audio import pcm16_to_ulaw
from voicebus.simulator._server import serve_app
from voicebus.simulator.phone import CallerAction, PhoneScript
from voicebus.simulator.twilio.dial import InboundCall, dial_inbound
from voicebus.simulator.twilio.rest import Callee, RunningTwilioApi, run_twilio_api
from voicebus.simulator.twilio.signing import Tamper, send_signed, sign
from voicebus.simulator.twilio.twiml import Connect, Hangup, Say, TwimlError, parse_twiml

ACCOUNT = "AC" + "1" * 32
TOKEN = "twilio-auth-token-test"
OUR_NUMBER = "+15550001000"
FRAME = 160


def tone_ulaw(ms: int, freq: float = 440.0) -> bytes:
    n = 8 * ms
    pcm = b"".join(int(8000 * math.sin(2 * math.pi * freq * i / 8000)).to_bytes(2, "little", signed=True)
                   for i in range(n))
    return pcm16_to_ulaw(pcm)


@dataclass
class Seen:
    """Everything the in-test voicebus received, with the SDK's verdict on each signature."""

    webhooks: list[dict[str, Any]] = field(default_factory=list)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    upgrades: list[dict[str, Any]] = field(default_factory=list)
    frames: list[list[dict[str, Any]]] = field(default_factory=list)
    used_tokens: set[str] = field(default_factory=set)
    marks_acked: list[float] = field(default_factory=list)
    mark_sent_at: float = 0.0
    sockets_done: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Voicebus:
    url: str
    seen: Seen
    mode: dict[str, Any]


def _valid(url: str, params: list[tuple[str, str]] | dict[str, str], signature: str | None) -> bool:
    form: dict[str, list[str]] = {}
    for k, v in (params.items() if isinstance(params, dict) else params):
        form.setdefault(k, []).append(v)

    class _F(dict[str, list[str]]):
        def getlist(self, key: str) -> list[str]:
            return self[key]

    return RequestValidator(TOKEN).validate(url, _F(form), signature or "")


@asynccontextmanager
async def voicebus(**mode: Any) -> AsyncIterator[Voicebus]:
    """``mode``: ``refuse`` (Say+Hangup), ``agent`` ("talk" = greeting, mark, wait DTMF, close;
    "listen" = keep the socket until the carrier stops it)."""
    seen = Seen()
    app = FastAPI()
    base: dict[str, str] = {}

    def stream_twiml(call_id: str, token: str) -> str:
        ws = base["url"].replace("http://", "ws://")
        return (f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
                f'<Stream url="{ws}/api/v1/telephony/media/{call_id}" '
                f'statusCallback="{base["url"]}/api/v1/telephony/twilio/status-callback/7" '
                f'statusCallbackMethod="POST"><Parameter name="vb_token" value="{token}"/>'
                f'<Parameter name="lang" value="en"/></Stream></Connect></Response>')

    async def record(request: Request, into: list[dict[str, Any]]) -> dict[str, Any]:
        body = (await request.body()).decode()
        signed = parse_qsl(body, keep_blank_values=True) if request.method == "POST" else []
        params = signed or list(request.query_params.multi_items())
        entry = {"url": str(request.url), "params": dict(params), "headers": dict(request.headers),
                 "valid": _valid(str(request.url), signed, request.headers.get("x-twilio-signature"))}
        into.append(entry)
        return entry

    @app.post("/api/v1/telephony/inbound/run")
    async def inbound(request: Request) -> Response:
        entry = await record(request, seen.webhooks)
        if mode.get("refuse") or not entry["valid"]:
            return Response('<?xml version="1.0"?><Response><Say voice="alice">This number is not in service.'
                            '</Say><Hangup/></Response>', media_type="application/xml")
        return Response(stream_twiml(entry["params"]["CallSid"], "tok-" + entry["params"]["CallSid"]),
                        media_type="application/xml")

    @app.post("/api/v1/telephony/answer/{run_id}")
    async def answer(run_id: str, request: Request) -> Response:
        entry = await record(request, seen.webhooks)
        return Response(stream_twiml(entry["params"]["CallSid"], f"tok-out-{run_id}"), media_type="application/xml")

    @app.api_route("/api/v1/telephony/twilio/status-callback/{run_id}", methods=["GET", "POST"])
    async def status(run_id: str, request: Request) -> Response:
        await record(request, seen.callbacks)
        return Response(status_code=204)

    @app.websocket("/api/v1/telephony/media/{call_id}")
    async def media(ws: WebSocket, call_id: str) -> None:
        seen.upgrades.append({"url": str(ws.url), "headers": dict(ws.headers),
                              "valid": _valid(str(ws.url), {}, ws.headers.get("x-twilio-signature"))})
        await ws.accept()
        frames: list[dict[str, Any]] = []
        seen.frames.append(frames)
        try:
            frames.append(json.loads(await ws.receive_text()))
            start = json.loads(await ws.receive_text())
            frames.append(start)
            token = start["start"]["customParameters"].get("vb_token", "")
            if token in seen.used_tokens:
                await ws.close(4403, "token already used")
                return
            seen.used_tokens.add(token)
            seen.started.set()
            sid = start["streamSid"]
            if mode.get("agent", "talk") == "talk":
                ulaw = tone_ulaw(400)
                for i in range(0, len(ulaw), FRAME):
                    await ws.send_text(json.dumps({"event": "media", "streamSid": sid, "media": {
                        "payload": base64.b64encode(ulaw[i:i + FRAME]).decode()}}))
                await ws.send_text(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": "greeting"}}))
                seen.mark_sent_at = time.monotonic()
            while True:
                msg = json.loads(await ws.receive_text())
                frames.append(msg)
                if msg["event"] == "mark":
                    seen.marks_acked.append(time.monotonic())
                if msg["event"] == "dtmf" and mode.get("agent", "talk") == "talk":
                    await ws.close(1000, "agent done")
                    return
                if msg["event"] == "stop":
                    return
        except WebSocketDisconnect:
            pass
        finally:
            seen.sockets_done.set()

    async with serve_app(app) as running:
        base["url"] = running.url
        yield Voicebus(running.url, seen, mode)


def basic(account: str = ACCOUNT, token: str = TOKEN) -> httpx.BasicAuth:
    return httpx.BasicAuth(account, token)


@asynccontextmanager
async def twilio_api(**kw: Any) -> AsyncIterator[tuple[RunningTwilioApi, httpx.AsyncClient]]:
    async with run_twilio_api(ACCOUNT, TOKEN, [OUR_NUMBER], **kw) as api:
        async with httpx.AsyncClient(base_url=f"{api.url}/2010-04-01/Accounts/{ACCOUNT}", auth=basic(),
                                     trust_env=False, timeout=10) as http:
            yield api, http


ALL_EVENTS = ("initiated", "ringing", "answered", "completed")


def create_form(vb: Voicebus, to: str = "+15557770001",
                events: tuple[str, ...] = ALL_EVENTS) -> dict[str, str | list[str]]:
    """What call-control sends to create a call (StatusCallbackEvent repeated)."""
    return {"To": to, "From": OUR_NUMBER, "Url": f"{vb.url}/api/v1/telephony/answer/7", "Method": "POST",
            "StatusCallback": f"{vb.url}/api/v1/telephony/twilio/status-callback/7", "StatusCallbackMethod": "POST",
            "StatusCallbackEvent": list(events), "Timeout": "30"}


# ---------------------------------------------------------------------------------------------- signing
def test_signatures_are_twilios() -> None:
    url = "https://vb.example.com/api/v1/telephony/inbound/run"
    params = [("CallSid", "CA1"), ("From", "+1555"), ("StatusCallbackEvent", "ringing"),
              ("StatusCallbackEvent", "answered")]
    sig = sign(TOKEN, url, params)
    assert _valid(url, params, sig)
    assert not _valid(url, [*params[:1], ("From", "+1556"), *params[2:]], sig)
    ws = "wss://vb.example.com/api/v1/telephony/media/c1"
    assert RequestValidator(TOKEN).validate(ws, {}, sign(TOKEN, ws))
    assert not RequestValidator("other").validate(ws, {}, sign(TOKEN, ws))


def test_twiml_is_read_as_twilio_reads_it() -> None:
    verbs = parse_twiml('<?xml version="1.0"?><Response><Connect><Stream url="wss://h/m/1" statusCallback="https://h/s"'
                        ' name="n"><Parameter name="vb_token" value="t"/></Stream></Connect><Say>bye</Say>'
                        '<Hangup/></Response>')
    assert isinstance(verbs[0], Connect) and verbs[0].stream is not None
    assert verbs[0].stream.parameters == {"vb_token": "t"} and verbs[0].stream.status_callback == "https://h/s"
    assert verbs[1] == Say("bye") and verbs[2] == Hangup()
    for bad, why in [("<Response><Say>", "not XML"), ("<Twiml/>", "<Response>"),
                     ('<Response><Connect><Stream url="https://h"/></Connect></Response>', "ws://"),
                     ("<Response><Connect><Stream/></Connect></Response>", "without a url")]:
        with pytest.raises(TwimlError, match=re.escape(why)):
            parse_twiml(bad)


# ---------------------------------------------------------------------------------------------- inbound
async def test_inbound_call_is_signed_streams_and_answers_marks(tmp_path: Path) -> None:
    async with voicebus() as vb:
        report = await dial_inbound(InboundCall(vb.url, ACCOUNT, TOKEN, to=OUR_NUMBER, from_="+15551234567",
                                                phone=PhoneScript(actions=[CallerAction.dtmf("1")], max_duration_s=10,
                                                                  record_path=tmp_path / "in.wav")))
        await asyncio.wait_for(vb.seen.sockets_done.wait(), 5)
        seen = vb.seen

    assert report.outcome == "streamed" and report.error is None, report.render()
    (hook,) = seen.webhooks
    assert hook["valid"], "the SDK must accept the webhook signature"
    p, h = hook["params"], hook["headers"]
    assert {k: p[k] for k in ("AccountSid", "From", "To", "CallStatus", "Direction", "ApiVersion", "Caller",
                              "Called", "FromCountry", "ToCountry")} == {
        "AccountSid": ACCOUNT, "From": "+15551234567", "To": OUR_NUMBER, "CallStatus": "ringing",
        "Direction": "inbound", "ApiVersion": "2010-04-01", "Caller": "+15551234567", "Called": OUR_NUMBER,
        "FromCountry": "US", "ToCountry": "US"}
    assert re.fullmatch(r"CA[0-9a-f]{32}", p["CallSid"])
    assert h["user-agent"] == "TwilioProxy/1.1" and h["content-type"] == "application/x-www-form-urlencoded"
    assert h["i-twilio-idempotency-token"]

    (upgrade,) = seen.upgrades
    assert upgrade["valid"] and upgrade["url"].endswith(f"/api/v1/telephony/media/{p['CallSid']}")
    connected, start = seen.frames[0][:2]
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    s = start["start"]
    assert re.fullmatch(r"MZ[0-9a-f]{32}", s["streamSid"]) and start["streamSid"] == s["streamSid"]
    assert s == {"streamSid": s["streamSid"], "accountSid": ACCOUNT, "callSid": p["CallSid"], "tracks": ["inbound"],
                 "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                 "customParameters": {"vb_token": f"tok-{p['CallSid']}", "lang": "en"}}

    # The mark comes back once the 400 ms before it has been played, not when it arrived.
    assert seen.marks_acked and 0.3 <= seen.marks_acked[0] - seen.mark_sent_at <= 0.8
    assert report.stream is not None and report.stream.dtmf_sent == ["1"] and report.stream.marks == ["greeting"]
    assert report.stream.close_code == 1000 and report.stream.hung_up_by == "agent"
    assert (tmp_path / "in.wav").exists() and report.stream.recording_ms > 400
    voiced = [audioop.rms(report.stream.recording[i:i + 320], 2) > 2000
              for i in range(0, len(report.stream.recording), 320)]
    assert sum(voiced) >= 18  # the 400 ms greeting was heard

    # Stream status callbacks: started then stopped, signed, with the stream's identifiers.
    events = [c["params"]["StreamEvent"] for c in seen.callbacks]
    assert events == ["stream-started", "stream-stopped"]
    for c in seen.callbacks:
        assert c["valid"] and c["params"]["StreamSid"] == s["streamSid"] and c["params"]["CallSid"] == p["CallSid"]
        assert c["params"]["AccountSid"] == ACCOUNT and c["params"]["Timestamp"]
    assert [c.http_status for c in report.stream_callbacks] == [204, 204]
    kinds = [e.kind for e in report.events]
    assert kinds.index("webhook_sent") < kinds.index("twiml") < kinds.index("ws_open") < kinds.index("dtmf_sent")


@pytest.mark.parametrize("option", ["tamper", "no_signature", "wrong_token"])
async def test_bad_signatures_are_what_twilio_would_reject(option: str) -> None:
    async with voicebus() as vb:
        report = await dial_inbound(InboundCall(vb.url, ACCOUNT, TOKEN, to=OUR_NUMBER, **{option: True}))
        seen = vb.seen
    (hook,) = seen.webhooks
    assert not hook["valid"]
    assert ("x-twilio-signature" in hook["headers"]) == (option != "no_signature")
    if option == "tamper":
        assert hook["params"]["From"] == "+155555501000"  # changed after signing
    assert report.outcome == "refused" and "not in service" in report.refusal and report.stream is None


async def test_replay_sends_the_same_webhook_twice_with_one_idempotency_token() -> None:
    async with voicebus(refuse=True) as vb:
        report = await dial_inbound(InboundCall(vb.url, ACCOUNT, TOKEN, to=OUR_NUMBER, replay=True))
        seen = vb.seen
    a, b = seen.webhooks
    assert a["valid"] and b["valid"] and a["params"] == b["params"]
    assert a["headers"]["i-twilio-idempotency-token"] == b["headers"]["i-twilio-idempotency-token"]
    assert a["headers"]["x-twilio-signature"] == b["headers"]["x-twilio-signature"]
    assert [w.http_status for w in report.webhooks] == [200, 200]
    assert report.outcome == "refused" and report.says == ["This number is not in service."]
    assert "voicebus refused the call: This number is not in service." in report.render()


async def test_reuse_token_opens_the_socket_again_and_reports_the_refusal() -> None:
    async with voicebus() as vb:
        report = await dial_inbound(InboundCall(vb.url, ACCOUNT, TOKEN, to=OUR_NUMBER, reuse_token=True,
                                                phone=PhoneScript(actions=[CallerAction.dtmf("5")])))
        seen = vb.seen
    assert report.outcome == "streamed"
    assert len(seen.upgrades) == 2 and all(u["valid"] for u in seen.upgrades)
    assert seen.frames[1][1]["start"]["customParameters"]["vb_token"] == seen.frames[0][1]["start"][
        "customParameters"]["vb_token"]
    assert report.reuse is not None and not report.reuse["accepted"]
    assert report.reuse["close_code"] == 4403 and "4403" in report.reuse["verdict"]


async def test_unreachable_voicebus_is_an_error() -> None:
    async with voicebus() as vb:
        url = vb.url
    report = await dial_inbound(InboundCall(url, ACCOUNT, TOKEN, to=OUR_NUMBER))
    assert report.outcome == "error" and "unreachable" in (report.error or "")


# ---------------------------------------------------------------------------------------------- REST shapes
async def test_rest_shapes_and_error_codes() -> None:
    async with voicebus() as vb, twilio_api() as (api, http):
        for auth in (None, basic(token="nope"), basic(account="AC" + "2" * 32)):
            r = await http.post("/Calls.json", data=create_form(vb), auth=auth or httpx.BasicAuth("", ""))
            assert r.status_code == 401
            assert r.json() == {"code": 20003, "message": "Authenticate",
                                "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401}
        r = await http.post("/Calls.json", data={**create_form(vb), "To": "5557770001"})
        assert r.status_code == 400 and r.json()["code"] == 21211 and r.json()["status"] == 400
        r = await http.post("/Calls.json", data={**create_form(vb), "From": "+15550009999"})
        assert r.status_code == 400 and r.json()["code"] == 21212
        r = await http.post("/Calls.json", data={**create_form(vb), "StatusCallbackEvent": "busy"})
        assert r.status_code == 400 and r.json()["code"] == 21626
        r = await http.get(f"/Calls/CA{'0' * 32}.json")
        assert r.status_code == 404 and r.json()["code"] == 20404
        r = await http.post(f"/Calls/CA{'0' * 32}.json", data={"Status": "completed"})
        assert r.status_code == 404 and r.json()["code"] == 20404
        assert not api.state.calls  # nothing refused was placed

        api.state.set_callee("+15557770001", Callee("busy"))
        r = await http.post("/Calls.json", data=create_form(vb))
        assert r.status_code == 201
        call = r.json()
        assert re.fullmatch(r"CA[0-9a-f]{32}", call["sid"]) and call["status"] == "queued"
        assert call["account_sid"] == ACCOUNT and call["to"] == "+15557770001" and call["from"] == OUR_NUMBER
        assert call["direction"] == "outbound-api" and call["api_version"] == "2010-04-01"
        assert call["uri"] == f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{call['sid']}.json"
        fetched = (await http.get(f"/Calls/{call['sid']}.json")).json()
        assert {"status", "duration", "price", "price_unit"} <= fetched.keys() and fetched["price_unit"] == "USD"

        r = await http.get("/IncomingPhoneNumbers.json", params={"PhoneNumber": OUR_NUMBER})
        (num,) = r.json()["incoming_phone_numbers"]
        assert num["phone_number"] == OUR_NUMBER and re.fullmatch(r"PN[0-9a-f]{32}", num["sid"])
        assert (await http.get("/IncomingPhoneNumbers.json", params={"PhoneNumber": "+19999"})).json()[
            "incoming_phone_numbers"] == []
        r = await http.post(f"/IncomingPhoneNumbers/{num['sid']}.json",
                            data={"VoiceUrl": f"{vb.url}/api/v1/telephony/inbound/run", "VoiceMethod": "POST"})
        assert r.status_code == 200 and r.json()["voice_url"] == f"{vb.url}/api/v1/telephony/inbound/run"
        assert api.state.numbers[num["sid"]].updates[0]["voice_method"] == "POST"
        r = await http.post(f"/IncomingPhoneNumbers/PN{'0' * 32}.json", data={"VoiceUrl": "https://x"})
        assert r.status_code == 404 and r.json()["code"] == 20404
        assert (await http.get("/IncomingPhoneNumbers.json", auth=basic(token="x"))).status_code == 401


# ---------------------------------------------------------------------------------------------- outbound
async def wait_ended(api: RunningTwilioApi, sid: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=api.url, trust_env=False, timeout=30) as sim:
        return (await sim.get(f"/_sim/calls/{sid}", params={"wait_ended": 20})).json()


async def test_created_call_fetches_its_url_and_opens_the_stream_the_twiml_names(tmp_path: Path) -> None:
    async with voicebus() as vb, twilio_api(record_dir=tmp_path) as (api, http):
        api.state.set_callee("+15557770001", Callee("answer", dtmf="2"))
        sid = (await http.post("/Calls.json", data=create_form(vb))).json()["sid"]
        info = await wait_ended(api, sid)
        seen = vb.seen

    assert info["status"] == "completed", info
    (answer,) = seen.webhooks
    assert answer["valid"] and answer["url"] == f"{vb.url}/api/v1/telephony/answer/7"
    assert {k: answer["params"][k] for k in ("CallSid", "AccountSid", "From", "To", "Direction", "CallStatus",
                                             "ApiVersion")} == {
        "CallSid": sid, "AccountSid": ACCOUNT, "From": OUR_NUMBER, "To": "+15557770001",
        "Direction": "outbound-api", "CallStatus": "in-progress", "ApiVersion": "2010-04-01"}
    (upgrade,) = seen.upgrades
    assert upgrade["valid"] and upgrade["url"] == f"{vb.url.replace('http', 'ws')}/api/v1/telephony/media/{sid}"
    start = seen.frames[0][1]["start"]
    assert start["callSid"] == sid and start["customParameters"] == {"vb_token": "tok-out-7", "lang": "en"}

    calls = [c for c in seen.callbacks if "CallStatus" in c["params"]]
    streams = [c for c in seen.callbacks if "StreamEvent" in c["params"]]
    assert all(c["valid"] for c in seen.callbacks)
    assert [c["params"]["CallStatus"] for c in calls] == ["initiated", "ringing", "in-progress", "completed"]
    assert [c["params"]["SequenceNumber"] for c in calls] == ["0", "1", "2", "3"]
    done = calls[-1]["params"]
    assert done["CallDuration"] == str(info["duration"]) and done["Duration"] == str(math.ceil(info["duration"] / 60))
    assert [c["params"]["StreamEvent"] for c in streams] == ["stream-started", "stream-stopped"]
    assert [c["http_status"] for c in info["status_callbacks"]] == [204, 204, 204, 204]
    assert info["answer_requests"][0]["http_status"] == 200
    assert info["verbs"] == [f"<Connect><Stream url={vb.url.replace('http', 'ws')}/api/v1/telephony/media/{sid}> "
                             "parameters: lang, vb_token"]
    (stream,) = info["streams"]
    assert stream["custom_parameters"] == {"vb_token": "<redacted>", "lang": "en"}
    assert "tok-out-7" not in json.dumps(info)  # the socket's token is not echoed by the inspection API
    assert stream["dtmf_sent"] == ["2"] and stream["marks"] == ["greeting"] and stream["closed_by"] == "agent"
    assert info["recording_path"] == str(tmp_path / f"{sid}.wav") and (tmp_path / f"{sid}.wav").exists()


async def test_rest_hangup_stops_the_stream_and_completes_the_call() -> None:
    async with voicebus(agent="listen") as vb, twilio_api() as (api, http):
        sid = (await http.post("/Calls.json", data=create_form(vb))).json()["sid"]
        await asyncio.wait_for(vb.seen.started.wait(), 5)  # the stream is up: the agent has seen start
        r = await http.post(f"/Calls/{sid}.json", data={"Status": "completed"})
        assert r.status_code == 200 and r.json()["status"] == "completed"
        info = await wait_ended(api, sid)
        await asyncio.wait_for(vb.seen.sockets_done.wait(), 5)
        seen = vb.seen
    frames = seen.frames[0]
    assert frames[-1]["event"] == "stop" and frames[-1]["stop"] == {"accountSid": ACCOUNT, "callSid": sid}
    assert info["hangups"][0]["status"] == "completed" and info["streams"][0]["end_cause"] == "rest_hangup"
    assert info["streams"][0]["stop_sent"]
    statuses = [c["params"].get("CallStatus") for c in seen.callbacks if "CallStatus" in c["params"]]
    assert statuses[-1] == "completed"


@pytest.mark.parametrize("behaviour,status", [("busy", "busy"), ("no-answer", "no-answer"), ("fail", "failed")])
async def test_unanswered_calls_get_the_right_callbacks_and_no_stream(behaviour: str, status: str) -> None:
    async with voicebus() as vb, twilio_api() as (api, http):
        api.state.set_callee("+15557770002", Callee(behaviour))  # type: ignore[arg-type]
        sid = (await http.post("/Calls.json", data=create_form(vb, to="+15557770002"))).json()["sid"]
        info = await wait_ended(api, sid)
        fetched = (await http.get(f"/Calls/{sid}.json")).json()
        seen = vb.seen
    assert info["status"] == status and fetched["status"] == status and fetched["price"] is None
    assert [c["params"]["CallStatus"] for c in seen.callbacks] == ["initiated", "ringing", status]
    assert seen.callbacks[-1]["params"]["CallDuration"] == "0"
    assert seen.webhooks == [] and seen.upgrades == [] and info["streams"] == []


async def test_only_the_events_asked_for_are_sent_and_per_call_behaviour() -> None:
    async with voicebus(agent="talk") as vb, twilio_api() as (api, http):
        api.state.next_behaviours = ["busy"]  # the next call, whatever its number
        sid = (await http.post("/Calls.json", data=create_form(vb, events=("completed",)))).json()["sid"]
        info = await wait_ended(api, sid)
        seen = vb.seen
    assert info["behaviour"] == "busy"
    assert [c["params"]["CallStatus"] for c in seen.callbacks] == ["busy"]


async def test_cli_twilio_inbound_refusal() -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "voicebus-sim")
    async with voicebus(refuse=True) as vb:
        proc = await asyncio.create_subprocess_exec(
            exe, "call", "--provider", "twilio", "--voicebus", vb.url, "--account-sid", ACCOUNT,
            "--auth-token", TOKEN, "--to", OUR_NUMBER, "--from", "+14445550000", "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert vb.seen.webhooks[0]["valid"]
    assert proc.returncode == 3, err.decode()
    report = json.loads(out)
    assert report["outcome"] == "refused" and report["says"] == ["This number is not in service."]
    assert TOKEN not in out.decode() + err.decode()
    proc = await asyncio.create_subprocess_exec(exe, "call", "--provider", "twilio", "--to", OUR_NUMBER,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"--voicebus" in err


async def test_send_signed_records_what_voicebus_answered() -> None:
    async with voicebus() as vb, httpx.AsyncClient(trust_env=False) as http:
        url = f"{vb.url}/api/v1/telephony/twilio/status-callback/7"
        ok = await send_signed(http, "status-callback", "completed", url, [("CallSid", "CA1")], TOKEN)
        bad = await send_signed(http, "status-callback", "completed", url, [("CallSid", "CA1")], TOKEN,
                                tamper=Tamper(wrong_token=True))
        got = await send_signed(http, "stream-callback", "stream-started", url, [("CallSid", "CA1")], TOKEN,
                                method="GET")
        seen = vb.seen
    assert ok.http_status == 204 and bad.http_status == 204
    assert [c["valid"] for c in seen.callbacks] == [True, False, True]
    assert got.url.endswith("?CallSid=CA1") and got.http_status == 204
    assert seen.callbacks[2]["params"] == {"CallSid": "CA1"}


async def test_rest_hangup_of_an_inbound_call_ends_its_stream() -> None:
    async with voicebus(agent="listen") as vb, twilio_api() as (api, http):
        call = InboundCall(vb.url, ACCOUNT, TOKEN, to=OUR_NUMBER, twilio_api=api.url)
        dial = asyncio.create_task(dial_inbound(call))
        await asyncio.wait_for(vb.seen.started.wait(), 5)
        r = await http.post(f"/Calls/{call.call_sid}.json", data={"Status": "completed"})
        assert r.status_code == 200 and r.json()["status"] == "completed" and r.json()["direction"] == "inbound"
        report = await asyncio.wait_for(dial, 10)
        seen = vb.seen
    assert report.stream is not None and report.stream.end_cause == "rest_hangup"
    assert report.stream.hung_up_by == "agent" and report.stream.find("stop_sent")
    assert seen.frames[0][-1]["event"] == "stop"
    assert api.state.calls[call.call_sid].hangups[0]["status"] == "completed"


async def test_twilio_api_process_serves_and_stops_on_sigterm() -> None:
    import signal

    exe = os.path.join(os.path.dirname(sys.executable), "voicebus-sim")
    async with voicebus() as vb:
        proc = await asyncio.create_subprocess_exec(
            exe, "twilio-api", "--port", "0", "--account-sid", ACCOUNT, "--auth-token", TOKEN,
            "--number", OUR_NUMBER, "--callee", "+15557770003=no-answer", "--ring-ms", "0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or "listening on" not in lines[-1]:
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            assert line, "the stand-in exited before listening"
            lines.append(line)
        base = lines[-1].rsplit(" ", 1)[-1].strip()
        assert any(OUR_NUMBER in line for line in lines)
        async with httpx.AsyncClient(base_url=f"{base}/2010-04-01/Accounts/{ACCOUNT}", auth=basic(),
                                     trust_env=False, timeout=10) as http:
            r = await http.post("/Calls.json", data=create_form(vb, to="+15557770003"))
            assert r.status_code == 201
            async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as sim:
                info = (await sim.get(f"/_sim/calls/{r.json()['sid']}", params={"wait_ended": 10})).json()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        seen = vb.seen
    assert proc.returncode == 0
    assert info["status"] == "no-answer" and [c["params"]["CallStatus"] for c in seen.callbacks][-1] == "no-answer"
    bad = await asyncio.create_subprocess_exec(exe, "twilio-api", "--account-sid", "nope", "--auth-token", "t",
                                               stderr=asyncio.subprocess.PIPE)
    _, err = await bad.communicate()
    assert bad.returncode == 2 and b"AC followed by 32 hex" in err
