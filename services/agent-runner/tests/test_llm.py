"""The LLM path end to end against the OpenAI-compatible stand-in (runner in-process on real NATS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from voicebus.agent_runner.llm import dtmf_user_text
from voicebus.bus.agent import AgentDefinition, LLMSpec
from voicebus.bus.events import checkpoint_store
from voicebus.bus.messages import CallCheckpoint
from voicebus.bus.subjects import Subjects
from voicebus.simulator.llm_standin import RunningStandin, running_standin

from .conftest import FakeCallControl, FakeIngress, IngressFactory, RunnerFactory, wait_until


@pytest.fixture
async def standin() -> AsyncIterator[RunningStandin]:
    async with running_standin(transcript="What are your opening hours?") as server:
        yield server


def chat_requests(standin: RunningStandin) -> list[dict[str, Any]]:
    return [r["body"] for r in standin.requests if r["path"] == "/v1/chat/completions"]


def last_user_text(body: dict[str, Any]) -> str:
    users = [m for m in body["messages"] if m.get("role") == "user"]
    content = users[-1]["content"] if users else ""
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)


async def test_llm_agent_answers_dtmf_and_ends_call_with_tool(
        make_runner: RunnerFactory, ingress: IngressFactory, call_control: FakeCallControl, standin: RunningStandin,
        nc: NATS, subjects: Subjects) -> None:
    await make_runner()
    ing: FakeIngress = ingress()
    definition = AgentDefinition(
        greeting="Hello, how can I help?", goodbye="Goodbye, and thanks for calling.", barge_in=False,
        llm=LLMSpec(base_url=standin.base_url, model="voicebus-standin", system_prompt="You are a test agent."),
    )
    await ing.offer(definition)
    await ing.wait_quiet()
    greeting_frames = len(ing.frames)
    assert greeting_frames > 40
    assert not chat_requests(standin)  # the greeting is spoken without asking the LLM

    await ing.dtmf("1")
    await wait_until(lambda: len(chat_requests(standin)) >= 1, 10, "a chat completion request")
    body = chat_requests(standin)[0]
    assert body["model"] == "voicebus-standin" and body["stream"] is True
    assert body["messages"][0] == {"role": "system", "content": "You are a test agent."}
    assert [m["role"] for m in body["messages"]].count("system") == 1
    assert any(m.get("role") == "assistant" and "Hello, how can I help?" in str(m.get("content"))
               for m in body["messages"])
    assert last_user_text(body) == dtmf_user_text("1")
    assert [t["function"]["name"] for t in body["tools"]] == ["end_call"]
    await ing.wait_quiet(after=greeting_frames)
    assert len(ing.frames) > greeting_frames + 40  # "You said: The caller pressed 1." was spoken

    # The exchange was checkpointed with the LLM messages.
    kv = await checkpoint_store(nc.jetstream(), subjects)

    async def checkpoint() -> CallCheckpoint:
        return CallCheckpoint.model_validate_json((await kv.get(ing.call_id)).value or b"")

    cp = await checkpoint()
    assert cp.turn >= 1 and cp.flow_node is None
    contents = [str(m.get("content")) for m in cp.messages]
    assert dtmf_user_text("1") in contents
    assert any("You said: The caller pressed 1." in c for c in contents)

    # "9" is the stand-in's cue to call end_call: goodbye, close, hangup intent.
    before = len(ing.frames)
    await ing.dtmf("9")
    req = await call_control.wait_hangup(ing.call_id)
    assert (req.reason, req.end_state) == ("agent_hangup", "completed")
    assert [(c.reason, c.state) for c in ing.events_of("close")] == [("agent_hangup", "completed")]
    assert len(ing.frames) > before + 40  # the goodbye was played before the close
    assert last_user_text(chat_requests(standin)[-1]) == dtmf_user_text("9")


async def test_llm_agent_hears_speech_through_stt(make_runner: RunnerFactory, ingress: IngressFactory,
                                                  call_control: FakeCallControl, standin: RunningStandin,
                                                  speech_pcm: bytes) -> None:
    await make_runner()
    ing: FakeIngress = ingress()
    definition = AgentDefinition(
        greeting="Hi.", barge_in=True,
        llm=LLMSpec(base_url=standin.base_url, model="voicebus-standin", stt_model="whisper-standin",
                    api_key="sk-test-not-a-real-key"),
    )
    await ing.offer(definition)
    await ing.wait_quiet()
    before = len(ing.frames)
    ing.say(speech_pcm[: 8000 * 2 * 6 // 5])  # "Hello there." (1.2 s) is enough to make a turn
    await wait_until(lambda: bool(chat_requests(standin)), 15, "a chat request after speech")
    stt = [r for r in standin.requests if r["path"] == "/v1/audio/transcriptions"]
    assert stt and stt[0]["model"] == "whisper-standin" and stt[0]["audio_bytes"] > 8000
    assert last_user_text(chat_requests(standin)[0]) == "What are your opening hours?"
    await ing.wait_quiet(after=before)
    assert len(ing.frames) > before + 40  # the answer was spoken
    await ing.caller_hangup()


async def test_resumed_llm_call_restores_messages_and_answers_pending_input(
        make_runner: RunnerFactory, ingress: IngressFactory, call_control: FakeCallControl, standin: RunningStandin,
        nc: NATS, subjects: Subjects) -> None:
    await make_runner()
    ing: FakeIngress = ingress()
    history = [{"role": "assistant", "content": "Hello, how can I help?"},
               {"role": "user", "content": dtmf_user_text("4")}]
    kv = await checkpoint_store(nc.jetstream(), subjects)
    await kv.put(ing.call_id, CallCheckpoint(call_id=ing.call_id, run_id=42, runner_id="dead-runner", turn=1,
                                             messages=history).encode())
    definition = AgentDefinition(greeting="A greeting that a resumed call must not hear again.", barge_in=False,
                                 llm=LLMSpec(base_url=standin.base_url, model="voicebus-standin"))
    await ing.offer(definition, resume=True, attempt=2)
    # The caller's last input had no answer yet: the resumed agent answers it straight away.
    await wait_until(lambda: bool(chat_requests(standin)), 10, "a chat request on resume")
    body = chat_requests(standin)[0]
    assert [m for m in body["messages"] if m["role"] != "system"] == history
    await ing.wait_quiet()
    assert 40 < len(ing.frames) < 200  # "You said: The caller pressed 4.", no greeting
    await ing.caller_hangup()
