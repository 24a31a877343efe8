"""An OpenAI-compatible stand-in server for testing LLM agents offline, with no API key.

Serves what voicebus's LLM agents call:

- ``POST /v1/chat/completions``, streaming (SSE) and non-streaming. The reply echoes the last user
  message ("You said: ..."), so a test can tell which input reached the model. When the request offers
  the ``end_call`` tool and the last user message asks to end the call (goodbye, bye, hang up, end the
  call, or a reported key 9, as in the demo menu "press 9 to end the call"), it answers with a call to
  ``end_call`` instead.
- ``POST /v1/audio/transcriptions``: a fixed transcript (``--transcript``), so the speech path can be
  tested without a speech model.
- ``GET /v1/models``.

Every request is recorded in ``app.state.requests`` for tests. Run it with
``python -m voicebus.simulator.llm_standin --port 8091``; an agent then uses
``base_url=http://127.0.0.1:8091/v1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email import policy as email_policy
from email.parser import BytesParser
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from voicebus.simulator._server import serve_app

DEFAULT_MODEL = "voicebus-standin"
DEFAULT_TRANSCRIPT = "Hello, I have a question."
END_CALL_TOOL = "end_call"
END_PATTERN = re.compile(r"\b(good ?bye|bye|hang ?up|end (the|this) call|pressed 9)\b", re.IGNORECASE)


def _text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of a multi-part content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _offers_tool(body: dict[str, Any], name: str) -> bool:
    for tool in body.get("tools") or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            return True
    return False


def decide(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(reply text, tool to call) for a chat request: the whole "model"."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return "Okay.", None
    last_user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    if last_user and END_PATTERN.search(last_user):
        if _offers_tool(body, END_CALL_TOOL):
            return None, END_CALL_TOOL
        return "Goodbye!", None
    if not last_user:
        return "How can I help you?", None
    return f"You said: {last_user.strip()}", None


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = sum(len(_text_of(m.get("content")).split()) for m in body.get("messages") or [] if isinstance(m, dict))
    completion = len(text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    payload = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(payload)}\n\n"


def _stream(body: dict[str, Any], model: str, text: str | None, tool: str | None) -> Iterator[str]:
    cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    yield _chunk(cid, model, {"role": "assistant", "content": ""})
    if tool is not None:
        call = {"index": 0, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                "function": {"name": tool, "arguments": ""}}
        yield _chunk(cid, model, {"tool_calls": [call]})
        yield _chunk(cid, model, {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
        yield _chunk(cid, model, {}, "tool_calls")
    else:
        words = (text or "").split(" ")
        for i, word in enumerate(words):
            yield _chunk(cid, model, {"content": word if i == 0 else " " + word})
        yield _chunk(cid, model, {}, "stop")
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                 "choices": [], "usage": _usage(body, text or "")}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(*, model: str = DEFAULT_MODEL, transcript: str = DEFAULT_TRANSCRIPT) -> FastAPI:
    app = FastAPI(title="voicebus LLM stand-in", docs_url=None, redoc_url=None)
    app.state.requests = []
    app.state.transcript = transcript

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "voicebus"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "'messages' must be a non-empty list")
        app.state.requests.append({"path": "/v1/chat/completions", "body": body})
        text, tool = decide(body)
        used_model = str(body.get("model") or model)
        if body.get("stream"):
            return StreamingResponse(_stream(body, used_model, text, tool), media_type="text/event-stream")
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool is not None:
            message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                                      "function": {"name": tool, "arguments": "{}"}}]
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": used_model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop"}],
            "usage": _usage(body, text or ""),
        })

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return _error(400, "expected multipart/form-data with a 'file' field")
        fields = _multipart(ctype, await request.body())
        audio = fields.get("file")
        if not audio:
            return _error(400, "multipart field 'file' is required")
        model_name = (fields.get("model") or b"").decode(errors="replace")
        app.state.requests.append({"path": "/v1/audio/transcriptions", "model": model_name,
                                   "audio_bytes": len(audio)})
        return JSONResponse({"text": app.state.transcript})

    return app


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """Fields of a multipart/form-data body, parsed with the stdlib (no python-multipart dependency)."""
    message = BytesParser(policy=email_policy.default).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, bytes] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = payload if isinstance(payload, bytes) else b""
    return fields


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


@dataclass
class RunningStandin:
    app: FastAPI
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.app.state.requests


@contextlib.asynccontextmanager
async def running_standin(*, port: int = 0, **kwargs: Any) -> AsyncIterator[RunningStandin]:
    """Serve the stand-in on 127.0.0.1 inside the current event loop (port 0 = any free port).

    The socket is bound and listening before this yields, so callers can connect at once.
    """
    app = create_app(**kwargs)
    async with serve_app(app, "127.0.0.1", port) as running:
        yield RunningStandin(app, running.port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m voicebus.simulator.llm_standin",
                                     description="OpenAI-compatible stand-in LLM/STT server for offline tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--transcript", default=DEFAULT_TRANSCRIPT, help="What /v1/audio/transcriptions answers.")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(model=args.model, transcript=args.transcript), host=args.host, port=args.port,
                access_log=False)


if __name__ == "__main__":
    main()
