"""Simulated Cloudonix calls through the four services: happy path, caller hangup, a runner killed mid-call."""

from __future__ import annotations

import asyncio
import audioop
import re
import signal
import uuid

import httpx

from tests.e2e.conftest import DOMAIN, E2E, eventually
from tests.e2e.speech import speak_8k, transcribe_8k
from voicebus.simulator.call import CallerAction, CallScript, place_call


def _call_id() -> str:
    return f"e2e-{uuid.uuid4().hex[:8]}"


async def _session_state(e2e: E2E, session: str) -> dict:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        resp = await http.get(f"{e2e.cloudonix.url}/_sim/sessions/{session}", params={"wait_ended": 5})
        resp.raise_for_status()
        return resp.json()


async def test_happy_path_greeting_dtmf_agent_hangup(e2e: E2E, tmp_path) -> None:
    call_id = _call_id()
    wav = tmp_path / "call.wav"
    script = CallScript(domain=DOMAIN, cloudonix_api=e2e.cloudonix.url, record_path=wav,
                        caller="+15555550100", callee="+15555550199",
                        actions=[CallerAction.dtmf("1")], max_duration_s=60)
    report = await place_call(e2e.url(callId=call_id, **{"from": "+15555550100", "to": "+15555550199"}), script)

    # What the caller experienced.
    assert report.error is None, report.render()
    assert report.first_agent_audio_ms is not None, report.render()
    assert report.dtmf_sent == ["1"], report.render()
    assert report.hung_up_by == "agent", report.render()
    assert report.close_code == 1000, report.render()
    kinds = [e.kind for e in report.events]
    dtmf_at = kinds.index("dtmf_sent")
    assert "agent_speaking" in kinds[dtmf_at:], "the agent must answer the key press"
    speech = report.recording
    assert audioop.rms(speech, 2) > 300, "the recording holds speech, not silence"
    assert wav.exists() and wav.stat().st_size > 44
    # Intelligible: Whisper hears the greeting, the menu, the answer to "1", and the goodbye, in order.
    heard = transcribe_8k(speech)
    expected = ["thanks for calling", "press 1", "opening hours", "open every day", "goodbye"]
    positions = [heard.find(p) for p in expected]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), heard

    # The run record carries every field the seed lists.
    run = await e2e.run_for_call(call_id)
    assert run["state"] == "completed", run
    assert run["end_reason"] == "agent_hangup"
    assert re.fullmatch(r"WR-AGS-\d{8}", run["name"]), run["name"]
    assert run["call_type"] == "inbound"
    assert run["mode"] == "cloudonix"
    assert run["initial_context"]["caller_number"] == "+15555550100"
    assert run["initial_context"]["called_number"] == "+15555550199"
    assert run["gathered_context"]["call_id"] == call_id
    assert run["logs"]["inbound_webhook"]["Domain"] == DOMAIN
    assert run["telephony_configuration_id"] == e2e.telephony_config_id
    assert run["agent_uuid"] == e2e.agent_uuid
    assert run["started_at"] and run["ended_at"]

    # call-control hung the Cloudonix session up through the REST API, and the slot is free again.
    session = await _session_state(e2e, report.session)
    assert session["state"] == "ended", session
    assert session.get("ended_by") in ("rest", None) or "rest" in str(session), session
    await e2e.wait_quota_free()


async def test_caller_hangs_up_mid_call(e2e: E2E) -> None:
    call_id = _call_id()
    script = CallScript(domain=DOMAIN, cloudonix_api=e2e.cloudonix.url,
                        actions=[CallerAction.hangup()], max_duration_s=60)
    report = await place_call(e2e.url(callId=call_id), script)
    assert report.first_agent_audio_ms is not None, report.render()
    assert report.hung_up_by == "caller", report.render()
    run = await e2e.run_for_call(call_id)
    assert run["state"] == "completed", run
    assert run["end_reason"] == "caller_hangup"
    await e2e.wait_quota_free()


async def test_runner_killed_mid_sentence_the_call_resumes_on_the_other_runner(e2e: E2E) -> None:
    """SIGKILL the runner while the greeting plays: the caller stays connected, hears a short gap, then the
    menu from the other runner (no second greeting), presses 1 and the conversation goes on to the end."""
    call_id = _call_id()
    # The caller presses 1 only after 4 s of agent silence, so the gap itself is not taken for the
    # end of a prompt (a real caller waits for the menu too).
    script = CallScript(domain=DOMAIN, cloudonix_api=e2e.cloudonix.url, actions=[CallerAction.dtmf("1")],
                        agent_silence_ms=4000, max_duration_s=60)
    speaking = asyncio.Event()
    call = asyncio.create_task(place_call(
        e2e.url(callId=call_id), script,
        on_event=lambda ev: speaking.set() if ev.kind == "first_agent_audio" else None))
    victim_name: str | None = None
    try:
        async def owner() -> str | None:
            run = await e2e.run_for_call(call_id, terminal=False)
            return ((run.get("logs") or {}).get("runner") or {}).get("runner_id")

        victim_name = await eventually(owner, 20, "a runner to answer the call")
        await asyncio.wait_for(speaking.wait(), 20)
        await asyncio.sleep(1.2)  # let "Hello, and thanks..." be half said: the kill lands mid-sentence
        e2e.stack.services[victim_name].signal(signal.SIGKILL)
        report = await asyncio.wait_for(call, 60)
    finally:
        if not call.done():
            call.cancel()
    try:
        assert report.close_code == 1000 and report.hung_up_by == "agent", report.render()
        assert report.dtmf_sent == ["1"], report.render()
        run = await e2e.run_for_call(call_id)
        assert (run["state"], run["end_reason"]) == ("completed", "agent_hangup"), run
        attempts = run["logs"]["runner_attempts"]
        assert [a["attempt"] for a in attempts] == [1, 2], attempts
        assert attempts[0]["runner_id"] == victim_name != attempts[1]["runner_id"]
        print(f"resume: caller gap {attempts[1]['gap_ms']} ms")
        assert attempts[1]["gap_ms"] < 3000, attempts  # ~1.5 s of heartbeat silence, then the re-offer
        heard = transcribe_8k(report.recording)
        assert heard.count("hello") <= 1 and heard.count("thanks for calling") <= 1, heard  # no second greeting
        expected = ["opening hours", "open every day", "goodbye"]  # the menu again, then the rest of the call
        positions = [heard.find(p) for p in expected]
        assert all(p >= 0 for p in positions) and positions == sorted(positions), heard
        session = await _session_state(e2e, report.session)
        assert session["state"] == "ended", "call-control hangs the carrier leg up at the end"
        await e2e.wait_quota_free()
    finally:
        if victim_name is not None:
            e2e.stack.services[victim_name].wait(5)
            await asyncio.to_thread(e2e.stack.restart_service, victim_name)


async def test_barge_in_clears_agent_audio(e2e: E2E) -> None:
    """Caller speech while the agent talks makes the runner interrupt and ingress send ``clear``."""
    call_id = _call_id()
    interruption = speak_8k("Hello? Hello, I would like to speak to a person please.")
    script = CallScript(domain=DOMAIN, cloudonix_api=e2e.cloudonix.url, max_duration_s=60,
                        actions=[CallerAction.say(interruption, at_ms=2500), CallerAction.hangup()])
    report = await place_call(e2e.url(callId=call_id), script)
    assert report.first_agent_audio_ms is not None and report.first_agent_audio_ms < 2500, report.render()
    assert report.clears >= 1, report.render()
    clear = report.first("clear_received")
    said = report.first("say_start")
    assert clear is not None and said is not None and clear.t_ms > said.t_ms, report.render()
    assert clear.detail.get("barge_in"), "the clear cut audio the caller was still hearing"
    assert report.hung_up_by == "caller", report.render()
    run = await e2e.run_for_call(call_id)
    assert run["state"] == "completed" and run["end_reason"] == "caller_hangup", run
    await e2e.wait_quota_free()
