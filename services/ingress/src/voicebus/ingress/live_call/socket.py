"""The carrier's WebSocket as every phase sees it: receive a frame, send a frame, close once.

One object so the handshake, the media pump and the ending policy agree on whether the socket is still
open and who closed it (a close by voicebus must not be mistaken for the caller hanging up).
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.websockets import WebSocket

from voicebus.ingress.close_codes import fit_close_reason
from voicebus.telephony.stream import CarrierDisconnected, Frame
from voicebus.telephony.webhook import WebhookRequest


class CarrierSocket:
    def __init__(self, ws: WebSocket, public_url: str | None = None) -> None:
        self.ws = ws
        self._public_url = public_url
        self._send_lock = asyncio.Lock()
        self.closed = False  # no more frames go out
        self.closed_by_us = False
        self.disconnected = False  # the carrier's side is gone

    def upgrade_request(self) -> WebhookRequest:
        """The upgrade as the carrier signed it: GET on the public ws(s) URL, with its headers."""
        url = str(self.ws.url)
        if self._public_url:
            base = self._public_url.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
            path = self.ws.url.path + (f"?{self.ws.url.query}" if self.ws.url.query else "")
            url = base + path
        headers = {k.lower(): v for k, v in self.ws.headers.items()}
        return WebhookRequest("GET", url, headers)

    async def receive(self) -> Frame:
        if self.disconnected:
            raise CarrierDisconnected(None)
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            self.disconnected = True
            raise CarrierDisconnected(message.get("code"))
        text = message.get("text")
        if text is not None:
            return str(text)
        data = message.get("bytes")
        return bytes(data) if data is not None else b""

    async def send(self, frame: Frame | None) -> None:
        if frame is None:
            return
        async with self._send_lock:
            if self.closed:
                return
            try:
                if isinstance(frame, str):
                    await self.ws.send_text(frame)
                else:
                    await self.ws.send_bytes(frame)
            except Exception:
                self.closed = True  # the reader sees the disconnect and ends the call

    async def close(self, code: int, reason: str) -> None:
        async with self._send_lock:
            if self.closed:
                return
            self.closed = True
            self.closed_by_us = True
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, reason=fit_close_reason(reason))
