"""Request-reply over NATS with one error envelope and trace propagation.

Every reply is ``{"ok": true, "data": {...}}`` or ``{"ok": false, "error": {"code", "message"}}`` so a
caller can tell "not found" from "quota exceeded" from "the service is down" without parsing prose.
OpenTelemetry context rides the NATS headers, so one trace spans every hop of a call.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from pydantic import BaseModel, ValidationError

log = logging.getLogger("voicebus.bus")
tracer = trace.get_tracer("voicebus.bus")

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)


class BusError(Exception):
    """A request failed; ``code`` is stable and machine-readable, ``message`` is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def trace_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(msg: NatsMsg) -> otel_context.Context:
    return propagate.extract(msg.headers or {})


def _envelope_ok(data: BaseModel) -> bytes:
    return b'{"ok":true,"data":' + data.model_dump_json().encode() + b"}"


def _envelope_err(code: str, message: str) -> bytes:
    return json.dumps({"ok": False, "error": {"code": code, "message": message}}).encode()


async def request(
    nc: NATS,
    subject: str,
    payload: BaseModel,
    response_model: type[R],
    *,
    timeout: float = 3.0,
    headers: dict[str, str] | None = None,
) -> R:
    with tracer.start_as_current_span(f"request {subject}", kind=trace.SpanKind.CLIENT):
        try:
            msg = await nc.request(subject, payload.model_dump_json().encode(), timeout=timeout,
                                   headers=trace_headers(headers))
        except nats.errors.NoRespondersError as e:
            raise BusError("no_responders", f"nobody serves {subject}") from e
        except (nats.errors.TimeoutError, TimeoutError) as e:
            raise BusError("timeout", f"{subject} did not answer within {timeout:.1f}s") from e
    try:
        body = json.loads(msg.data)
    except ValueError as e:
        raise BusError("bad_reply", f"{subject} answered with non-JSON") from e
    if not body.get("ok"):
        err = body.get("error") or {}
        raise BusError(str(err.get("code", "error")), str(err.get("message", "unknown error")))
    return response_model.model_validate(body.get("data"))


Handler = Callable[[T], Awaitable[BaseModel]]


async def serve(
    nc: NATS,
    subject: str,
    request_model: type[T],
    handler: Callable[[T], Awaitable[BaseModel]],
    *,
    queue: str = "",
    concurrency: int = 1,
) -> Subscription:
    """Subscribe ``handler`` to ``subject``; it returns a model or raises :class:`BusError`.

    nats-py runs a subscription's callback one message at a time, so with the default one slow
    request (e.g. a carrier REST call with retries) holds up every request behind it. With
    ``concurrency`` > 1 up to that many requests are handled at once; when all slots are busy the
    subscription stops reading, which pushes back instead of piling up tasks.
    """

    async def on_msg(msg: NatsMsg) -> None:
        token = otel_context.attach(extract_context(msg))
        try:
            with tracer.start_as_current_span(f"serve {subject}", kind=trace.SpanKind.SERVER):
                try:
                    req = request_model.model_validate_json(msg.data)
                except ValidationError as e:
                    reply = _envelope_err("invalid_request", _short_validation(e))
                else:
                    try:
                        reply = _envelope_ok(await handler(req))
                    except BusError as e:
                        reply = _envelope_err(e.code, e.message)
                    except Exception:
                        log.exception("handler for %s failed", subject)
                        reply = _envelope_err("internal", f"{subject} failed; see the service log")
            if msg.reply:
                await msg.respond(reply)
        finally:
            otel_context.detach(token)

    if concurrency <= 1:
        return await nc.subscribe(subject, queue=queue, cb=on_msg)

    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task[None]] = set()

    async def run_one(msg: NatsMsg) -> None:
        try:
            await on_msg(msg)
        finally:
            slots.release()

    async def dispatch(msg: NatsMsg) -> None:
        await slots.acquire()
        task = asyncio.create_task(run_one(msg))
        running.add(task)
        task.add_done_callback(running.discard)

    return await nc.subscribe(subject, queue=queue, cb=dispatch)


def _short_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def decode_json(data: bytes) -> Any:
    return json.loads(data)
