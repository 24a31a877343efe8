"""What every carrier socket has in common, whichever path it came in on (Agent Stream or a per-call
media socket): the service tracks it (drain, health), it is accepted before anything else so every
refusal is a close frame, it gets one trace span, and it becomes a :class:`LiveCall` once its phase of
admission and handshake is over.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from opentelemetry import trace
from starlette.websockets import WebSocket

from voicebus.bus.messages import RunRecord
from voicebus.ingress.close_codes import CLOSE_INTERNAL, INTERNAL_ERROR_REASON, Refusal
from voicebus.ingress.live_call import CallSetup, LiveCall
from voicebus.ingress.live_call.lease import LeaseKeeper
from voicebus.ingress.live_call.socket import CarrierSocket
from voicebus.telephony.stream import CarrierDisconnected

if TYPE_CHECKING:
    from voicebus.ingress.service import IngressService

log = logging.getLogger("voicebus.ingress.socket")
tracer = trace.get_tracer("voicebus.ingress")


class SocketEntry:
    span_name = "carrier_socket.call"

    def __init__(self, service: IngressService, ws: WebSocket) -> None:
        self.svc = service
        self.bus = service.bus
        self.settings = service.settings
        self.socket = CarrierSocket(ws, self.settings.public_url)
        self.call_id: str | None = None
        self.run: RunRecord | None = None
        self.answered = asyncio.Event()  # set once a runner holds the call (observable for tests and metrics)
        self.live: LiveCall | None = None
        self._shutdown = False

    def shutdown(self) -> None:
        """Asked by the service when the drain deadline passes: end this call as soon as possible."""
        self._shutdown = True
        if self.live is not None:
            self.live.shutdown()

    def go_live(self, setup: CallSetup, lease: LeaseKeeper) -> LiveCall:
        self.live = LiveCall(self.svc.nc, self.bus, self.svc.subjects, self.settings, self.socket, setup, lease,
                             answered=self.answered)
        if self._shutdown:
            self.live.shutdown()
        return self.live

    async def handle(self) -> None:
        try:
            await self.socket.ws.accept()
        except Exception:
            return  # the client left before we could accept; nothing was allocated
        with tracer.start_as_current_span(self.span_name) as span:
            try:
                await self.serve()
            except Refusal as e:
                log.info("call %s: socket refused: %s %s", self.call_id, e.code, e.reason)
                await self.socket.close(e.code, e.reason)
            except CarrierDisconnected:
                log.info("call %s: the carrier left before the call was live", self.call_id)
            except Exception:
                log.exception("call %s: unexpected failure", self.call_id)
                await self.socket.close(CLOSE_INTERNAL, INTERNAL_ERROR_REASON)
            finally:
                span.set_attribute("voicebus.call_id", self.call_id or "")
                span.set_attribute("voicebus.run_id", self.run.id if self.run else 0)

    async def serve(self) -> None:
        raise NotImplementedError
