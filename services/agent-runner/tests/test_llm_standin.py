"""The OpenAI-compatible stand-in, through the real openai client and as ``python -m``."""

from __future__ import annotations

import asyncio
import io
import sys
import wave

import httpx
import pytest
from openai import AsyncOpenAI

from voicebus.cli.embedded import free_port, wait_for_port
from voicebus.simulator.llm_standin import RunningStandin, running_standin

END_CALL_TOOL = {"type": "function", "function": {"name": "end_call", "description": "Hang up.",
                                                  "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
async def client() -> object:
    async with running_standin(transcript="one two three") as server:
        oa = AsyncOpenAI(base_url=server.base_url, api_key="anything")
        try:
            yield server, oa
        finally:
            await oa.close()


async def test_non_streaming_echoes_last_user_message(client: tuple[RunningStandin, AsyncOpenAI]) -> None:
    server, oa = client
    resp = await oa.chat.completions.create(model="m", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "The caller pressed 1."}])
    assert resp.choices[0].message.content == "You said: The caller pressed 1."
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.total_tokens > 0
    assert server.requests[-1]["body"]["messages"][-1]["content"] == "The caller pressed 1."


async def test_streaming_reply_and_usage(client: tuple[RunningStandin, AsyncOpenAI]) -> None:
    _server, oa = client
    stream = await oa.chat.completions.create(model="m", stream=True, stream_options={"include_usage": True},
                                              messages=[{"role": "user", "content": "hello there"}])
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert (text, finish) == ("You said: hello there", "stop")
    assert usage is not None and usage.completion_tokens == 4


async def test_end_call_tool_when_asked_and_offered(client: tuple[RunningStandin, AsyncOpenAI]) -> None:
    _server, oa = client
    msgs = [{"role": "user", "content": "ok, goodbye"}]
    resp = await oa.chat.completions.create(model="m", messages=msgs, tools=[END_CALL_TOOL])  # type: ignore[arg-type]
    call = resp.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.function.name, call.function.arguments, resp.choices[0].finish_reason) == ("end_call", "{}",
                                                                                             "tool_calls")
    pressed_9 = [{"role": "user", "content": "The caller pressed 9."}]
    stream = await oa.chat.completions.create(model="m", messages=pressed_9, tools=[END_CALL_TOOL],  # type: ignore[arg-type]
                                              stream=True)
    names, args = [], ""
    async for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                args += (tc.function.arguments or "") if tc.function else ""
    assert (names, args) == (["end_call"], "{}")
    # Without the tool on offer, the stand-in just says goodbye.
    resp = await oa.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == "Goodbye!" and not resp.choices[0].message.tool_calls


async def test_models_transcriptions_and_bad_requests(client: tuple[RunningStandin, AsyncOpenAI]) -> None:
    server, oa = client
    models = await oa.models.list()
    assert [m.id for m in models.data] == ["voicebus-standin"]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(1600))
    tr = await oa.audio.transcriptions.create(model="whisper-x", file=("a.wav", buf.getvalue(), "audio/wav"))
    assert tr.text == "one two three"
    assert server.requests[-1]["model"] == "whisper-x" and server.requests[-1]["audio_bytes"] > 1600
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        r = await http.post("/chat/completions", content=b"not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = await http.post("/chat/completions", json={"model": "m", "messages": []})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
        r = await http.post("/audio/transcriptions", data={"model": "x"})
        assert r.status_code == 400


async def test_runs_as_a_module() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebus.simulator.llm_standin", "--port", str(port), "--model", "cli-model",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 20)
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{port}/v1/models")
        assert r.json()["data"][0]["id"] == "cli-model"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
