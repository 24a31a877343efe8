"""``voicebus-agent-runner``: run the runner with its health endpoint until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import logging

from voicebus.agent_runner.runner import Runner
from voicebus.agent_runner.settings import RunnerSettings
from voicebus.kit import run_service, serve_http
from voicebus.observability import setup_logging, setup_tracing

log = logging.getLogger("voicebus.agent_runner")


async def amain(stop: asyncio.Event, settings: RunnerSettings | None = None) -> None:
    settings = settings or RunnerSettings()
    runner = Runner(settings)
    http_stop = asyncio.Event()
    # Health first, so an orchestrator sees the process alive while the models warm up.
    http = asyncio.create_task(serve_http(runner.app(), settings.http_host, settings.port, http_stop))
    try:
        await runner.start()
        await stop.wait()
        log.info("shutdown requested: draining")
    finally:
        await runner.stop()
        http_stop.set()
        await http


def main() -> None:
    setup_logging("agent-runner")
    setup_tracing("agent-runner")
    run_service(amain)


if __name__ == "__main__":
    main()
