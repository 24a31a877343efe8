"""Run an ASGI app with uvicorn inside the current event loop, on a socket bound before it starts.

Binding the socket ourselves (port 0 = a free port) means the port is known and already accepting
connections into the backlog before uvicorn's loop runs, so callers never race the server's start-up
and tests never need to sleep or poll a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn


class _QuietServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the embedding program owns signals
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29 would take SIGINT/SIGTERM here
        yield


@dataclass
class RunningServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve_app(app: object, host: str = "127.0.0.1", port: int = 0,
                    graceful_s: float = 2.0) -> AsyncIterator[RunningServer]:
    """Serve ``app`` until the ``async with`` block ends. Access logs off (paths can carry session ids)."""
    sock = bind_socket(host, port)
    bound_port = int(sock.getsockname()[1])
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",  # type: ignore[arg-type]
                            timeout_graceful_shutdown=graceful_s)
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield RunningServer(host, bound_port)
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()

