"""One log format for every service, with secrets scrubbed at the handler.

Redaction sits on the handler rather than at call sites because third-party loggers (uvicorn's
access log, httpx, nats) format URLs and headers we never see: the Agent Stream URL authorizes a call
by itself, and bearer tokens must not reach a log line whoever logs them.
"""

from __future__ import annotations

import logging
import os
import re
import sys

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # The Agent Stream URL is a credential: keep the route, drop the agent UUID and the query string.
    (re.compile(r"(/agent-stream)/[^\s\"']*"), r"\1/<redacted>"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    (re.compile(r"(?i)((?:bearer_token|api_key|authorization|password|secret)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
     r"\1***"),
    (re.compile(r"(?i)(://[^:/\s]+:)[^@/\s]+@"), r"\1***@"),
]


def redact(text: str) -> str:
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(service: str, level: str | None = None) -> None:
    """Route every logger (ours, uvicorn's, pipecat's loguru) through one redacting handler."""
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(f"%(asctime)s %(levelname)-5s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for noisy in ("httpx", "httpcore", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _bridge_loguru(level)


def _bridge_loguru(level: str) -> None:
    try:
        from loguru import logger as loguru_logger
    except ImportError:
        return

    def sink(message: object) -> None:
        record = message.record  # type: ignore[attr-defined]
        logging.getLogger(record["name"] or "loguru").log(
            logging.getLevelName(record["level"].name) if record["level"].name != "SUCCESS" else logging.INFO,
            record["message"],
        )

    loguru_logger.remove()
    loguru_logger.add(sink, level="WARNING" if level == "INFO" else level, format="{message}")
