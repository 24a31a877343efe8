"""The Media Streams socket a TwiML ``<Connect><Stream>`` names, opened the way Twilio opens it.

The upgrade request carries ``X-Twilio-Signature`` over the ``wss://`` URL with no parameters; the
first frames are ``connected`` then ``start`` (``accountSid``, ``callSid``, ``streamSid`` ``MZ…``,
``tracks``, ``mediaFormat`` audio/x-mulaw 8000 1, and the ``<Parameter>`` values as
``customParameters``). The phone on the stream is :class:`voicebus.simulator.phone.MediaCall`. If the
``<Stream>`` has a ``statusCallback``, signed ``stream-started`` / ``stream-stopped`` callbacks go there
(``AccountSid``, ``CallSid``, ``StreamSid``, ``StreamName``, ``StreamEvent``, ``Timestamp``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from voicebus.simulator.phone import CallReport, MediaCall, PhoneScript, StreamIds, TimelineEvent, _sid
from voicebus.simulator.twilio.signing import SentRequest, Tamper, send_signed, sign
from voicebus.simulator.twilio.twiml import Stream
from voicebus.telephony.dialects.twilio_media_carrier import carrier_start_message

Watcher = Callable[["TwilioStreamCall"], Coroutine[Any, Any, None]]


def stream_start(stream_sid: str, call_sid: str, account_sid: str, parameters: dict[str, str]) -> dict[str, Any]:
    """Twilio's ``start``: no ``session``/``from``/``to``/``context`` (those are Cloudonix's)."""
    return carrier_start_message(stream_sid=stream_sid, call_sid=call_sid, account_sid=account_sid,
                                 custom_parameters=dict(parameters))


class TwilioStreamCall(MediaCall):
    """One ``<Stream>``: signed upgrade, Twilio's ``start``, Stream status callbacks around the call."""

    def __init__(self, stream: Stream, script: PhoneScript, *, account_sid: str, call_sid: str, auth_token: str,
                 http: httpx.AsyncClient, stream_sid: str | None = None, sign_upgrade: bool = True,
                 watchers: list[Watcher] | None = None,
                 on_event: Callable[[TimelineEvent], None] | None = None) -> None:
        sid = stream_sid or _sid("MZ")
        headers = {"X-Twilio-Signature": sign(auth_token, stream.url)} if sign_upgrade else {}
        headers["User-Agent"] = "Twilio.TmeWs/1.0"
        super().__init__(stream.url, script, StreamIds(sid, call_sid, account_sid),
                         stream_start(sid, call_sid, account_sid, stream.parameters), headers=headers,
                         on_event=on_event)
        self.stream = stream
        self.auth_token = auth_token
        self.http = http
        self.watchers = list(watchers or [])
        self.callbacks: list[SentRequest] = []
        self._started: asyncio.Task[None] | None = None

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [w(self) for w in self.watchers]

    async def on_started(self) -> None:
        # Twilio posts the callback alongside the media, not before it: never hold the stream up.
        self._started = asyncio.create_task(self.stream_callback("stream-started"))

    async def stream_callback(self, event: Literal["stream-started", "stream-stopped", "stream-error"],
                              error: str | None = None) -> None:
        st = self.stream
        if not st.status_callback:
            return
        params = [("AccountSid", self.ids.account_sid), ("CallSid", self.ids.call_sid),
                  ("StreamSid", self.ids.stream_sid), ("StreamName", st.name or self.ids.stream_sid),
                  ("StreamEvent", event), ("Timestamp", datetime.now(UTC).isoformat(timespec="milliseconds"))]
        if error:
            params.append(("StreamError", error))
        method: Literal["GET", "POST"] = "GET" if st.status_callback_method == "GET" else "POST"
        sent = await send_signed(self.http, "stream-callback", event, st.status_callback, params, self.auth_token,
                                 method=method, tamper=Tamper())
        self.callbacks.append(sent)
        self.event("stream_callback", event=event, http_status=sent.http_status, error=sent.error)

    async def play(self) -> CallReport:
        """Run the stream to its end, then send ``stream-stopped`` (or ``stream-error`` if it never opened)."""
        report = await self.run()
        if self._started is not None:
            await self._started
        if report.end_cause == "connect_failed":
            await self.stream_callback("stream-error", report.error or "connection failed")
        elif self._started is not None:
            await self.stream_callback("stream-stopped")
        return report
