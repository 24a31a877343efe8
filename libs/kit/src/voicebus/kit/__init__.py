"""Service kit: the few things every voicebus service does the same way.

Settings from the environment, one NATS connection, a health endpoint, and a main loop that stops
cleanly on SIGINT/SIGTERM. Keeping them here means the four services differ only in what they do.
"""

from voicebus.kit.health import Health, health_router
from voicebus.kit.nats import connect_nats
from voicebus.kit.service import QuietServer, run_service, serve_http
from voicebus.kit.settings import ServiceSettings

__all__ = ["Health", "QuietServer", "ServiceSettings", "connect_nats", "health_router", "run_service", "serve_http"]
