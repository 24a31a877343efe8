"""OpenTelemetry setup. Exporter chosen by ``OTEL_TRACES_EXPORTER``: none (default), console or otlp."""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

log = logging.getLogger("voicebus.tracing")


def setup_tracing(service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": f"voicebus-{service}"}))
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "none").lower()
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTEL_TRACES_EXPORTER=otlp but opentelemetry-exporter-otlp-proto-http is not installed")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider
