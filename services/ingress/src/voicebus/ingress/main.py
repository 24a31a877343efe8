"""``voicebus-ingress``: serve the Agent Stream endpoint until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import logging

from voicebus.ingress.service import IngressService
from voicebus.ingress.settings import IngressSettings
from voicebus.kit import run_service
from voicebus.observability import setup_logging, setup_tracing

log = logging.getLogger("voicebus.ingress")


async def serve(stop: asyncio.Event) -> None:
    settings = IngressSettings()
    async with IngressService(settings) as svc:
        await stop.wait()
        log.info("stop requested: draining (up to %.0fs)", settings.drain_timeout_s)
        await svc.drain()
    log.info("ingress stopped")


def main() -> None:
    setup_logging("ingress")
    setup_tracing("ingress")
    run_service(serve)


if __name__ == "__main__":
    main()
