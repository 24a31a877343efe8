"""The carrier simulator client against a tiny real WebSocket server playing the agent."""

from __future__ import annotations

import asyncio
import audioop
import base64
import itertools
import json
import math
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from voicebus.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voicebus.simulator.call import CallerAction, CallScript, load_wav_8k, place_call, redact_url

AGENT_UUID = "3f1c2d4e-aaaa-bbbb-cccc-0123456789ab"
FRAME = 160  # μ-law bytes per 20 ms


def tone_pcm(ms: int, freq: float = 440.0, amp: int = 8000, rate: int = 8000) -> bytes:
    n = rate * ms // 1000
    return b"".join(int(amp * math.sin(2 * math.pi * freq * i / rate)).to_bytes(2, "little", signed=True)
                    for i in range(n))


def media_messages(pcm: bytes, stream_sid: str) -> list[str]:
    ulaw = pcm16_to_ulaw(pcm)
    return [json.dumps({"event": "media", "streamSid": stream_sid,
                        "media": {"payload": base64.b64encode(ulaw[i:i + FRAME]).decode()}})
            for i in range(0, len(ulaw), FRAME)]


def frame_rms(recording: bytes, index: int) -> int:
    return audioop.rms(recording[index * 320:(index + 1) * 320], 2)


class Agent:
    """What the in-test server saw: every message with its arrival time."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, Any]] = []
        self.closed_code: int | None = None
        self.done = asyncio.Event()

    def of(self, event: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.messages if isinstance(m, dict) and m.get("event") == event]

    async def recv(self, ws: ServerConnection, timeout: float = 5.0) -> Any:
        raw = await asyncio.wait_for(ws.recv(), timeout)
        try:
            msg: Any = json.loads(raw)
        except ValueError:
            msg = raw
        self.messages.append((time.monotonic(), msg))
        return msg

    async def until(self, ws: ServerConnection, event: str, timeout: float = 5.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            msg = await self.recv(ws, max(0.01, end - time.monotonic()))
            if isinstance(msg, dict) and msg.get("event") == event:
                return msg


@asynccontextmanager
async def agent_server(play: Callable[[ServerConnection, Agent], Awaitable[None]],
                       **kw: Any) -> AsyncIterator[tuple[str, Agent]]:
    agent = Agent()

    async def handler(ws: ServerConnection) -> None:
        try:
            await play(ws, agent)
        except ConnectionClosed:
            pass
        finally:
            await ws.wait_closed()
            agent.closed_code = ws.close_code
            agent.done.set()

    async with serve(handler, "127.0.0.1", 0, compression=None, **kw) as server:
        port = server.sockets[0].getsockname()[1]
        yield (f"ws://127.0.0.1:{port}/api/v1/agent-stream/{AGENT_UUID}"
               f"?provider=cloudonix&Domain=acme&callId=c1&from=%2B1555&to=%2B1666"), agent


async def test_timeline_marks_dtmf_after_silence_and_recording(tmp_path: Path) -> None:
    """Greeting, mark, DTMF once the agent is quiet for 700 ms, a short reply, then the agent hangs up."""
    marks: dict[str, float] = {}

    async def play(ws: ServerConnection, agent: Agent) -> None:
        await agent.recv(ws)
        start = await agent.recv(ws)
        sid = start["streamSid"]
        for m in media_messages(tone_pcm(500), sid):  # faster than real time, as a buffer-filling agent would
            await ws.send(m)
        await ws.send(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": "greeting"}}))
        marks["sent_audio"] = time.monotonic()
        await agent.until(ws, "mark")
        marks["acked"] = time.monotonic()
        await agent.until(ws, "dtmf")
        marks["dtmf"] = time.monotonic()
        for m in media_messages(tone_pcm(200, 660), sid):
            await ws.send(m)
        await agent.until(ws, "media")  # let some playback happen before hanging up
        await ws.close(1000, "agent hung up")

    wav = tmp_path / "heard.wav"
    script = CallScript(domain="acme.cloudonix.net", session="sess-1", caller="+15551230001",
                        callee="+15551230002", custom_parameters={"lang": "en"},
                        actions=[CallerAction.dtmf("1")], record_path=wav, max_duration_s=10)
    async with agent_server(play) as (url, agent):
        report = await place_call(url, script)
        await asyncio.wait_for(agent.done.wait(), 5)

    connected, start = agent.messages[0][1], agent.messages[1][1]
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    assert start["start"] == {
        "streamSid": script.stream_sid, "callSid": script.call_sid, "session": "sess-1",
        "accountSid": "acme.cloudonix.net", "from": "+15551230001", "to": "+15551230002", "context": "inbound",
        "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"lang": "en"}}
    # The mark comes back only after the 500 ms of audio queued before it has been played.
    assert 0.4 <= marks["acked"] - marks["sent_audio"] <= 0.9
    # DTMF: after the agent has been quiet for ~700 ms, not before and not much later.
    assert 0.65 <= marks["dtmf"] - marks["acked"] <= 1.2
    dtmf = agent.of("dtmf")[0][1]
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "1"} and dtmf["streamSid"] == script.stream_sid

    assert report.hung_up_by == "agent" and report.end_cause == "server_closed"
    assert (report.close_code, report.close_reason, report.closed_by) == (1000, "agent hung up", "agent")
    assert report.first_agent_audio_ms is not None and report.first_agent_audio_ms < 300
    assert report.dtmf_sent == ["1"] and report.marks == ["greeting"] and report.clears == 0
    kinds = [e.kind for e in report.events]
    for earlier, later in [("ws_open", "connected_sent"), ("connected_sent", "start_sent"),
                           ("start_sent", "first_agent_audio"), ("mark_received", "mark_played"),
                           ("mark_played", "agent_quiet"), ("agent_quiet", "dtmf_sent"), ("dtmf_sent", "closed")]:
        assert kinds.index(earlier) < kinds.index(later), (earlier, later, kinds)
    assert report.audio_bytes >= 8 * 500
    assert AGENT_UUID not in report.render() and AGENT_UUID not in report.to_json()
    assert "first agent audio" in report.render() and "code 1000" in report.render()

    # Recording: 8 kHz mono PCM16, the greeting first, then silence, time-aligned with the call.
    with wave.open(str(wav)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        pcm = w.readframes(w.getnframes())
    assert pcm == report.recording
    assert report.wav_path == str(wav)
    voiced = [frame_rms(pcm, i) > 3000 for i in range(len(pcm) // 320)]
    first = voiced.index(True)
    assert first <= report.first_agent_audio_ms // 20 + 2  # heard from the next 20 ms tick on
    assert all(voiced[first:first + 24])  # the whole 500 ms greeting, uninterrupted
    assert not any(voiced[first + 26:first + 26 + 30])  # then silence while the caller waits to press 1
    assert abs(len(pcm) / 16 - (report.duration_ms - report.first("start_sent").t_ms)) < 150


async def test_barge_in_clear_and_caller_hangup(tmp_path: Path) -> None:
    """The agent talks; the caller speaks over it at 500 ms; the agent sends clear; the caller hangs up."""
    seen: dict[str, float] = {}

    async def play(ws: ServerConnection, agent: Agent) -> None:
        await agent.recv(ws)
        start = await agent.recv(ws)
        sid = start["streamSid"]
        seen["start"] = time.monotonic()
        for m in media_messages(tone_pcm(3000), sid):
            await ws.send(m)
        while True:
            msg = await agent.recv(ws)
            if msg.get("event") == "media":
                pcm = ulaw_to_pcm16(base64.b64decode(msg["media"]["payload"]))
                if audioop.rms(pcm, 2) > 1000:
                    seen["speech"] = time.monotonic()
                    await ws.send(json.dumps({"event": "clear", "streamSid": sid}))
                    break
        stop = await agent.until(ws, "stop")
        seen["stop"] = time.monotonic()
        assert stop["stop"]["callSid"] and stop["streamSid"] == sid

    script = CallScript(actions=[CallerAction.say(tone_pcm(400, 300), at_ms=500)], hangup_after_s=1.5,
                        record_path=tmp_path / "b.wav")
    async with agent_server(play) as (url, agent):
        report = await place_call(url, script)
        await asyncio.wait_for(agent.done.wait(), 5)

    assert 0.45 <= seen["speech"] - seen["start"] <= 1.0
    assert 1.4 <= seen["stop"] - seen["start"] <= 2.2
    assert agent.closed_code == 1000
    assert report.clears == 1
    clear = report.first("clear_received")
    assert clear is not None and clear.detail["barge_in"] is True
    assert 1500 <= clear.detail["dropped_ms"] <= 2600
    assert report.hung_up_by == "caller" and report.end_cause == "caller_hangup"
    assert (report.close_code, report.close_reason, report.closed_by) == (1000, "caller hung up", "caller")
    assert report.first("stop_sent") is not None and report.first("say_start") is not None
    # What the caller heard: the tone until the clear, silence after it.
    voiced = [frame_rms(report.recording, i) > 3000 for i in range(len(report.recording) // 320)]
    heard = voiced.index(False, 2)
    assert all(voiced[2:heard]) and not any(voiced[heard:])
    clear_ms = clear.t_ms - report.first("start_sent").t_ms
    assert abs(heard * 20 - clear_ms) <= 120, (heard, clear_ms)


async def test_media_is_paced_in_real_time() -> None:
    arrivals: list[tuple[float, dict[str, Any]]] = []

    async def play(ws: ServerConnection, agent: Agent) -> None:
        await agent.recv(ws)
        await agent.recv(ws)
        while True:
            msg = await agent.recv(ws)
            if msg.get("event") == "media":
                arrivals.append((time.monotonic(), msg))
            elif msg.get("event") == "stop":
                return

    async with agent_server(play) as (url, agent):
        report = await place_call(url, CallScript(hangup_after_s=1.2))
        await asyncio.wait_for(agent.done.wait(), 5)

    assert 57 <= len(arrivals) <= 61 and report.frames_sent == len(arrivals)
    # Over one second in the middle of the call, frames arrive every 20 ms on average.
    times = [t for t, _ in arrivals]
    window = [t for t in times if times[0] + 0.1 <= t <= times[0] + 1.1]
    mean_gap = (window[-1] - window[0]) / (len(window) - 1)
    assert 0.018 <= mean_gap <= 0.022, mean_gap
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.25
    seqs = [int(m["sequenceNumber"]) for _, m in arrivals]
    assert seqs == list(range(2, 2 + len(seqs)))
    first = arrivals[0][1]["media"]
    assert first["track"] == "inbound" and first["chunk"] == "1" and first["timestamp"] == "0"
    assert arrivals[10][1]["media"]["timestamp"] == "200"
    assert base64.b64decode(first["payload"]) == b"\xff" * 160  # μ-law silence


@pytest.mark.parametrize(("variant", "omit"), [
    ("skip_connected", ()), ("malformed_start", ()), ("normal", ("session", "accountSid")), ("no_start", ()),
])
async def test_handshake_variations(variant: str, omit: tuple[str, ...]) -> None:
    """An endpoint that checks the handshake strictly: the report carries its close code and reason."""
    first_two: list[Any] = []

    async def play(ws: ServerConnection, agent: Agent) -> None:
        first = await agent.recv(ws)
        first_two.append(first)
        if not (isinstance(first, dict) and first.get("event") == "connected"):
            await ws.close(4400, "Expected connected event")
            return
        second = await agent.recv(ws)
        first_two.append(second)
        if not (isinstance(second, dict) and second.get("event") == "start"):
            await ws.close(4400, "Expected start event")
            return
        missing = [k for k in ("streamSid", "callSid", "session", "accountSid") if k not in second["start"]]
        await ws.close(4400, f"Missing stream identifiers: {','.join(missing)}" if missing else "ok")

    async with agent_server(play) as (url, agent):
        report = await place_call(url, CallScript(handshake=variant, omit_start_fields=omit,  # type: ignore[arg-type]
                                                  max_duration_s=5))
        await asyncio.wait_for(agent.done.wait(), 5)

    assert report.closed_by == "agent" and report.close_code == 4400 and report.hung_up_by == "agent"
    expected = {
        "skip_connected": "Expected connected event",
        "malformed_start": "Expected start event",
        "normal": "Missing stream identifiers: session,accountSid",
        "no_start": "Expected start event",
    }[variant]
    assert report.close_reason == expected
    if variant == "skip_connected":
        assert first_two[0]["event"] == "start"
    if variant == "malformed_start":
        assert isinstance(first_two[1], str) and first_two[1].startswith('{"event": "start"')
    if variant == "no_start":
        assert first_two[1]["event"] == "media"


async def test_send_nothing_gets_the_servers_timeout() -> None:
    async def play(ws: ServerConnection, agent: Agent) -> None:
        try:
            await agent.recv(ws, timeout=0.3)
        except TimeoutError:
            await ws.close(4408, "Handshake timeout")

    async with agent_server(play) as (url, agent):
        report = await place_call(url, CallScript(handshake="nothing", max_duration_s=5))
    assert agent.messages == []
    assert (report.close_code, report.close_reason) == (4408, "Handshake timeout")
    assert report.frames_sent == 0 and report.first("connected_sent") is None


async def test_refused_websocket_is_reported() -> None:
    def refuse(conn: ServerConnection, request: Any) -> Response:
        return conn.respond(403, "Forbidden\n")

    async def play(ws: ServerConnection, agent: Agent) -> None:  # pragma: no cover - never reached
        await agent.recv(ws)

    async with agent_server(play, process_request=refuse) as (url, _agent):
        report = await place_call(url, CallScript(max_duration_s=2))
    assert report.error is not None and "HTTP 403" in report.error
    assert report.end_cause == "connect_failed" and report.hung_up_by is None
    assert "HTTP 403" in report.render()


async def test_multi_digit_dtmf_at_a_time_and_scripted_hangup() -> None:
    async def play(ws: ServerConnection, agent: Agent) -> None:
        while True:
            msg = await agent.recv(ws)
            if isinstance(msg, dict) and msg.get("event") == "stop":
                return

    script = CallScript(actions=[CallerAction.dtmf("12#", at_ms=100), CallerAction.hangup(at_ms=900)],
                        dtmf_gap_ms=200)
    async with agent_server(play) as (url, agent):
        t0 = time.monotonic()
        report = await place_call(url, script)
        await asyncio.wait_for(agent.done.wait(), 5)
    digits = agent.of("dtmf")
    assert [m["dtmf"]["digit"] for _, m in digits] == ["1", "2", "#"]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(digits)]
    assert all(0.17 <= g <= 0.4 for g in gaps), gaps
    assert report.hung_up_by == "caller" and time.monotonic() - t0 < 3
    assert report.dtmf_sent == ["1", "2", "#"]


def test_wav_loading_resamples_to_8k_mono(tmp_path: Path) -> None:
    path = tmp_path / "stereo16k.wav"
    mono = tone_pcm(500, 440, rate=16000)
    stereo = audioop.tostereo(mono, 2, 1, 1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(stereo)
    pcm = load_wav_8k(path)
    assert abs(len(pcm) - 8000) <= 4  # 500 ms at 8 kHz, 2 bytes per sample
    assert audioop.rms(pcm, 2) > 4000
    eight_bit = tmp_path / "u8.wav"
    with wave.open(str(eight_bit), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes([128]) * 800)  # unsigned silence
    assert load_wav_8k(eight_bit) == b"\x00\x00" * 800
    assert CallerAction.say(path).audio == pcm
    with pytest.raises(ValueError, match="DTMF"):
        CallerAction.dtmf("9x")


def test_redact_url_hides_agent_and_query() -> None:
    url = f"wss://example.test/api/v1/agent-stream/{AGENT_UUID}?provider=cloudonix&Domain=acme"
    assert redact_url(url) == "wss://example.test/api/v1/agent-stream/<redacted>"


async def test_close_is_noticed_when_the_close_frame_arrives() -> None:
    """A server that stops reading delays the TCP close by seconds; the call still ends at its close frame."""
    closed_at: list[float] = []

    async def play(ws: ServerConnection, agent: Agent) -> None:
        await agent.recv(ws)
        await agent.recv(ws)
        await asyncio.sleep(0.6)  # not reading: websockets' flow control stalls the closing handshake
        closed_at.append(time.monotonic())
        await ws.close(1000, "bye")

    async with agent_server(play, close_timeout=1) as (url, _agent):
        t0 = time.monotonic()
        report = await place_call(url, CallScript(max_duration_s=10))
        took = time.monotonic() - t0
    assert (report.close_code, report.close_reason, report.hung_up_by) == (1000, "bye", "agent")
    closed = report.first("closed")
    assert closed is not None and abs(closed.t_ms - (closed_at[0] - t0) * 1000) < 300
    assert abs(report.duration_ms - closed.t_ms) <= 1
    assert took < 3.5


async def test_cli_call_prints_a_json_report_without_the_url(tmp_path: Path) -> None:
    import os
    import sys

    async def play(ws: ServerConnection, agent: Agent) -> None:
        await agent.recv(ws)
        start = await agent.recv(ws)
        for m in media_messages(tone_pcm(200), start["streamSid"]):
            await ws.send(m)
        await agent.until(ws, "dtmf")
        await ws.close(1000, "done")

    exe = os.path.join(os.path.dirname(sys.executable), "voicebus-sim")
    async with agent_server(play) as (url, agent):
        proc = await asyncio.create_subprocess_exec(
            exe, "call", url, "--domain", "acme", "--dtmf", "7", "--silence-ms", "300", "--json",
            "--record", str(tmp_path / "cli.wav"), "--param", "k=v",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["dtmf_sent"] == ["7"] and report["close_code"] == 1000 and report["hung_up_by"] == "agent"
    assert report["wav_path"] == str(tmp_path / "cli.wav") and (tmp_path / "cli.wav").exists()
    assert AGENT_UUID not in out.decode() + err.decode()
    start = agent.messages[1][1]["start"]
    assert start["accountSid"] == "acme" and start["customParameters"] == {"k": "v"}
    # Bad usage is refused with a message, not a traceback.
    proc = await asyncio.create_subprocess_exec(exe, "call", "http://x", stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"ws://" in err
    proc = await asyncio.create_subprocess_exec(exe, "call", "ws://x", "--dtmf", "1x",
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"DTMF digits" in err


async def test_unexpected_messages_are_reported_and_the_call_goes_on() -> None:
    async def play(ws: ServerConnection, agent: Agent) -> None:
        await agent.recv(ws)
        start = await agent.recv(ws)
        sid = start["streamSid"]
        for junk in [b"\x00\x01", "not json", "[1, 2]", json.dumps({"event": "media", "streamSid": sid}),
                     json.dumps({"event": "media", "streamSid": sid, "media": {"payload": "%%%"}}),
                     json.dumps({"event": "mark", "streamSid": sid, "mark": "x"}),
                     json.dumps({"event": "dance", "streamSid": sid}),
                     json.dumps({"event": "clear", "streamSid": "MZother"})]:
            await ws.send(junk)
        await agent.until(ws, "stop")

    async with agent_server(play) as (url, agent):
        report = await place_call(url, CallScript(hangup_after_s=0.5))
        await asyncio.wait_for(agent.done.wait(), 5)
    whats = [e.detail["what"] for e in report.find("unexpected_message")]
    assert whats == ["binary frame of 2 bytes", "not JSON: 'not json'", "JSON that is not an object: '[1, 2]'",
                     "media without a payload", "media with a payload that is not base64", "event 'mark'",
                     "event 'dance'"]
    assert report.first("stream_sid_mismatch").detail == {"got": "MZother"}
    assert report.hung_up_by == "caller" and report.audio_bytes == 0 and agent.closed_code == 1000
