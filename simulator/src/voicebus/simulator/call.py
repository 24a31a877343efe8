"""The carrier side of an Agent Stream call, played the way Cloudonix plays it.

``place_call(url, CallScript(...))`` dials the Agent Stream URL with Cloudonix's ``connected`` and
``start`` (Twilio framing plus Cloudonix's ``session``, ``from``, ``to``, ``context``); the phone itself
(real-time audio, DTMF, marks, clear, recording) is :class:`voicebus.simulator.phone.MediaCall`.

Cloudonix's cloud around the stream: with ``cloudonix_api`` the session is registered with the REST
stand-in first (the session exists before the media stream starts), marked ended when the caller
hangs up, and long-polled, so a REST hangup (call-control's ``DELETE``) ends the stream as Cloudonix
would. Handshake variations (skip ``connected``, malformed or incomplete ``start``, send nothing) exist
for negative tests of the endpoint being dialed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from voicebus.simulator.phone import (
    CallerAction,
    CallReport,
    Handshake,
    MediaCall,
    PhoneScript,
    SimulatorError,
    StreamIds,
    TimelineEvent,
    _describe,
    _sid,
    load_wav_8k,
    poll_until_over,
    redact_url,
    write_wav_8k,
)
from voicebus.telephony import load_fake

_cloudonix = load_fake("cloudonix")

START_FIELDS = ("streamSid", "callSid", "session", "accountSid", "from", "to", "context", "tracks",
                "mediaFormat", "customParameters")

__all__ = ["START_FIELDS", "CallReport", "CallScript", "CallerAction", "SimulatorError", "TimelineEvent",
           "_describe", "load_wav_8k", "place_call", "redact_url", "write_wav_8k"]


@dataclass
class CallScript(PhoneScript):
    """A Cloudonix call: the stream's identifiers and Cloudonix's cloud around it, plus the caller's script."""

    stream_sid: str = field(default_factory=lambda: _sid("MZ"))
    call_sid: str = field(default_factory=lambda: _sid("CA"))
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    domain: str = "sim.cloudonix.net"
    caller: str = "+15555550100"
    callee: str = "+15555550199"
    custom_parameters: dict[str, Any] = field(default_factory=dict)
    cloudonix_api: str | None = None
    handshake: Handshake = "normal"
    omit_start_fields: tuple[str, ...] = ()
    start_overrides: dict[str, Any] = field(default_factory=dict)

    def start_message(self) -> dict[str, Any]:
        msg = _cloudonix.carrier_start_message(stream_sid=self.stream_sid, call_sid=self.call_sid, session=self.session,
                                    account_sid=self.domain, from_number=self.caller, to_number=self.callee,
                                    context="inbound", custom_parameters=dict(self.custom_parameters))
        start: dict[str, Any] = msg["start"]
        start.update(self.start_overrides)
        for name in self.omit_start_fields:
            start.pop(name, None)
        return msg




class _Call(MediaCall):
    """Cloudonix's cloud around the stream: the session registered, ended, and watched for a REST hangup."""

    def __init__(self, url: str, script: CallScript, on_event: Callable[[TimelineEvent], None] | None) -> None:
        super().__init__(url, script, StreamIds(script.stream_sid, script.call_sid, script.domain, script.session),
                         script.start_message(), handshake=script.handshake, omitted=script.omit_start_fields,
                         on_event=on_event)
        self.cx = script

    async def before_connect(self) -> None:
        if self.cx.cloudonix_api:
            await _register_session(self.cx)

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self.watch_session()] if self.cx.cloudonix_api else []

    async def on_ending(self) -> None:
        s = self.cx
        if self.end_cause != "rest_hangup" and s.cloudonix_api:
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
                    await http.post(f"{s.cloudonix_api.rstrip('/')}/_sim/sessions/{s.session}/end")

    async def watch_session(self) -> None:
        """Cloudonix closes the media stream when the call is hung up through its REST API; so do we."""
        s = self.cx
        assert s.cloudonix_api is not None
        url = f"{s.cloudonix_api.rstrip('/')}/_sim/sessions/{s.session}"
        body = await poll_until_over(url, self.done, lambda b: b.get("state") == "ended")
        if body is not None and body.get("ended_by") == "rest":
            self.carrier_hangup("rest_hangup")



async def _register_session(s: CallScript) -> None:
    """What Cloudonix does when a call arrives: the session exists before the media stream starts."""
    assert s.cloudonix_api is not None
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        try:
            resp = await http.post(f"{s.cloudonix_api.rstrip('/')}/_sim/sessions",
                                   json={"domain": s.domain, "session": s.session, "from": s.caller, "to": s.callee})
        except httpx.HTTPError as e:
            raise SimulatorError(f"the Cloudonix stand-in at {s.cloudonix_api} is unreachable: {e}") from e
    if resp.status_code != 201:
        try:
            message = resp.json().get("message", resp.text)
        except ValueError:
            message = resp.text
        raise SimulatorError(f"the Cloudonix stand-in refused the session ({resp.status_code}): {message}")


async def place_call(url: str, script: CallScript | None = None, *,
                     on_event: Callable[[TimelineEvent], None] | None = None) -> CallReport:
    """Dial ``url`` as a Cloudonix media stream and play ``script``; returns what happened."""
    return await _Call(url, script or CallScript(), on_event).run()
