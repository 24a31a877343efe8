"""Secrets never reach a log line, whoever formats it."""

from __future__ import annotations

import io
import logging

from voicebus.observability import redact, setup_logging


def test_redact_agent_stream_url_tokens_and_passwords() -> None:
    line = ('WebSocket /api/v1/agent-stream/3f1c9a0e-1111-2222-3333-444455556666?provider=cloudonix&Domain=x '
            'Authorization: Bearer abc.def-ghi {"bearer_token": "tok123", "api_key": "k9"} '
            'redis://user:hunter2@host:6379/0')
    out = redact(line)
    for secret in ("3f1c9a0e", "provider=cloudonix", "abc.def-ghi", "tok123", "k9", "hunter2"):
        assert secret not in out, out
    assert "/agent-stream/<redacted>" in out


def test_setup_logging_redacts_every_logger() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        setup_logging("test")
        stream = io.StringIO()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("uvicorn.error").warning('"WebSocket /api/v1/agent-stream/secret-uuid?provider=x" 403')
        logging.getLogger("some.lib").warning("Authorization: Bearer sekrit")
        text = stream.getvalue()
        assert "secret-uuid" not in text and "sekrit" not in text
        assert " test uvicorn.error: " in text, "service name and logger prefix every line"
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
