"""Main-loop helpers: run until SIGINT/SIGTERM, serve HTTP with uvicorn inside the same loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from fastapi import FastAPI


def run_service(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; ``stop`` is set on the first SIGINT/SIGTERM so the service can drain."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await main(stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(runner())


class QuietServer(uvicorn.Server):
    """uvicorn that leaves signals to the service and says when it is listening.

    The service owns SIGTERM because it must drain (stop taking work, finish calls) before its HTTP
    server (health, WebSockets) goes away; uvicorn's own handlers would close it at once.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    def install_signal_handlers(self) -> None:
        pass

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets=sockets)
        self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn >= 0.29 takes SIGINT/SIGTERM here with signal.signal() regardless of the method
        # above, so a SIGTERM would stop the HTTP server before the service has drained.
        yield


async def serve_http(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve ``app`` until ``stop`` is set. Access logs are off: URLs can carry credentials."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                            ws_ping_interval=20, ws_ping_timeout=20)
    server = QuietServer(config)
    task = asyncio.create_task(server.serve())
    stopper = asyncio.create_task(stop.wait())
    _done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopper.cancel()
    await task
