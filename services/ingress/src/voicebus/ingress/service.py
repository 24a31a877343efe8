"""The ingress process: FastAPI app, uvicorn server, NATS connection, live-call registry and drain.

:class:`IngressService` is the in-process form used by tests (``async with IngressService(settings) as
svc``); ``voicebus-ingress`` runs the same class under :func:`voicebus.kit.run_service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from nats.aio.client import Client as NATS
from starlette.requests import HTTPConnection

from voicebus.bus.events import ensure_events_stream
from voicebus.bus.subjects import Subjects
from voicebus.ingress.agent_stream import AgentStreamCall
from voicebus.ingress.bus import BusClient
from voicebus.ingress.close_codes import CLOSE_POLICY
from voicebus.ingress.live_call.lease import cancel_handoffs
from voicebus.ingress.media_socket import MediaSocketCall
from voicebus.ingress.pending import PendingCalls
from voicebus.ingress.settings import IngressSettings
from voicebus.ingress.webhooks import PREFIX as TELEPHONY_PREFIX
from voicebus.ingress.webhooks import Webhooks
from voicebus.kit import Health, QuietServer, connect_nats, health_router
from voicebus.observability import redact

log = logging.getLogger("voicebus.ingress")

AGENT_STREAM_PATH = "/api/v1/agent-stream"
SHUTDOWN_GRACE_S = 30.0

# Loggers that may format the request path: uvicorn logs every accepted WebSocket with its full URL.
_URL_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "websockets", "websockets.server",
                "websockets.protocol")


class RedactFilter(logging.Filter):
    """Scrub the Agent Stream URL at the logger, before ANY handler (not only ours) sees the record.

    The redacting formatter of voicebus.observability only protects the handler it is installed on; a
    test's caplog, a log shipper or a handler someone adds later would still get the raw URL.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = RedactFilter()


def install_url_redaction() -> None:
    for name in _URL_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class IngressService:
    def __init__(self, settings: IngressSettings | None = None, nc: NATS | None = None) -> None:
        self.settings = settings or IngressSettings()
        self.subjects = Subjects(prefix=self.settings.subject_prefix)
        self._own_nc = nc is None
        self._nc = nc
        self.draining = False
        self.calls: set[AgentStreamCall | MediaSocketCall] = set()
        self.webhooks = Webhooks(self)
        self._pending: PendingCalls | None = None
        self._last_base = ""
        self._idle = asyncio.Event()
        self._idle.set()
        self.health = Health("ingress")
        self.health.info["active_calls"] = 0
        self.app = self._build_app()
        self._server: QuietServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        self.port: int = self.settings.port

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "IngressService.start() first"
        return self._nc

    @property
    def bus(self) -> BusClient:
        return self._bus

    @property
    def pending(self) -> PendingCalls:
        assert self._pending is not None, "IngressService.start() first"
        return self._pending

    def public_base(self) -> str:
        """Where carriers reach this ingress: the configured public URL, else the last request's own base."""
        return (self.settings.public_url or self._last_base or f"http://127.0.0.1:{self.port}").rstrip("/")

    # ------------------------------------------------------------------ app
    def _build_app(self) -> FastAPI:
        install_url_redaction()
        app = FastAPI(title="voicebus ingress", docs_url=None, redoc_url=None, openapi_url=None)
        self.health.add("nats", lambda: self._nc is not None and self._nc.is_connected)
        self.health.add("accepting_calls", lambda: not self.draining)
        app.include_router(health_router(self.health))
        app.include_router(self.webhooks.router())

        @app.middleware("http")
        async def remember_base(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            self._note_base(request)
            return await call_next(request)

        @app.websocket(TELEPHONY_PREFIX + "/media/{call_id}")
        async def media_socket(websocket: WebSocket, call_id: str) -> None:
            call = MediaSocketCall(self, websocket, call_id)
            self._track(call)
            try:
                await call.handle()
            finally:
                self._untrack(call)

        @app.websocket(AGENT_STREAM_PATH + "/{agent_uuid}")
        async def agent_stream(websocket: WebSocket, agent_uuid: str) -> None:
            call = AgentStreamCall(self, websocket, agent_uuid)
            self._track(call)
            try:
                await call.handle()
            finally:
                self._untrack(call)

        @app.websocket(AGENT_STREAM_PATH + "/{rest:path}")
        async def agent_stream_bad_path(websocket: WebSocket, rest: str) -> None:
            # e.g. the reference platform's /agent-stream/{provider}/{uuid} form: say so instead of a bare 403
            await websocket.accept()
            await websocket.close(CLOSE_POLICY, "Invalid Agent Stream URL: expected /api/v1/agent-stream/{agent_uuid}")

        return app

    def _note_base(self, conn: HTTPConnection) -> None:
        if not self.settings.public_url:
            self._last_base = f"{conn.url.scheme}://{conn.url.netloc}"

    def _track(self, call: AgentStreamCall | MediaSocketCall) -> None:
        self.calls.add(call)
        self._idle.clear()
        self.health.info["active_calls"] = len(self.calls)

    def _untrack(self, call: AgentStreamCall | MediaSocketCall) -> None:
        self.calls.discard(call)
        self.health.info["active_calls"] = len(self.calls)
        if not self.calls:
            self._idle.set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, serve: bool = True) -> IngressService:
        """Connect NATS and, unless ``serve`` is False (an outside ASGI server runs ``self.app``), listen."""
        if self._nc is None:
            self._nc = await connect_nats(self.settings.nats_url, name="voicebus-ingress")
        self._bus = BusClient(self._nc, self.subjects, self.settings.rpc_timeout_s)
        await ensure_events_stream(self._nc.jetstream(), self.subjects)
        self._pending = PendingCalls(self._nc, self.subjects)
        await self._pending.start()
        if not serve:
            return self
        config = uvicorn.Config(
            self.app, host=self.settings.http_host, port=self.settings.port, log_config=None, access_log=False,
            lifespan="off", ws_ping_interval=20, ws_ping_timeout=20, ws_max_size=1 << 20, server_header=False,
        )
        self._server = QuietServer(config)
        self._server_task = asyncio.create_task(self._server.serve(), name="ingress-http")
        listening = asyncio.create_task(self._server.listening.wait())
        await asyncio.wait({self._server_task, listening}, return_when=asyncio.FIRST_COMPLETED)
        if not self._server.listening.is_set():
            listening.cancel()
            await self._server_task  # re-raises the bind error
            raise RuntimeError(f"ingress HTTP server did not start on {self.settings.http_host}:{self.settings.port}")
        sockets = [s for srv in self._server.servers for s in srv.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("ingress listening on %s:%d (subject prefix %s)", self.settings.http_host, self.port,
                 self.subjects.prefix)
        return self

    def begin_drain(self) -> None:
        """Stop taking new calls (new sockets get 1012) and report not-ready so the balancer moves on."""
        if not self.draining:
            log.info("draining: %d live call(s)", len(self.calls))
        self.draining = True

    async def drain(self, timeout_s: float | None = None) -> None:
        """Let live calls finish; after ``timeout_s`` end the rest (hangup via call-control, 1012)."""
        self.begin_drain()
        timeout = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return
        except TimeoutError:
            log.warning("drain deadline passed with %d live call(s); ending them", len(self.calls))
        for call in list(self.calls):
            call.shutdown()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), SHUTDOWN_GRACE_S)

    async def stop(self) -> None:
        await self.webhooks.stop()
        await cancel_handoffs()
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception, SystemExit):
                await self._server_task
        if self._own_nc and self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        self._server = None

    async def __aenter__(self) -> IngressService:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def create_app(settings: IngressSettings | None = None) -> tuple[FastAPI, IngressService]:
    """The ASGI app and its service, for an outside ASGI server: ``await service.start(serve=False)`` first."""
    svc = IngressService(settings)
    return svc.app, svc
