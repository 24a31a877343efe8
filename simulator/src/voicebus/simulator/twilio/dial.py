"""An inbound Twilio call to voicebus, placed the way Twilio places it.

``dial_inbound(InboundCall(...))`` POSTs the voice webhook to ``{voicebus}/api/v1/telephony/inbound/run``
as Twilio does (form: ``CallSid``, ``AccountSid``, ``From``, ``To``, ``CallStatus=ringing``,
``Direction=inbound``, ``ApiVersion``, ``Caller``, ``Called``, the geographic fields; headers
``X-Twilio-Signature``, ``I-Twilio-Idempotency-Token``, ``User-Agent: TwilioProxy/1.1``), then follows
the TwiML it gets back: ``<Connect><Stream>`` opens the media socket (:mod:`.stream`) with the caller's
script; ``<Say>`` + ``<Hangup>`` is a refusal, reported with its text.

Negative tests: ``tamper`` changes a signed field after signing, ``no_signature`` / ``wrong_token``
sign badly, ``replay`` sends the same webhook twice with one idempotency token, ``reuse_token`` opens
the media socket a second time with the same ``<Parameter>`` values once the call is over.

With ``twilio_api`` (the REST stand-in's URL) the call is registered there first, so voicebus's REST
hangup (``Calls/{CallSid}.json Status=completed``) ends the stream as Twilio would.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from voicebus.simulator.phone import (
    CallReport,
    PhoneScript,
    SimulatorError,
    TimelineEvent,
    _describe,
    _sid,
    poll_until_over,
)
from voicebus.simulator.twilio.signing import API_VERSION, Pairs, SentRequest, Tamper, send_signed
from voicebus.simulator.twilio.stream import TwilioStreamCall
from voicebus.simulator.twilio.twiml import Connect, Hangup, Reject, Say, TwimlError, Verb, describe, parse_twiml

INBOUND_PATH = "/api/v1/telephony/inbound/run"
Outcome = Literal["streamed", "refused", "error"]
_COUNTRIES = {"1": "US", "44": "GB", "33": "FR", "49": "DE", "972": "IL", "91": "IN", "61": "AU"}


def country_of(e164: str) -> str:
    digits = e164.lstrip("+")
    for n in (3, 2, 1):
        if digits[:n] in _COUNTRIES:
            return _COUNTRIES[digits[:n]]
    return ""


@dataclass
class InboundCall:
    voicebus: str
    account_sid: str
    auth_token: str
    to: str
    from_: str = "+15555550100"
    call_sid: str = field(default_factory=lambda: _sid("CA"))
    path: str = INBOUND_PATH
    phone: PhoneScript = field(default_factory=PhoneScript)
    twilio_api: str | None = None
    tamper: bool = False
    no_signature: bool = False
    wrong_token: bool = False
    replay: bool = False
    reuse_token: bool = False
    reuse_wait_s: float = 3.0

    @property
    def webhook_url(self) -> str:
        return self.voicebus.rstrip("/") + self.path

    def webhook_params(self) -> Pairs:
        from_c, to_c = country_of(self.from_), country_of(self.to)
        return [("AccountSid", self.account_sid), ("ApiVersion", API_VERSION), ("CallSid", self.call_sid),
                ("CallStatus", "ringing"), ("CallToken", uuid.uuid4().hex), ("Called", self.to),
                ("CalledCity", ""), ("CalledCountry", to_c), ("CalledState", ""), ("CalledZip", ""),
                ("Caller", self.from_), ("CallerCity", ""), ("CallerCountry", from_c), ("CallerState", ""),
                ("CallerZip", ""), ("Direction", "inbound"), ("From", self.from_), ("FromCity", ""),
                ("FromCountry", from_c), ("FromState", ""), ("FromZip", ""), ("StirVerstat", "TN-Validation-Passed-A"),
                ("To", self.to), ("ToCity", ""), ("ToCountry", to_c), ("ToState", ""), ("ToZip", "")]


@dataclass
class DialReport:
    webhook_url: str
    call_sid: str
    events: list[TimelineEvent] = field(default_factory=list)
    webhooks: list[SentRequest] = field(default_factory=list)
    twiml: str = ""
    verbs: list[str] = field(default_factory=list)
    says: list[str] = field(default_factory=list)
    outcome: Outcome = "error"
    error: str | None = None
    stream: CallReport | None = None
    stream_callbacks: list[SentRequest] = field(default_factory=list)
    reuse: dict[str, Any] | None = None

    @property
    def refusal(self) -> str:
        return " ".join(self.says)

    def to_dict(self) -> dict[str, Any]:
        return {
            "webhook_url": self.webhook_url, "call_sid": self.call_sid, "outcome": self.outcome, "error": self.error,
            "webhooks": [{"http_status": w.http_status, "error": w.error} for w in self.webhooks],
            "verbs": self.verbs, "says": self.says,
            "events": [{"t_ms": e.t_ms, "kind": e.kind, **({"detail": e.detail} if e.detail else {})}
                       for e in self.events],
            "stream": self.stream.to_dict() if self.stream else None,
            "stream_callbacks": [{"event": c.event, "http_status": c.http_status, "error": c.error}
                                 for c in self.stream_callbacks],
            "reuse": self.reuse,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        lines = [f"Twilio inbound call {self.call_sid} to {self.webhook_url}"]
        lines += [f"  {e.t_ms:>7} ms  {describe_event(e)}" for e in self.events]
        lines.append("")
        if self.outcome == "refused":
            lines.append(f"voicebus refused the call: {self.refusal or '(no <Say>)'}")
        elif self.outcome == "error":
            lines.append(f"error: {self.error}")
        if self.stream is not None:
            lines.append(self.stream.render().split("\n\n", 1)[-1])
        if self.reuse is not None:
            lines.append(f"second socket with the same token: {self.reuse['verdict']}")
        return "\n".join(lines)


def describe_event(e: TimelineEvent) -> str:
    d = e.detail
    text = {
        "webhook_sent": f"webhook POSTed{' (replay)' if d.get('replay') else ''}: HTTP {d.get('http_status')}"
                        f"{' ' + str(d.get('error')) if d.get('error') else ''}",
        "twiml": f"TwiML {d.get('verb')}",
        "stream_callback": f"stream status callback {d.get('event')}: HTTP {d.get('http_status')}",
        "reuse_attempt": "media socket opened again with the same token",
        "reuse_result": f"second socket: {d.get('verdict')}",
    }.get(e.kind)
    return text if text is not None else _describe(e)


class _Dial:
    def __init__(self, call: InboundCall, on_event: Callable[[TimelineEvent], None] | None) -> None:
        self.c = call
        self.on_event = on_event
        self.t0 = time.monotonic()
        self.report = DialReport(call.webhook_url, call.call_sid)

    def event(self, kind: str, **detail: Any) -> None:
        e = TimelineEvent(int((time.monotonic() - self.t0) * 1000), kind, detail)
        self.report.events.append(e)
        if self.on_event:
            self.on_event(e)

    def relay(self, e: TimelineEvent) -> None:
        self.event(e.kind, **e.detail)

    async def run(self) -> DialReport:
        c, r = self.c, self.report
        async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
            if c.twilio_api:
                await self.register(http)
            tamper = Tamper(no_signature=c.no_signature, wrong_token=c.wrong_token,
                            alter_field="From" if c.tamper else None)
            token = str(uuid.uuid4())
            params = c.webhook_params()
            for replay in ((False, True) if c.replay else (False,)):
                sent = await send_signed(http, "webhook", "inbound", c.webhook_url, params, c.auth_token,
                                         idempotency_token=token, tamper=tamper)
                r.webhooks.append(sent)
                self.event("webhook_sent", http_status=sent.http_status, error=sent.error, replay=replay)
            first = r.webhooks[0]
            if first.error or first.http_status is None:
                r.error = f"voicebus is unreachable at {c.webhook_url}: {first.error}"
                return r
            if not 200 <= first.http_status < 300:
                r.error = f"voicebus answered the webhook with HTTP {first.http_status}: {first.body[:200]}"
                return r
            r.twiml = first.body
            try:
                verbs = parse_twiml(first.body)
            except TwimlError as e:
                r.error = f"voicebus answered with TwiML Twilio cannot read (12100): {e}"
                return r
            await self.follow(http, verbs)
            if c.twilio_api:
                await self.call_over(http)  # the TwiML has run out: Twilio ends the call
            return r

    async def follow(self, http: httpx.AsyncClient, verbs: list[Verb]) -> None:
        r = self.report
        r.outcome = "refused"
        for verb in verbs:
            r.verbs.append(describe(verb))
            self.event("twiml", verb=describe(verb))
            if isinstance(verb, Connect) and verb.stream is not None:
                r.outcome = "streamed"
                media = TwilioStreamCall(verb.stream, self.c.phone, account_sid=self.c.account_sid,
                                         call_sid=self.c.call_sid, auth_token=self.c.auth_token, http=http,
                                         watchers=[self.watch_rest_hangup] if self.c.twilio_api else [],
                                         on_event=self.relay)
                r.stream = await media.play()
                r.stream_callbacks.extend(media.callbacks)
                if r.stream.end_cause == "connect_failed":
                    r.outcome, r.error = "error", r.stream.error
                    return
                if self.c.reuse_token:
                    await self.reuse(http, verb)
            elif isinstance(verb, Say):
                r.says.append(verb.text)
            elif isinstance(verb, Hangup | Reject):
                return

    async def reuse(self, http: httpx.AsyncClient, verb: Connect) -> None:
        """Open the same ``<Stream>`` again (same URL, same parameters, a valid signature): it must be refused."""
        assert verb.stream is not None
        self.event("reuse_attempt")
        again = TwilioStreamCall(verb.stream, PhoneScript(max_duration_s=self.c.reuse_wait_s),
                                 account_sid=self.c.account_sid, call_sid=self.c.call_sid,
                                 auth_token=self.c.auth_token, http=http)
        rep = await again.run()
        accepted = rep.end_cause == "max_duration"
        verdict = ("ACCEPTED (the token was reusable)" if accepted else
                   f"refused: {rep.error}" if rep.end_cause == "connect_failed" else
                   f"refused: closed with code {rep.close_code} {rep.close_reason!r}")
        self.report.reuse = {"accepted": accepted, "end_cause": rep.end_cause, "close_code": rep.close_code,
                             "close_reason": rep.close_reason, "error": rep.error, "verdict": verdict}
        self.event("reuse_result", verdict=verdict)

    async def register(self, http: httpx.AsyncClient) -> None:
        assert self.c.twilio_api is not None
        try:
            resp = await http.post(f"{self.c.twilio_api.rstrip('/')}/_sim/calls",
                                   json={"sid": self.c.call_sid, "from": self.c.from_, "to": self.c.to})
        except httpx.HTTPError as e:
            raise SimulatorError(f"the Twilio stand-in at {self.c.twilio_api} is unreachable: {e}") from e
        if resp.status_code != 201:
            raise SimulatorError(f"the Twilio stand-in refused the call ({resp.status_code}): {resp.text[:200]}")

    async def call_over(self, http: httpx.AsyncClient) -> None:
        assert self.c.twilio_api is not None
        try:
            await http.post(f"{self.c.twilio_api.rstrip('/')}/_sim/calls/{self.c.call_sid}/end")
        except httpx.HTTPError:
            pass  # the stand-in going away does not change what happened on the call

    async def watch_rest_hangup(self, media: TwilioStreamCall) -> None:
        """Twilio ends the stream of a call hung up through its REST API; long-poll the stand-in for that."""
        assert self.c.twilio_api is not None
        url = f"{self.c.twilio_api.rstrip('/')}/_sim/calls/{self.c.call_sid}"
        body = await poll_until_over(url, media.done,
                                     lambda b: bool(b.get("hangups")) or b.get("status") != "in-progress")
        if body is not None and body.get("hangups"):
            media.carrier_hangup("rest_hangup")


async def dial_inbound(call: InboundCall, *, on_event: Callable[[TimelineEvent], None] | None = None) -> DialReport:
    """Ring voicebus as Twilio would and play the call; returns what happened. Never raises on HTTP trouble,
    except :class:`SimulatorError` when the REST stand-in named by ``twilio_api`` refuses the call."""
    return await _Dial(call, on_event).run()

