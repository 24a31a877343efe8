"""Logging with secret redaction, and OpenTelemetry wiring, shared by every service."""

from voicebus.observability.logs import redact, setup_logging
from voicebus.observability.tracing import setup_tracing

__all__ = ["redact", "setup_logging", "setup_tracing"]
