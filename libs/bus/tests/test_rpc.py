"""Request-reply over a real NATS server: the envelope, error codes, and trace propagation."""

from __future__ import annotations

import nats
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from voicebus.bus import Subjects
from voicebus.bus.rpc import BusError, request, serve


class Ping(BaseModel):
    n: int


class Pong(BaseModel):
    n: int
    trace_id: int


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def test_request_reply_envelope_errors_and_trace(nats_url: str, subject_prefix: str,
                                                       spans: InMemorySpanExporter) -> None:
    subjects = Subjects(subject_prefix)
    nc = await nats.connect(nats_url)
    try:
        async def handler(req: Ping) -> Pong:
            if req.n < 0:
                raise BusError("negative", "n must not be negative")
            if req.n == 13:
                raise RuntimeError("boom")
            return Pong(n=req.n + 1, trace_id=trace.get_current_span().get_span_context().trace_id)

        await serve(nc, subjects.cfg("ping"), Ping, handler, queue="q")
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("caller") as span:
            pong = await request(nc, subjects.cfg("ping"), Ping(n=1), Pong)
        assert pong.n == 2
        assert span.get_span_context().is_valid, "a real tracer is installed, so the check below means something"
        assert pong.trace_id == span.get_span_context().trace_id, "the server span joins the caller's trace"

        with pytest.raises(BusError) as e:
            await request(nc, subjects.cfg("ping"), Ping(n=-1), Pong)
        assert (e.value.code, e.value.message) == ("negative", "n must not be negative")

        with pytest.raises(BusError) as e:
            await request(nc, subjects.cfg("ping"), Ping(n=13), Pong)
        assert e.value.code == "internal" and "boom" not in e.value.message  # no internals leak

        raw = await nc.request(subjects.cfg("ping"), b'{"m": 1}', timeout=2)
        assert b'"code": "invalid_request"' in raw.data and b"n: Field required" in raw.data
        raw = await nc.request(subjects.cfg("ping"), b"not json", timeout=2)
        assert b'"code": "invalid_request"' in raw.data

        with pytest.raises(BusError) as e:
            await request(nc, subjects.cfg("nobody-here"), Ping(n=1), Pong, timeout=1)
        assert e.value.code == "no_responders"
    finally:
        await nc.close()
