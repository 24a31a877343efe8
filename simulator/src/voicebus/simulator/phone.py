"""The phone at the carrier's end of a media stream, shared by every simulated carrier.

:class:`MediaCall` dials a WebSocket, sends the carrier's ``connected`` and ``start`` events
(Twilio Media Streams framing, which Twilio and Cloudonix both speak), then streams μ-law 8 kHz audio
in 20 ms frames **paced in real time** (silence, or caller speech from a WAV file), presses DTMF keys,
and hangs up with ``stop`` when the script says so. Everything the agent sends is played out on a
simulated phone speaker: audio is queued and consumed at 20 ms per frame, ``clear`` drops what is
still queued (barge-in), and ``mark`` is echoed back once the audio sent before it has been played, as
Twilio and Cloudonix do. What was played is recorded time-aligned (silence where nothing was heard),
so a WAV of the call sounds like what a caller would have heard.

Caller actions run one after another. Each waits for its trigger: a time (ms after ``start`` was sent)
or, by default, "after the agent stops speaking": some agent speech was heard since the previous
action and then none for ``agent_silence_ms``. That is how a person waits for a prompt to finish
before pressing a key, and it makes scripted calls independent of how fast the agent is.

What differs between carriers (how the socket is opened and signed, what ``start`` carries, what the
carrier's cloud does around the call) lives in each carrier's module, which subclasses
:class:`MediaCall` through its hooks: ``call.py`` (Cloudonix) and ``twilio/stream.py``.
"""

from __future__ import annotations

import asyncio
import audioop
import base64
import contextlib
import json
import time
import uuid
import wave
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from voicebus.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voicebus.telephony.dialects.twilio_media_carrier import (
    carrier_connected,
    carrier_dtmf,
    carrier_mark,
    carrier_media,
    carrier_stop,
)

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 160
ULAW_SILENCE = b"\xff" * FRAME_SAMPLES
CLOSE_TIMEOUT_S = 2.0
PCM_SILENCE = b"\x00\x00" * FRAME_SAMPLES

Handshake = Literal["normal", "skip_connected", "malformed_start", "no_start", "nothing"]
HungUpBy = Literal["agent", "caller"]
# End causes where the carrier ended the stream on voicebus's request (REST hangup, TwiML redirect).
CARRIER_ENDS = ("rest_hangup", "redirected")


class SimulatorError(Exception):
    """The call could not be set up (e.g. a carrier stand-in refused to register it)."""


# ---------------------------------------------------------------------------------------------- audio
def load_wav_8k(path: str | Path) -> bytes:
    """Read a PCM WAV of any rate, 1-2 channels, 8/16/24/32-bit, as PCM16LE 8 kHz mono."""
    with wave.open(str(path), "rb") as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        data = w.readframes(w.getnframes())
    if channels not in (1, 2):
        raise ValueError(f"{path}: {channels} channels; only mono or stereo WAV files are supported")
    if width == 1:
        data = audioop.bias(data, 1, -128)  # 8-bit WAV is unsigned
    if width != 2:
        data = audioop.lin2lin(data, width, 2)
    if channels == 2:
        data = audioop.tomono(data, 2, 0.5, 0.5)
    if rate != SAMPLE_RATE:
        data, _ = audioop.ratecv(data, 2, 1, rate, SAMPLE_RATE, None)
    return data


def write_wav_8k(path: str | Path, pcm: bytes) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm)


def redact_url(url: str) -> str:
    """Agent Stream URLs authorize a call by themselves: reports show where, never the whole URL.

    Query strings are dropped too (they may carry tokens); a per-call media path keeps its shape.
    """
    parts = urlsplit(url)
    path = parts.path
    marker = "/agent-stream/"
    if marker in path:
        path = path[: path.index(marker) + len(marker)] + "<redacted>"
    return f"{parts.scheme}://{parts.netloc}{path}"


# ---------------------------------------------------------------------------------------------- script
@dataclass
class CallerAction:
    """One thing the caller does. ``at_ms`` is after ``start`` was sent; None = when the agent is quiet."""

    kind: Literal["dtmf", "say", "hangup"]
    at_ms: int | None = None
    digits: str = ""
    audio: bytes = b""
    label: str = ""

    @classmethod
    def dtmf(cls, digits: str, at_ms: int | None = None) -> CallerAction:
        bad = [d for d in digits if d not in "0123456789*#ABCDabcd"]
        if not digits or bad:
            raise ValueError(f"DTMF digits must be 0-9, *, #, A-D; got {digits!r}")
        return cls("dtmf", at_ms, digits=digits.upper(), label=digits)

    @classmethod
    def say(cls, source: str | Path | bytes, at_ms: int | None = None) -> CallerAction:
        """Speak a WAV file (resampled to 8 kHz mono) or raw PCM16LE 8 kHz mono bytes."""
        if isinstance(source, bytes):
            audio, label = source, f"{len(source) // 16} ms of audio"
        else:
            audio, label = load_wav_8k(source), Path(source).name
        if len(audio) % 2:
            raise ValueError("PCM16 audio must have an even number of bytes")
        return cls("say", at_ms, audio=audio, label=label)

    @classmethod
    def hangup(cls, at_ms: int | None = None) -> CallerAction:
        return cls("hangup", at_ms, label="hangup")


def _sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


@dataclass
class PhoneScript:
    """What the person at the carrier's end does and hears, whichever carrier carries the call."""

    actions: list[CallerAction] = field(default_factory=list)
    hangup_after_s: float | None = None
    max_duration_s: float = 120.0
    agent_silence_ms: int = 700
    voice_rms: int = 200
    dtmf_gap_ms: int = 200
    record_path: str | Path | None = None
    open_timeout_s: float = 10.0


@dataclass(frozen=True)
class StreamIds:
    """The identifiers one media stream carries (``session`` is Cloudonix's; empty for Twilio)."""

    stream_sid: str
    call_sid: str
    account_sid: str
    session: str = ""


async def poll_until_over(url: str, done: asyncio.Event,
                          over: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """Long-poll a carrier stand-in's view of a call (``?wait_ended=30``) until ``over`` says it has ended.

    Returns that last view; None when the stream ended first (``done``) or the stand-in went away, since
    either way there is nothing more to learn. Both carrier clouds end a stream this way after a REST hangup.
    """
    async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(40.0)) as http:
        while not done.is_set():
            try:
                resp = await http.get(url, params={"wait_ended": 30})
            except httpx.HTTPError:
                return None
            if resp.status_code != 200:
                return None
            body: dict[str, Any] = resp.json()
            if over(body):
                return body
    return None


# ---------------------------------------------------------------------------------------------- report
@dataclass
class TimelineEvent:
    t_ms: int
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class CallReport:
    target: str
    stream_sid: str
    call_sid: str
    session: str
    events: list[TimelineEvent] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    closed_by: Literal["agent", "caller"] | None = None
    hung_up_by: HungUpBy | None = None
    end_cause: str = ""
    duration_ms: int = 0
    first_agent_audio_ms: int | None = None
    audio_bytes: int = 0
    frames_sent: int = 0
    dtmf_sent: list[str] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)
    clears: int = 0
    wav_path: str | None = None
    error: str | None = None
    recording: bytes = field(default=b"", repr=False)

    def find(self, kind: str) -> list[TimelineEvent]:
        return [e for e in self.events if e.kind == kind]

    def first(self, kind: str) -> TimelineEvent | None:
        found = self.find(kind)
        return found[0] if found else None

    @property
    def recording_ms(self) -> int:
        return len(self.recording) // 16

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("recording", "events")}
        d["events"] = [{"t_ms": e.t_ms, "kind": e.kind, **({"detail": e.detail} if e.detail else {})}
                       for e in self.events]
        d["recording_ms"] = self.recording_ms
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        ids = f"  session {self.session}  " if self.session else "  "
        lines = [f"call to {self.target}", f"{ids}stream {self.stream_sid}  call {self.call_sid}"]
        for e in self.events:
            lines.append(f"  {e.t_ms:>7} ms  {_describe(e)}")
        lines.append("")
        if self.error:
            lines.append(f"error: {self.error}")
        if self.first_agent_audio_ms is not None:
            lines.append(f"first agent audio {self.first_agent_audio_ms} ms after start")
        else:
            lines.append("no agent audio received")
        who = {"agent": "the agent", "caller": "the caller"}.get(self.hung_up_by or "", "nobody")
        lines.append(f"hung up by {who} ({self.end_cause})")
        if self.close_code is not None:
            lines.append(f"close code {self.close_code} reason {self.close_reason!r} (closed by {self.closed_by})")
        lines.append(f"duration {self.duration_ms} ms; sent {self.frames_sent} frames; "
                     f"received {self.audio_bytes} bytes of agent audio; {self.clears} clear; "
                     f"marks {self.marks}; DTMF {''.join(self.dtmf_sent) or '-'}")
        if self.wav_path:
            lines.append(f"recording: {self.wav_path} ({self.recording_ms} ms)")
        return "\n".join(lines)


def _describe(e: TimelineEvent) -> str:
    d = e.detail
    text = {
        "ws_open": "WebSocket open",
        "connected_sent": "connected sent",
        "start_sent": "start sent",
        "first_agent_audio": f"first agent audio ({d.get('after_start_ms')} ms after start)",
        "agent_speaking": "agent speaking",
        "agent_quiet": f"agent quiet for {d.get('silence_ms')} ms",
        "dtmf_sent": f"DTMF {d.get('digit')} sent",
        "say_start": f"caller speaks: {d.get('label')}",
        "say_end": "caller stops speaking",
        "clear_received": f"clear received{' (barge-in)' if d.get('barge_in') else ''}, "
                          f"{d.get('dropped_ms')} ms of queued audio dropped",
        "mark_received": f"mark {d.get('name')!r} received",
        "mark_played": f"mark {d.get('name')!r} played, echoed",
        "stop_sent": "stop sent (caller hung up)",
        "rest_hangup": "the carrier ended the call (REST hangup)",
        "redirected": "the carrier ended the stream (the call was redirected to new TwiML)",
        "closed": f"closed by {d.get('by')}: code {d.get('code')} reason {d.get('reason')!r}",
        "unexpected_message": f"unexpected message: {d.get('what')}",
        "stream_sid_mismatch": f"agent used streamSid {d.get('got')!r}",
    }.get(e.kind)
    return text if text is not None else f"{e.kind} {d}" if d else e.kind


# ---------------------------------------------------------------------------------------------- the call
class MediaCall:
    """One media stream from the carrier's side. Carriers subclass it through the hooks below.

    ``start`` is the ``start`` event as a dict (the carrier's fields); ``headers`` go on the upgrade
    request (Twilio signs it); ``handshake`` varies the opening for negative tests of the endpoint.
    """

    def __init__(self, url: str, script: PhoneScript, ids: StreamIds, start: dict[str, Any], *,
                 headers: dict[str, str] | None = None, handshake: Handshake = "normal",
                 omitted: tuple[str, ...] = (), on_event: Callable[[TimelineEvent], None] | None = None) -> None:
        self.url = url
        self.s = script
        self.ids = ids
        self.start = start
        self.headers = dict(headers or {})
        self.handshake_mode = handshake
        self.omitted = omitted  # start fields left out on purpose, for the timeline
        self.on_event = on_event
        self.report = CallReport(redact_url(url), ids.stream_sid, ids.call_sid, ids.session)
        self.t0 = time.monotonic()
        self.t_start: float | None = None
        self.ws: ClientConnection | None = None
        self.seq = 0
        self.chunk = 0
        self.done = asyncio.Event()
        self.end_cause = ""
        self.ended_at: float | None = None
        # speaker: queued agent μ-law audio, marks at byte positions
        self.queue = bytearray()
        self.queued_total = 0
        self.played_total = 0
        self.pending_marks: list[tuple[int, str]] = []
        self.recording = bytearray()
        # caller state
        self.action_index = 0
        self.action_started = False
        self.say_buf = b""
        self.last_say_at = -1e9
        self.dtmf_left = ""
        self.next_dtmf_tick = 0
        self.heard_since_action = False
        self.speaking = False
        self.silence_ms = 0
        self.caller_hangup_requested = False

    # -- bookkeeping
    def now_ms(self) -> int:
        return int((time.monotonic() - self.t0) * 1000)

    def since_start_ms(self) -> int:
        return int((time.monotonic() - (self.t_start or self.t0)) * 1000)

    def event(self, kind: str, **detail: Any) -> None:
        e = TimelineEvent(self.now_ms(), kind, detail)
        self.report.events.append(e)
        if self.on_event:
            self.on_event(e)

    def finish(self, cause: str) -> None:
        if not self.done.is_set():
            self.end_cause = cause
            self.ended_at = time.monotonic()
            self.done.set()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def send(self, frame: str) -> None:
        assert self.ws is not None
        await self.ws.send(frame)

    # -- hooks for a carrier's cloud around the stream
    async def before_connect(self) -> None:
        """Runs before dialing; raise :class:`SimulatorError` to give up the call."""

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Coroutines that run while the call lasts (e.g. watching for a REST hangup)."""
        return []

    async def on_started(self) -> None:
        """``start`` has been sent."""

    async def on_ending(self) -> None:
        """The carrier side is about to send ``stop`` (caller hangup, time limit, REST hangup)."""

    def carrier_hangup(self, cause: str = "rest_hangup") -> None:
        """The carrier's cloud ends the stream (REST hangup, redirect): ``stop`` and close follow."""
        if not self.done.is_set():
            self.event(cause)
            self.finish(cause)

    # -- the whole call
    async def run(self) -> CallReport:
        s = self.s
        await self.before_connect()
        try:
            self.ws = await connect(self.url, proxy=None, open_timeout=s.open_timeout_s, compression=None,
                                    max_size=2**22, close_timeout=CLOSE_TIMEOUT_S,
                                    additional_headers=self.headers or None)
        except InvalidStatus as e:
            return self._failed(f"the server refused the WebSocket: HTTP {e.response.status_code}")
        except (InvalidHandshake, OSError, TimeoutError) as e:
            return self._failed(f"could not connect: {type(e).__name__}: {e}")
        self.t0 = time.monotonic()
        self.event("ws_open")
        tasks = [asyncio.create_task(self.receive())]
        try:
            await self.handshake()
            tasks.append(asyncio.create_task(self.tick_loop()))
            tasks.extend(asyncio.create_task(c) for c in self.background())
            if self.handshake_mode != "nothing" and not self.done.is_set():
                await self.on_started()
            await self.done.wait()
            if self.end_cause in ("caller_hangup", "max_duration", *CARRIER_ENDS):
                await self.hang_up_from_carrier_side()
        except ConnectionClosed:
            self.finish("server_closed")
        finally:
            for t in tasks[1:]:
                t.cancel()
            # The close frames have been exchanged (or the peer is gone); the TCP close is the server's
            # job. Don't let a server that never closes its side stretch the call.
            try:
                await asyncio.wait_for(self.ws.wait_closed(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                self.ws.transport.abort()
            tasks[0].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self._finalize()

    def _failed(self, error: str) -> CallReport:
        self.report.error = error
        self.report.end_cause = "connect_failed"
        self.event("connect_failed", error=error)
        return self.report

    async def handshake(self) -> None:
        mode = self.handshake_mode
        if mode == "nothing":
            return
        if mode != "skip_connected":
            await self.send(carrier_connected())
            self.event("connected_sent")
        if mode == "no_start":
            pass
        elif mode == "malformed_start":
            assert self.ws is not None
            await self.ws.send('{"event": "start", "start": {"streamSid": ')  # truncated JSON
            self.seq += 1
            self.event("start_sent", malformed=True)
        else:
            await self.send(json.dumps(self.start))
            self.seq = 1
            self.event("start_sent", **({"omitted": list(self.omitted)} if self.omitted else {}))
        self.t_start = time.monotonic()

    async def hang_up_from_carrier_side(self) -> None:
        """The call ends on the carrier side: send ``stop`` and close, as Twilio and Cloudonix do."""
        assert self.ws is not None
        rest = self.end_cause in CARRIER_ENDS
        await self.on_ending()
        with contextlib.suppress(ConnectionClosed):
            if self.handshake_mode != "nothing":
                await self.send(carrier_stop(self.ids.stream_sid, self.ids.call_sid, self.ids.account_sid,
                                             self.next_seq()))
                self.event("stop_sent")
            self.ended_at = time.monotonic()  # the call is over for the caller once stop is out
            await self.ws.close(1000, "call ended" if rest else "caller hung up")

    # -- receiving: agent audio goes to the speaker queue; clear and marks act on it
    async def receive(self) -> None:
        assert self.ws is not None
        try:
            while True:
                raw = await self.ws.recv()
                if isinstance(raw, bytes):
                    self.event("unexpected_message", what=f"binary frame of {len(raw)} bytes")
                    continue
                try:
                    msg = json.loads(raw)
                except ValueError:
                    self.event("unexpected_message", what=f"not JSON: {raw[:60]!r}")
                    continue
                if not isinstance(msg, dict):
                    self.event("unexpected_message", what=f"JSON that is not an object: {raw[:60]!r}")
                    continue
                kind = msg.get("event")
                if msg.get("streamSid") not in (None, self.ids.stream_sid) and not self.report.find(
                        "stream_sid_mismatch"):
                    self.event("stream_sid_mismatch", got=msg.get("streamSid"))
                if kind == "media":
                    self.on_media(msg)
                elif kind == "clear":
                    self.on_clear()
                elif kind == "mark" and isinstance(msg.get("mark"), dict):
                    name = str(msg["mark"].get("name", ""))
                    self.pending_marks.append((self.queued_total, name))
                    self.report.marks.append(name)
                    self.event("mark_received", name=name)
                else:
                    self.event("unexpected_message", what=f"event {kind!r}")
        except ConnectionClosed:
            pass
        finally:
            self.finish("server_closed")

    def on_media(self, msg: dict[str, Any]) -> None:
        media = msg.get("media")
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            self.event("unexpected_message", what="media without a payload")
            return
        try:
            payload = base64.b64decode(media["payload"], validate=True)
        except ValueError:
            self.event("unexpected_message", what="media with a payload that is not base64")
            return
        if not payload:
            return
        if self.report.first_agent_audio_ms is None:
            self.report.first_agent_audio_ms = self.since_start_ms()
            self.event("first_agent_audio", after_start_ms=self.report.first_agent_audio_ms)
        self.report.audio_bytes += len(payload)
        self.queue.extend(payload)
        self.queued_total += len(payload)

    def on_clear(self) -> None:
        dropped = len(self.queue)
        self.queue.clear()
        self.played_total = self.queued_total
        self.report.clears += 1
        barge_in = bool(self.say_buf) or time.monotonic() - self.last_say_at < 1.0
        self.event("clear_received", dropped_ms=dropped // 8, barge_in=barge_in)

    # -- the 20 ms clock: send one caller frame, play one agent frame, run the script
    async def tick_loop(self) -> None:
        start = self.t_start or time.monotonic()
        n = 0
        while not self.done.is_set():
            delay = start + n * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.done.wait(), delay)
                if self.done.is_set():
                    return
            elif delay < -1.0:  # the loop stalled for a second: restart the clock rather than burst
                start, n = time.monotonic(), 0
            try:
                await self.tick(n)
            except ConnectionClosed:
                self.finish("server_closed")
                return
            n += 1

    async def tick(self, n: int) -> None:
        s = self.s
        assert self.ws is not None
        if self.ws.protocol.close_rcvd is not None:
            # Noticed on the 20 ms clock: websockets only raises once the TCP connection is gone,
            # which a slow server can delay by seconds, but the call ended with the close frame.
            self.finish("server_closed")
            return
        elapsed = n * FRAME_MS
        await self.play_frame()
        await self.run_script(n)
        if self.caller_hangup_requested:
            self.finish("caller_hangup")
            return
        if s.hangup_after_s is not None and elapsed >= s.hangup_after_s * 1000:
            self.finish("caller_hangup")
            return
        if elapsed >= s.max_duration_s * 1000:
            self.finish("max_duration")
            return
        if self.handshake_mode != "nothing":
            await self.send_frame()

    async def play_frame(self) -> None:
        chunk = bytes(self.queue[:FRAME_SAMPLES])
        del self.queue[:FRAME_SAMPLES]
        self.played_total += len(chunk)
        pcm = ulaw_to_pcm16(chunk) + PCM_SILENCE[len(chunk) * 2:]
        self.recording.extend(pcm)
        voiced = bool(chunk) and audioop.rms(pcm, 2) >= self.s.voice_rms
        if voiced:
            self.heard_since_action = True
            if not self.speaking:
                self.speaking = True
                self.event("agent_speaking")
            self.silence_ms = 0
        else:
            self.silence_ms += FRAME_MS
            if self.speaking and self.silence_ms >= self.s.agent_silence_ms:
                self.speaking = False
                self.event("agent_quiet", silence_ms=self.silence_ms)
        while self.pending_marks and self.pending_marks[0][0] <= self.played_total:
            _, name = self.pending_marks.pop(0)
            await self.send(carrier_mark(self.ids.stream_sid, name, self.next_seq()))
            self.event("mark_played", name=name)

    async def send_frame(self) -> None:
        if self.say_buf:
            pcm, self.say_buf = self.say_buf[: FRAME_SAMPLES * 2], self.say_buf[FRAME_SAMPLES * 2:]
            self.last_say_at = time.monotonic()
            payload = pcm16_to_ulaw(pcm + PCM_SILENCE[len(pcm):])
            if not self.say_buf:
                self.event("say_end")
                self.action_done()
        else:
            payload = ULAW_SILENCE
        self.chunk += 1
        await self.send(carrier_media(self.ids.stream_sid, payload, self.next_seq(), (self.chunk - 1) * FRAME_MS,
                                      chunk=self.chunk))
        self.report.frames_sent += 1

    def action_done(self) -> None:
        self.action_index += 1
        self.action_started = False
        self.heard_since_action = False

    def triggered(self, action: CallerAction, elapsed_ms: int) -> bool:
        if action.at_ms is not None:
            return elapsed_ms >= action.at_ms
        return self.heard_since_action and not self.speaking and self.silence_ms >= self.s.agent_silence_ms

    async def run_script(self, n: int) -> None:
        if self.action_index >= len(self.s.actions):
            return
        action = self.s.actions[self.action_index]
        if not self.action_started:
            if not self.triggered(action, n * FRAME_MS):
                return
            self.action_started = True
            if action.kind == "hangup":
                self.caller_hangup_requested = True
                self.action_done()
                return
            if action.kind == "say":
                self.say_buf = action.audio
                self.event("say_start", label=action.label)
                if not self.say_buf:
                    self.action_done()
                return
            self.dtmf_left, self.next_dtmf_tick = action.digits, n
        if action.kind == "dtmf" and n >= self.next_dtmf_tick and self.dtmf_left:
            digit, self.dtmf_left = self.dtmf_left[0], self.dtmf_left[1:]
            await self.send(carrier_dtmf(self.ids.stream_sid, digit, self.next_seq()))
            self.report.dtmf_sent.append(digit)
            self.event("dtmf_sent", digit=digit)
            self.next_dtmf_tick = n + max(1, self.s.dtmf_gap_ms // FRAME_MS)
            if not self.dtmf_left:
                self.action_done()

    def _finalize(self) -> CallReport:
        r = self.report
        ws = self.ws
        r.end_cause = self.end_cause
        if ws is not None:
            p = ws.protocol
            if p.close_rcvd is not None and (p.close_sent is None or p.close_rcvd_then_sent):
                r.closed_by, r.close_code, r.close_reason = "agent", p.close_rcvd.code, p.close_rcvd.reason
            elif p.close_sent is not None:
                r.closed_by, r.close_code, r.close_reason = "caller", p.close_sent.code, p.close_sent.reason
            else:
                r.closed_by, r.close_code, r.close_reason = "agent", 1006, "connection lost"
            closed_ms = int(((self.ended_at or time.monotonic()) - self.t0) * 1000)
            r.events.append(TimelineEvent(closed_ms, "closed",
                                          {"by": r.closed_by, "code": r.close_code, "reason": r.close_reason}))
            if self.on_event:
                self.on_event(r.events[-1])
        if self.end_cause in ("caller_hangup", "max_duration"):
            r.hung_up_by = "caller"
        elif self.end_cause in ("server_closed", *CARRIER_ENDS):
            r.hung_up_by = "agent"
        r.duration_ms = int(((self.ended_at or time.monotonic()) - self.t0) * 1000)
        r.recording = bytes(self.recording)
        if self.s.record_path:
            write_wav_8k(self.s.record_path, r.recording)
            r.wav_path = str(self.s.record_path)
        return r


