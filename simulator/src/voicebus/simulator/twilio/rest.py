"""A stand-in for Twilio's REST API, and the calls it places: Twilio's cloud for outbound calls.

Served under ``/2010-04-01/Accounts/{AccountSid}/`` with Twilio's documented shapes (Basic auth
``AccountSid:AuthToken``; errors as ``{code, message, more_info, status}``):

- ``POST Calls.json`` (To, From, Url | Twiml, Method, StatusCallback, StatusCallbackEvent (repeated),
  StatusCallbackMethod, Timeout): 201 + the call resource (``CA…``, ``queued``); 401 ``20003`` on bad
  credentials, 400 ``21211`` To not E.164, ``21212`` From not one of the account's numbers, ``21201``
  / ``21213`` / ``21205`` for a missing To / From / Url.
- ``GET Calls/{Sid}.json``: status, duration, price, price_unit; 404 ``20404`` for an unknown sid.
- ``POST Calls/{Sid}.json``: ``Status=completed|canceled`` hangs up (the media stream gets ``stop``
  and closes, the ``completed`` callback follows); ``Twiml`` / ``Url`` redirect a live call.
- ``GET IncomingPhoneNumbers.json[?PhoneNumber=]``, ``GET|POST IncomingPhoneNumbers/{Sid}.json``
  (VoiceUrl, VoiceMethod recorded).

A created call then behaves as Twilio's does: signed status callbacks for the events asked for
(``initiated``, ``ringing``, ``answered``, ``completed``), then per the callee's behaviour (``answer``,
``busy``, ``no-answer``, ``fail``) it fetches the answer ``Url`` (signed form) and follows the TwiML:
``<Connect><Stream>`` opens the media socket (:mod:`.stream`) with the callee's script playing;
``<Say>``, ``<Pause>``, ``<Hangup>``, ``<Redirect>`` are followed and recorded.

Behind the scenes (``/_sim/``): ``GET /_sim/calls``, ``GET /_sim/calls/{sid}[?wait_ended=S]`` (events,
TwiML received, status callbacks sent and what voicebus answered, hangups, marks/clears, recording),
``POST /_sim/calls`` (register an inbound call so a REST hangup can end it), ``POST
/_sim/calls/{sid}/end`` (its caller hung up), ``POST /_sim/callees`` (behaviour and script per
destination number), ``POST /_sim/behaviour`` (behaviours for the next calls, ring time, failures),
``POST /_sim/numbers``, ``GET /_sim/healthz``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from voicebus.simulator._server import RunningServer, serve_app
from voicebus.simulator.phone import CallerAction, CallReport, PhoneScript, TimelineEvent
from voicebus.simulator.twilio.signing import API_VERSION, Pairs, SentRequest, rfc2822, send_signed
from voicebus.simulator.twilio.stream import TwilioStreamCall
from voicebus.simulator.twilio.twiml import (
    Connect,
    Hangup,
    Other,
    Pause,
    Redirect,
    Reject,
    Say,
    TwimlError,
    Verb,
    describe,
    parse_twiml,
)

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
Behaviour = Literal["answer", "busy", "no-answer", "fail"]
BEHAVIOURS: tuple[str, ...] = ("answer", "busy", "no-answer", "fail")
CALL_EVENTS = ("initiated", "ringing", "answered", "completed")
PRICE_PER_MINUTE = 0.014
MAX_WAIT_ENDED_S = 60.0
MAX_REDIRECTS = 10
API_PREFIX = "/2010-04-01/Accounts/{account}"


def _now() -> datetime:
    return datetime.now(UTC)


def _sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def twilio_error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                         "status": status}, status_code=status)


def not_found(request: Request) -> JSONResponse:
    """Twilio's 404 for a resource (or an account) it does not know."""
    return twilio_error(404, 20404, f"The requested resource {request.url.path} was not found")


def _redact_tokens(params: dict[str, str]) -> dict[str, str]:
    """Stream parameters named like a token authorize a socket: inspection shows that they came, not them."""
    return {k: ("<redacted>" if "token" in k.lower() else v) for k, v in params.items()}


def _redact_twiml(text: str) -> str:
    return re.sub(r'(<Parameter\b[^>]*\bname="[^"]*token[^"]*"[^>]*\bvalue=")[^"]*(")', r"\1<redacted>\2", text,
                  flags=re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- state
@dataclass
class Callee:
    """How a destination number behaves when called, and what its person does once connected."""

    behaviour: Behaviour = "answer"
    dtmf: str = ""
    say_wav: str | None = None
    hangup_after_s: float | None = None

    def script(self, max_duration_s: float, record_path: Path | None) -> PhoneScript:
        actions: list[CallerAction] = []
        if self.say_wav:
            actions.append(CallerAction.say(self.say_wav))
        if self.dtmf:
            actions.append(CallerAction.dtmf(self.dtmf))
        return PhoneScript(actions=actions, hangup_after_s=self.hangup_after_s, max_duration_s=max_duration_s,
                           record_path=record_path)


@dataclass
class PhoneNumber:
    sid: str
    phone_number: str
    voice_url: str = ""
    voice_method: str = "POST"
    friendly_name: str = ""
    date_created: datetime = field(default_factory=_now)
    date_updated: datetime = field(default_factory=_now)
    updates: list[dict[str, Any]] = field(default_factory=list)

    def resource(self, account_sid: str) -> dict[str, Any]:
        return {
            "sid": self.sid, "account_sid": account_sid, "phone_number": self.phone_number,
            "friendly_name": self.friendly_name or self.phone_number, "voice_url": self.voice_url or None,
            "voice_method": self.voice_method, "sms_url": None, "status_callback": None, "api_version": API_VERSION,
            "capabilities": {"voice": True, "sms": True, "mms": True, "fax": False},
            "date_created": rfc2822(self.date_created), "date_updated": rfc2822(self.date_updated),
            "uri": f"/2010-04-01/Accounts/{account_sid}/IncomingPhoneNumbers/{self.sid}.json",
        }


@dataclass
class SimCall:
    sid: str
    account_sid: str
    to: str
    from_: str
    direction: Literal["outbound-api", "inbound"]
    url: str = ""
    method: str = "POST"
    twiml: str = ""
    status_callback: str = ""
    status_callback_events: tuple[str, ...] = ("completed",)
    status_callback_method: str = "POST"
    timeout_s: int = 60
    behaviour: Behaviour = "answer"
    callee: Callee = field(default_factory=Callee)
    status: str = "queued"
    date_created: datetime = field(default_factory=_now)
    date_updated: datetime = field(default_factory=_now)
    start_time: datetime | None = None
    end_time: datetime | None = None
    t0: float = field(default_factory=time.monotonic)
    answered_at: float | None = None
    duration_s: int | None = None
    events: list[TimelineEvent] = field(default_factory=list)
    requests: list[SentRequest] = field(default_factory=list)
    twiml_docs: list[dict[str, Any]] = field(default_factory=list)
    verbs: list[str] = field(default_factory=list)
    says: list[str] = field(default_factory=list)
    hangups: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    streams: list[dict[str, Any]] = field(default_factory=list)
    reports: list[CallReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    recording_path: str | None = None
    seq: int = 0
    media: TwilioStreamCall | None = None
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    pending: tuple[str, str, str] | None = None  # ("twiml", body, "") or ("url", url, method)
    hangup_status: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "busy", "no-answer", "failed", "canceled")

    def event(self, kind: str, **detail: Any) -> None:
        self.events.append(TimelineEvent(int((time.monotonic() - self.t0) * 1000), kind, detail))

    def price(self) -> str | None:
        if self.duration_s is None or self.status != "completed":
            return None
        return f"{-PRICE_PER_MINUTE * math.ceil(self.duration_s / 60):.5f}"

    def resource(self) -> dict[str, Any]:
        base = f"/2010-04-01/Accounts/{self.account_sid}/Calls/{self.sid}"
        return {
            "sid": self.sid, "account_sid": self.account_sid, "api_version": API_VERSION, "annotation": None,
            "answered_by": None, "caller_name": None, "direction": self.direction, "forwarded_from": None,
            "from": self.from_, "from_formatted": self.from_, "to": self.to, "to_formatted": self.to,
            "group_sid": None, "parent_call_sid": None, "phone_number_sid": None, "trunk_sid": None,
            "status": self.status, "queue_time": "0",
            "date_created": rfc2822(self.date_created), "date_updated": rfc2822(self.date_updated),
            "start_time": rfc2822(self.start_time) if self.start_time else None,
            "end_time": rfc2822(self.end_time) if self.end_time else None,
            "duration": str(self.duration_s) if self.duration_s is not None else None,
            "price": self.price(), "price_unit": "USD",
            "uri": f"{base}.json",
            "subresource_uris": {"notifications": f"{base}/Notifications.json",
                                 "recordings": f"{base}/Recordings.json", "events": f"{base}/Events.json"},
        }

    def inspection(self) -> dict[str, Any]:
        return {
            "sid": self.sid, "direction": self.direction, "from": self.from_, "to": self.to, "status": self.status,
            "behaviour": self.behaviour, "url": self.url, "method": self.method,
            "status_callback": self.status_callback, "status_callback_events": list(self.status_callback_events),
            "status_callback_method": self.status_callback_method, "timeout": self.timeout_s,
            "duration": self.duration_s, "price": self.price(),
            "events": [{"t_ms": e.t_ms, "kind": e.kind, **({"detail": e.detail} if e.detail else {})}
                       for e in self.events],
            "answer_requests": [r.as_dict() for r in self.requests if r.kind == "answer"],
            "status_callbacks": [r.as_dict() for r in self.requests if r.kind == "status-callback"],
            "stream_callbacks": [r.as_dict() for r in self.requests if r.kind == "stream-callback"],
            "twiml": [{**d, "body": _redact_twiml(d["body"])} for d in self.twiml_docs],
            "verbs": list(self.verbs), "says": list(self.says), "hangups": list(self.hangups),
            "updates": list(self.updates), "streams": list(self.streams), "errors": list(self.errors),
            "recording_path": self.recording_path,
        }


class TwilioState:
    """Everything the stand-in knows; tests in the same process may drive and inspect it directly."""

    def __init__(self, account_sid: str, auth_token: str, numbers: list[str] | None = None, *,
                 ring_ms: int = 100, max_call_s: float = 120.0, record_dir: str | Path | None = None) -> None:
        if not re.fullmatch(r"AC[0-9a-fA-F]{32}", account_sid):
            raise ValueError("account SID must be AC followed by 32 hex digits")
        if not auth_token:
            raise ValueError("auth token must not be empty")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.numbers: dict[str, PhoneNumber] = {}
        self.calls: dict[str, SimCall] = {}
        self.callees: dict[str, Callee] = {}
        self.default_callee = Callee()
        self.next_behaviours: list[Behaviour] = []
        self.fail_next: list[int] = []
        self.ring_ms = ring_ms
        self.max_call_s = max_call_s
        self.record_dir = Path(record_dir) if record_dir else None
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)  # a missing folder must not fail every call
        self.closing = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        for n in numbers or []:
            self.add_number(n)

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(trust_env=False, timeout=15)
        return self._http

    def add_number(self, phone_number: str, voice_url: str = "") -> PhoneNumber:
        if not E164.match(phone_number):
            raise ValueError(f"{phone_number!r} is not an E.164 number (+ and up to 15 digits)")
        for existing in self.numbers.values():
            if existing.phone_number == phone_number:
                return existing
        n = PhoneNumber(_sid("PN"), phone_number, voice_url=voice_url)
        self.numbers[n.sid] = n
        return n

    def number_by_e164(self, phone_number: str) -> PhoneNumber | None:
        return next((n for n in self.numbers.values() if n.phone_number == phone_number), None)

    def set_callee(self, number: str, callee: Callee) -> None:
        if not E164.match(number):
            raise ValueError(f"{number!r} is not an E.164 number")
        self.callees[number] = callee

    def callee_for(self, to: str) -> Callee:
        return self.callees.get(to, self.default_callee)

    def register_inbound(self, sid: str, from_: str, to: str) -> SimCall:
        """An inbound call placed by ``voicebus-sim call --provider twilio``: in progress, REST-hangable."""
        if sid in self.calls:
            raise FileExistsError(f"call {sid} already exists")
        call = SimCall(sid, self.account_sid, to, from_, "inbound", status="in-progress", start_time=_now())
        call.answered_at = time.monotonic()
        call.event("inbound_registered")
        self.calls[sid] = call
        return call

    async def aclose(self) -> None:
        self.closing.set()
        tasks = [c.task for c in self.calls.values() if c.task is not None and not c.task.done()]
        for c in self.calls.values():
            if c.media is not None:
                c.media.carrier_hangup("rest_hangup")
            c.interrupt.set()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
            for t in tasks:
                t.cancel()
        if self._http is not None:
            await self._http.aclose()


# ---------------------------------------------------------------------------------------------- a call's life
def _callback_params(call: SimCall, status: str) -> Pairs:
    call.seq += 1
    return [("AccountSid", call.account_sid), ("ApiVersion", API_VERSION), ("CallSid", call.sid),
            ("CallStatus", status), ("Called", call.to), ("Caller", call.from_), ("Direction", call.direction),
            ("From", call.from_), ("To", call.to), ("CallbackSource", "call-progress-events"),
            ("SequenceNumber", str(call.seq - 1)), ("Timestamp", rfc2822())]


async def _status_callback(st: TwilioState, call: SimCall, event: str, status: str) -> None:
    call.status, call.date_updated = status if status != "initiated" else call.status, _now()
    call.event("status", event=event, status=status)
    if not call.status_callback or event not in call.status_callback_events:
        return
    params = _callback_params(call, status)
    if event == "completed":
        secs = call.duration_s or 0
        params += [("CallDuration", str(secs)), ("Duration", str(math.ceil(secs / 60)))]
    method: Literal["GET", "POST"] = "GET" if call.status_callback_method == "GET" else "POST"
    sent = await send_signed(st.http, "status-callback", event, call.status_callback, params, st.auth_token,
                             method=method)
    call.requests.append(sent)
    call.event("status_callback", event=event, http_status=sent.http_status, error=sent.error)


async def _wait(call: SimCall, seconds: float) -> bool:
    """Sleep unless interrupted (REST hangup or redirect); True if interrupted."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(call.interrupt.wait(), seconds)
    return call.interrupt.is_set()


def _answer_params(call: SimCall) -> Pairs:
    return [("AccountSid", call.account_sid), ("ApiVersion", API_VERSION), ("CallSid", call.sid),
            ("CallStatus", "in-progress"), ("Called", call.to), ("Caller", call.from_), ("Direction", call.direction),
            ("From", call.from_), ("To", call.to)]


async def _fetch_twiml(st: TwilioState, call: SimCall, url: str, method: str) -> str | None:
    m: Literal["GET", "POST"] = "GET" if method.upper() == "GET" else "POST"
    sent = await send_signed(st.http, "answer", "answer", url, _answer_params(call), st.auth_token, method=m)
    call.requests.append(sent)
    call.event("answer_fetched", http_status=sent.http_status, error=sent.error)
    if sent.error or sent.http_status is None or not 200 <= sent.http_status < 300:
        call.errors.append(f"11200 HTTP retrieval failure: {sent.error or sent.http_status}")
        return None
    return sent.body


async def _run_stream(st: TwilioState, call: SimCall, verb: Connect) -> None:
    assert verb.stream is not None
    record = st.record_dir / f"{call.sid}.wav" if st.record_dir else None
    script = call.callee.script(st.max_call_s, record)
    media = TwilioStreamCall(verb.stream, script, account_sid=call.account_sid, call_sid=call.sid,
                             auth_token=st.auth_token, http=st.http,
                             on_event=lambda e: call.event(f"stream.{e.kind}", **e.detail))
    call.media = media
    info: dict[str, Any] = {"url": verb.stream.url, "stream_sid": media.ids.stream_sid,
                            "custom_parameters": _redact_tokens(verb.stream.parameters),
                            "status_callback": verb.stream.status_callback}
    call.streams.append(info)
    if call.interrupt.is_set():
        return
    report = await media.play()
    call.media = None
    call.reports.append(report)
    call.requests.extend(media.callbacks)
    info.update(end_cause=report.end_cause, close_code=report.close_code, close_reason=report.close_reason,
                closed_by=report.closed_by, marks=list(report.marks), clears=report.clears,
                dtmf_sent=list(report.dtmf_sent), audio_bytes=report.audio_bytes, frames_sent=report.frames_sent,
                first_agent_audio_ms=report.first_agent_audio_ms, error=report.error,
                stop_sent=bool(report.find("stop_sent")), recording_path=report.wav_path)
    if report.wav_path:
        call.recording_path = report.wav_path
    if report.end_cause == "connect_failed":
        call.errors.append(f"31920 stream connection failed: {report.error}")


async def _follow(st: TwilioState, call: SimCall, body: str, source: str) -> tuple[str, str] | None:
    """Run one TwiML document; returns a Redirect target, or None when the call is over."""
    call.twiml_docs.append({"source": source, "body": body})
    try:
        verbs: list[Verb] = parse_twiml(body)
    except TwimlError as e:
        call.errors.append(f"12100 document parse failure: {e}")
        call.event("twiml_error", error=str(e))
        return None
    for verb in verbs:
        if call.interrupt.is_set():
            return None
        call.verbs.append(describe(verb))
        call.event("verb", verb=describe(verb))
        if isinstance(verb, Connect):
            if verb.stream is not None:
                await _run_stream(st, call, verb)
        elif isinstance(verb, Say):
            call.says.append(verb.text)
        elif isinstance(verb, Pause):
            if await _wait(call, verb.length_s):
                return None
        elif isinstance(verb, Hangup | Reject):
            return None
        elif isinstance(verb, Redirect):
            return verb.url, verb.method
        elif isinstance(verb, Other):
            call.event("verb_ignored", tag=verb.tag)
    return None


async def _run_call(st: TwilioState, call: SimCall) -> None:
    """Twilio's side of an outbound call, from ``queued`` to a terminal status."""
    try:
        await _status_callback(st, call, "initiated", "initiated")
        if await _wait(call, st.ring_ms / 2000):
            return await _end(st, call, "canceled")
        await _status_callback(st, call, "ringing", "ringing")
        if await _wait(call, st.ring_ms / 1000):
            return await _end(st, call, "canceled")
        if call.behaviour != "answer":
            return await _end(st, call, {"busy": "busy", "no-answer": "no-answer", "fail": "failed"}[call.behaviour])
        call.start_time, call.answered_at = _now(), time.monotonic()
        await _status_callback(st, call, "answered", "in-progress")
        target: tuple[str, str] | None = None
        if call.twiml:
            target = await _follow(st, call, call.twiml, "Twiml")
        else:
            body = await _fetch_twiml(st, call, call.url, call.method)
            if body is not None:
                target = await _follow(st, call, body, call.url)
        for _ in range(MAX_REDIRECTS + 1):
            if call.hangup_status is not None:
                break
            if call.pending is not None:  # a REST update redirected the live call
                kind, value, method = call.pending
                call.pending = None
                call.interrupt.clear()
                if kind == "twiml":
                    target = await _follow(st, call, value, "Twiml update")
                    continue
                target = (value, method)
            if target is None:
                break
            url, method = target
            body = await _fetch_twiml(st, call, url, method)
            target = await _follow(st, call, body, url) if body is not None else None
        await _end(st, call, "completed")
    except Exception as e:  # a stand-in bug must still end the call and say why
        call.errors.append(f"simulator error: {type(e).__name__}: {e}")
        await _end(st, call, "failed")


async def _end(st: TwilioState, call: SimCall, status: str) -> None:
    if call.terminal:
        return
    call.end_time = _now()
    if call.answered_at is not None and status == "completed":
        call.duration_s = max(0, round(time.monotonic() - call.answered_at))
    else:
        call.duration_s = 0
    await _status_callback(st, call, "completed", status)
    call.ended.set()


async def _hang_up(st: TwilioState, call: SimCall, requested: str) -> None:
    """``Status=completed|canceled``: end the call the way Twilio does from where it is."""
    call.hangups.append({"status": requested, "at": _now().isoformat(), "call_status": call.status})
    call.event("rest_hangup", status=requested)
    if call.terminal:
        return
    if requested == "canceled" and call.status == "in-progress":
        return  # canceled only ends calls that are queued or ringing
    call.hangup_status = requested
    call.interrupt.set()
    if call.media is not None:
        call.media.carrier_hangup("rest_hangup")
    if call.direction == "inbound":
        await _end(st, call, "completed")
    elif call.task is None:
        await _end(st, call, "completed" if call.status == "in-progress" else "canceled")


# ---------------------------------------------------------------------------------------------- the app
class InboundIn(BaseModel):
    sid: str = Field(pattern=r"^CA[0-9a-fA-F]{32}$")
    from_: str = Field(alias="from", min_length=1, max_length=64)
    to: str = Field(min_length=1, max_length=64)


class CalleeIn(BaseModel):
    number: str = Field(min_length=2, max_length=16)
    behaviour: Behaviour = "answer"
    dtmf: str = Field(default="", max_length=32, pattern=r"^[0-9*#A-Da-d]*$")
    say_wav: str | None = None
    hangup_after_s: float | None = Field(default=None, gt=0, le=3600)


class BehaviourIn(BaseModel):
    next: list[Behaviour] | None = Field(default=None, max_length=100)
    ring_ms: int | None = Field(default=None, ge=0, le=60_000)
    fail_next: list[int] | None = Field(default=None, max_length=100)


class NumberIn(BaseModel):
    phone_number: str
    voice_url: str = ""


def _sim_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "message": message}, status_code=status)


def create_app(state: TwilioState) -> FastAPI:
    """The stand-in as an ASGI app; ``app.state.twilio`` is its :class:`TwilioState`."""
    st = state
    app = FastAPI(title="Twilio API stand-in (voicebus simulator)", docs_url="/_sim/docs",
                  openapi_url="/_sim/openapi.json", redoc_url=None)
    app.state.twilio = st

    def authenticate(request: Request) -> JSONResponse | None:
        scheme, _, blob = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(blob, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user = password = ""
        ok = (scheme.lower() == "basic" and secrets.compare_digest(user.encode(), st.account_sid.encode())
              and secrets.compare_digest(password.encode(), st.auth_token.encode()))
        if not ok:
            return twilio_error(401, 20003, "Authenticate")
        return None

    def gate(request: Request, account: str) -> JSONResponse | None:
        if st.fail_next:
            status = st.fail_next.pop(0)
            return twilio_error(status, 20500 if status >= 500 else 20001, "injected failure")
        denied = authenticate(request)
        if denied is not None:
            return denied
        if account != st.account_sid:
            return not_found(request)
        return None

    async def form(request: Request) -> list[tuple[str, str]]:
        return parse_qsl((await request.body()).decode("utf-8", errors="replace"), keep_blank_values=True)

    def first(pairs: list[tuple[str, str]], name: str) -> str | None:
        return next((v for k, v in pairs if k == name), None)

    @app.post(API_PREFIX + "/Calls.json")
    async def create_call(account: str, request: Request) -> Response:
        denied = gate(request, account)
        if denied is not None:
            return denied
        f = await form(request)
        to, from_, url, twiml = first(f, "To"), first(f, "From"), first(f, "Url"), first(f, "Twiml")
        if not to:
            return twilio_error(400, 21201, "No 'To' number is specified")
        if not from_:
            return twilio_error(400, 21213, "No 'From' number is specified")
        if not E164.match(to):
            return twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if st.number_by_e164(from_) is None:
            return twilio_error(400, 21212, f"The 'From' number {from_} is not a valid phone number, shortcode, "
                                            "or alphanumeric sender ID.")
        if not url and not twiml:
            return twilio_error(400, 21205, "Url parameter is required.")
        if url and not url.startswith(("http://", "https://")):
            return twilio_error(400, 21205, f"Url is not a valid URL: {url}")
        events = tuple(e.strip() for k, v in f if k == "StatusCallbackEvent" for e in v.split() if e.strip())
        bad = [e for e in events if e not in CALL_EVENTS]
        if bad:
            return twilio_error(400, 21626, f"Invalid 'StatusCallbackEvent': {' '.join(bad)}")
        try:
            timeout = int(first(f, "Timeout") or 60)
        except ValueError:
            return twilio_error(400, 21219, "Timeout must be an integer")
        callee = st.callee_for(to)
        behaviour = st.next_behaviours.pop(0) if st.next_behaviours else callee.behaviour
        call = SimCall(_sid("CA"), st.account_sid, to, from_, "outbound-api", url=url or "",
                       method=(first(f, "Method") or "POST").upper(), twiml=twiml or "",
                       status_callback=first(f, "StatusCallback") or "",
                       status_callback_events=events or ("completed",),
                       status_callback_method=(first(f, "StatusCallbackMethod") or "POST").upper(),
                       timeout_s=max(1, min(600, timeout)), behaviour=behaviour, callee=callee)
        call.event("created", behaviour=behaviour)
        st.calls[call.sid] = call
        call.task = asyncio.create_task(_run_call(st, call))
        return JSONResponse(call.resource(), status_code=201)

    @app.get(API_PREFIX + "/Calls/{sid}.json")
    async def fetch_call(account: str, sid: str, request: Request) -> Response:
        denied = gate(request, account)
        if denied is not None:
            return denied
        call = st.calls.get(sid)
        if call is None:
            return not_found(request)
        return JSONResponse(call.resource())

    @app.post(API_PREFIX + "/Calls/{sid}.json")
    async def update_call(account: str, sid: str, request: Request) -> Response:
        denied = gate(request, account)
        if denied is not None:
            return denied
        call = st.calls.get(sid)
        if call is None:
            return not_found(request)
        f = await form(request)
        status, twiml, url = first(f, "Status"), first(f, "Twiml"), first(f, "Url")
        if status is not None and status not in ("completed", "canceled"):
            return twilio_error(400, 21218, f"Invalid Status: {status}. Must be completed or canceled")
        if status is None and not twiml and not url:
            return twilio_error(400, 21220, "Nothing to update: give Status, Twiml or Url")
        if status is not None:
            await _hang_up(st, call, status)
            if call.task is not None and not call.terminal:
                # Twilio answers once the call is down; stop and close on the stream take a moment.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(call.ended.wait()), 5)
        elif call.terminal or call.status != "in-progress":
            call.updates.append({"twiml": _redact_twiml(twiml) if twiml else None, "url": url,
                                 "at": _now().isoformat(), "applied": False})
            return twilio_error(400, 21220, "Call is not in-progress. Cannot redirect.")
        else:
            call.updates.append({"twiml": _redact_twiml(twiml) if twiml else None, "url": url,
                                 "method": (first(f, "Method") or "POST").upper(), "at": _now().isoformat(),
                                 "applied": True})
            call.event("redirected", source="Twiml" if twiml else "Url")
            call.pending = ("twiml", twiml, "") if twiml else ("url", url or "", (first(f, "Method") or "POST"))
            call.interrupt.set()
            if call.media is not None:
                call.media.carrier_hangup("redirected")
        return JSONResponse(call.resource())

    @app.get(API_PREFIX + "/IncomingPhoneNumbers.json")
    async def list_numbers(account: str, request: Request, PhoneNumber: str | None = None) -> Response:
        denied = gate(request, account)
        if denied is not None:
            return denied
        found = [n for n in st.numbers.values() if PhoneNumber is None or n.phone_number == PhoneNumber]
        uri = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return JSONResponse({"incoming_phone_numbers": [n.resource(st.account_sid) for n in found],
                             "page": 0, "page_size": 50, "start": 0, "end": max(0, len(found) - 1),
                             "uri": uri, "first_page_uri": uri, "next_page_uri": None, "previous_page_uri": None})

    @app.get(API_PREFIX + "/IncomingPhoneNumbers/{sid}.json")
    async def fetch_number(account: str, sid: str, request: Request) -> Response:
        denied = gate(request, account)
        if denied is not None:
            return denied
        n = st.numbers.get(sid)
        if n is None:
            return not_found(request)
        return JSONResponse(n.resource(st.account_sid))

    @app.post(API_PREFIX + "/IncomingPhoneNumbers/{sid}.json")
    async def update_number(account: str, sid: str, request: Request) -> Response:
        denied = gate(request, account)
        if denied is not None:
            return denied
        n = st.numbers.get(sid)
        if n is None:
            return not_found(request)
        f = await form(request)
        voice_url, voice_method = first(f, "VoiceUrl"), first(f, "VoiceMethod")
        if voice_method is not None and voice_method.upper() not in ("GET", "POST"):
            return twilio_error(400, 21208, f"VoiceMethod must be GET or POST, got {voice_method}")
        if voice_url:
            if not voice_url.startswith(("http://", "https://")):
                return twilio_error(400, 21502, f"VoiceUrl is not a valid URL: {voice_url}")
        if voice_url is not None:
            n.voice_url = voice_url
        if voice_method is not None:
            n.voice_method = voice_method.upper()
        n.date_updated = _now()
        n.updates.append({"voice_url": voice_url, "voice_method": voice_method, "at": n.date_updated.isoformat()})
        return JSONResponse(n.resource(st.account_sid))

    # -- behind the scenes
    @app.get("/_sim/calls")
    async def sim_calls() -> dict[str, Any]:
        return {"calls": [{"sid": c.sid, "direction": c.direction, "from": c.from_, "to": c.to, "status": c.status,
                           "behaviour": c.behaviour} for c in st.calls.values()]}

    @app.get("/_sim/calls/{sid}")
    async def sim_call(sid: str, wait_ended: float = 0.0) -> Response:
        call = st.calls.get(sid)
        if call is None:
            return _sim_error(404, f"no call {sid!r}")
        if wait_ended > 0 and not call.ended.is_set():
            waiters = [asyncio.ensure_future(call.ended.wait()), asyncio.ensure_future(st.closing.wait())]
            try:
                await asyncio.wait(waiters, timeout=min(wait_ended, MAX_WAIT_ENDED_S),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        return JSONResponse(call.inspection())

    @app.post("/_sim/calls", status_code=201)
    async def sim_register(body: InboundIn) -> Response:
        try:
            call = st.register_inbound(body.sid, body.from_, body.to)
        except FileExistsError as e:
            return _sim_error(409, str(e))
        return JSONResponse(call.inspection(), status_code=201)

    @app.post("/_sim/calls/{sid}/end")
    async def sim_caller_hangup(sid: str) -> Response:
        call = st.calls.get(sid)
        if call is None:
            return _sim_error(404, f"no call {sid!r}")
        call.event("caller_hangup")
        await _end(st, call, "completed")
        return JSONResponse(call.inspection())

    @app.post("/_sim/callees")
    async def sim_callee(body: CalleeIn) -> Response:
        if body.say_wav is not None and not await asyncio.to_thread(Path(body.say_wav).is_file):
            return _sim_error(422, f"say_wav {body.say_wav!r} is not a file")
        try:
            st.set_callee(body.number, Callee(body.behaviour, body.dtmf, body.say_wav, body.hangup_after_s))
        except ValueError as e:
            return _sim_error(422, str(e))
        return JSONResponse({"number": body.number, "behaviour": body.behaviour})

    @app.post("/_sim/behaviour")
    async def sim_behaviour(body: BehaviourIn) -> dict[str, Any]:
        if body.next is not None:
            st.next_behaviours = list(body.next)
        if body.ring_ms is not None:
            st.ring_ms = body.ring_ms
        if body.fail_next is not None:
            st.fail_next = list(body.fail_next)
        return {"next": st.next_behaviours, "ring_ms": st.ring_ms, "fail_next": st.fail_next}

    @app.post("/_sim/numbers", status_code=201)
    async def sim_number(body: NumberIn) -> Response:
        try:
            n = st.add_number(body.phone_number, body.voice_url)
        except ValueError as e:
            return _sim_error(422, str(e))
        return JSONResponse(n.resource(st.account_sid), status_code=201)

    @app.get("/_sim/numbers")
    async def sim_numbers() -> dict[str, Any]:
        return {"numbers": [{**n.resource(st.account_sid), "updates": n.updates} for n in st.numbers.values()]}

    @app.get("/_sim/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "alive", "account_sid": st.account_sid, "numbers": len(st.numbers), "calls": len(st.calls)}

    return app


@dataclass
class RunningTwilioApi:
    server: RunningServer
    state: TwilioState

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.asynccontextmanager
async def run_twilio_api(account_sid: str, auth_token: str, numbers: list[str] | None = None, *,
                         host: str = "127.0.0.1", port: int = 0,
                         state: TwilioState | None = None, **kw: Any) -> AsyncIterator[RunningTwilioApi]:
    """Run the stand-in on ``host:port`` (0 = a free port) for the duration of the block."""
    st = state or TwilioState(account_sid, auth_token, numbers, **kw)
    async with serve_app(create_app(st), host, port) as running:
        try:
            yield RunningTwilioApi(running, st)
        finally:
            await st.aclose()
