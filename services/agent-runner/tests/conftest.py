"""Fixtures for the runner's tests: real NATS, an in-process runner, and the test playing ingress.

Nothing here mocks NATS or pipecat. ``FakeIngress`` does what ingress does on the bus for one call
(offer, paced media.in, DTMF/hangup on event.in, collecting media.out, event.out and heartbeats) and
``FakeCallControl`` carries out hangup intents (and answers ``ctl.hangup``) the way call-control would,
recording what it was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import numpy as np
import pytest
import soxr
from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg

from voicebus.agent_runner.models import SharedModels
from voicebus.agent_runner.runner import Runner
from voicebus.agent_runner.settings import RunnerSettings
from voicebus.bus.agent import AgentDefinition
from voicebus.bus.intents import INTENTS_CONSUMER, ensure_intents_stream
from voicebus.bus.messages import (
    CallerHangupEvent,
    CallOffer,
    DtmfEvent,
    HangupRequest,
    HangupResult,
    Heartbeat,
    MediaFormat,
    OfferAccepted,
    ResolvedAgent,
    event_out_adapter,
)
from voicebus.bus.rpc import request, serve
from voicebus.bus.subjects import CTL_HANGUP, Subjects

logger.remove()
logger.add(sys.stderr, level="WARNING")

RATE = 8000
FRAME_BYTES = RATE * 20 // 1000 * 2  # 320


def rms(pcm: bytes) -> float:
    n = len(pcm) // 2
    if n == 0:
        return 0.0
    samples = struct.unpack(f"<{n}h", pcm[: n * 2])
    return math.sqrt(sum(s * s for s in samples) / n)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
                     changed: asyncio.Event | None = None) -> None:
    """Wait for ``predicate`` to hold, waking on ``changed`` (set by whoever changes the state)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        if changed is None:
            await asyncio.sleep(min(0.02, remaining))
            continue
        changed.clear()
        if predicate():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), remaining)


@dataclass
class OutFrame:
    at: float
    data: bytes
    headers: dict[str, str]


@dataclass
class FakeIngress:
    """Plays ingress on the bus for one call."""

    nc: NATS
    subjects: Subjects
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    frames: list[OutFrame] = field(default_factory=list)
    events: list[tuple[float, Any]] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _speech: bytearray = field(default_factory=bytearray)
    _subs: list[Any] = field(default_factory=list)
    _feeder: asyncio.Task[None] | None = None
    media_sent: int = 0

    async def listen(self) -> None:
        s = self.subjects
        self._subs.append(await self.nc.subscribe(s.media_out(self.call_id), cb=self._on_media))
        self._subs.append(await self.nc.subscribe(s.event_out(self.call_id), cb=self._on_event))
        self._subs.append(await self.nc.subscribe(s.heartbeat(self.call_id), cb=self._on_hb))
        await self.nc.flush()

    async def _on_media(self, msg: NatsMsg) -> None:
        self.frames.append(OutFrame(time.monotonic(), msg.data, dict(msg.headers or {})))
        self.changed.set()

    async def _on_event(self, msg: NatsMsg) -> None:
        self.events.append((time.monotonic(), event_out_adapter.validate_json(msg.data)))
        self.changed.set()

    async def _on_hb(self, msg: NatsMsg) -> None:
        self.heartbeats.append(Heartbeat.model_validate_json(msg.data))
        self.changed.set()

    def offer_for(self, definition: AgentDefinition, **overrides: Any) -> CallOffer:
        fields: dict[str, Any] = dict(
            call_id=self.call_id, run_id=42, organization_id=7, provider="cloudonix",
            agent=ResolvedAgent(agent_uuid=str(uuid.uuid4()), organization_id=7, name="test agent", version=1,
                                definition_source="published", definition=definition),
            media=MediaFormat(sample_rate=RATE),
        )
        fields.update(overrides)
        return CallOffer(**fields)

    async def offer(self, definition: AgentDefinition, *, feed: bool = True, timeout: float = 5.0,
                    **overrides: Any) -> OfferAccepted:
        await self.listen()
        accepted = await request(self.nc, self.subjects.dispatch_offer, self.offer_for(definition, **overrides),
                                 OfferAccepted, timeout=timeout)
        if feed:
            self.start_media()
        return accepted

    # ---- media.in: 20 ms frames paced like a carrier (silence unless speech is queued) ----
    def start_media(self) -> None:
        if self._feeder is None:
            self._feeder = asyncio.create_task(self._feed(), name=f"feed-{self.call_id}")

    def say(self, pcm: bytes) -> None:
        self._speech.extend(pcm)

    async def stop_media(self) -> None:
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
            self._feeder = None

    async def _feed(self) -> None:
        subject = self.subjects.media_in(self.call_id)
        start = time.monotonic()
        n = 0
        while True:
            if self._speech:
                chunk = bytes(self._speech[:FRAME_BYTES]).ljust(FRAME_BYTES, b"\0")
                del self._speech[:FRAME_BYTES]
            else:
                chunk = bytes(FRAME_BYTES)
            try:
                await self.nc.publish(subject, chunk, headers={"vb-seq": str(n), "vb-ts": str(n * 20)})
            except nats.errors.ConnectionClosedError:
                return  # the test is over and its connection closed under us
            n += 1
            self.media_sent = n
            await asyncio.sleep(max(0.0, start + n * 0.02 - time.monotonic()))

    async def dtmf(self, digit: str) -> None:
        await self.nc.publish(self.subjects.event_in(self.call_id), DtmfEvent(digit=digit).encode())

    async def caller_hangup(self) -> None:
        await self.nc.publish(self.subjects.event_in(self.call_id), CallerHangupEvent().encode())

    # ---- observations ----
    def events_of(self, kind: str) -> list[Any]:
        return [e for _t, e in self.events if e.type == kind]

    async def wait_event(self, kind: str, timeout: float = 10.0) -> Any:
        await wait_until(lambda: bool(self.events_of(kind)), timeout, f"a {kind!r} event", self.changed)
        return self.events_of(kind)[0]

    async def wait_frames(self, n: int, timeout: float = 10.0) -> None:
        await wait_until(lambda: len(self.frames) >= n, timeout, f"{n} media.out frames", self.changed)

    async def wait_quiet(self, quiet_s: float = 0.4, timeout: float = 20.0, *, after: int = 0) -> None:
        """Wait until agent audio beyond the first ``after`` frames was heard, then none for ``quiet_s``."""
        await self.wait_frames(after + 1, timeout)
        deadline = time.monotonic() + timeout
        while True:
            silent_for = time.monotonic() - self.frames[-1].at
            if silent_for >= quiet_s:
                return
            if time.monotonic() > deadline:
                raise AssertionError("the agent never stopped speaking")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), quiet_s - silent_for)

    async def close(self) -> None:
        await self.stop_media()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


@dataclass
class FakeCallControl:
    """Consumes the durable hangup intents (call-control's consumer) and answers ``ctl.hangup``, as
    call-control would without a carrier, recording each request; an intent is acked once recorded."""

    nc: NATS
    subjects: Subjects
    requests: list[HangupRequest] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    before_answer: Callable[[HangupRequest], Awaitable[None]] | None = None
    _sub: Any = None
    _intents: Any = None

    async def start(self) -> FakeCallControl:
        js = self.nc.jetstream()
        await ensure_intents_stream(js, self.subjects)
        self._intents = await js.subscribe(self.subjects.intent_all, durable=INTENTS_CONSUMER,
                                           stream=self.subjects.intents_stream, cb=self._on_intent, manual_ack=True)
        self._sub = await serve(self.nc, self.subjects.ctl(CTL_HANGUP), HangupRequest, self._on_hangup)
        await self.nc.flush()
        return self

    async def _on_intent(self, msg: NatsMsg) -> None:
        await self._on_hangup(HangupRequest.model_validate_json(msg.data))
        await msg.ack()

    async def _on_hangup(self, req: HangupRequest) -> HangupResult:
        self.requests.append(req)
        self.changed.set()
        if self.before_answer is not None:
            await self.before_answer(req)
        return HangupResult(outcome="hung_up", status=204)

    def for_call(self, call_id: str) -> list[HangupRequest]:
        return [r for r in self.requests if r.call_id == call_id]

    async def wait_hangup(self, call_id: str, timeout: float = 15.0) -> HangupRequest:
        await wait_until(lambda: bool(self.for_call(call_id)), timeout, "a hangup request", self.changed)
        return self.for_call(call_id)[0]

    async def stop(self) -> None:
        for sub in (self._sub, self._intents):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
async def models() -> SharedModels:
    shared = SharedModels()
    await asyncio.to_thread(shared.warm)
    return shared


@pytest.fixture(scope="session")
async def speech_pcm(models: SharedModels) -> bytes:
    """Real caller speech at 8 kHz, spoken by the Piper voice itself (no recordings in the repo)."""
    voice = models.piper_voice()
    text = "Hello there. I would like to speak to somebody about my account, please."

    def synth() -> bytes:
        pcm = b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(text))
        samples = np.frombuffer(pcm, dtype=np.int16)
        resampled = soxr.resample(samples, voice.config.sample_rate, RATE)
        return np.asarray(resampled, dtype=np.int16).tobytes()

    return await asyncio.to_thread(synth)


@pytest.fixture
def subjects(subject_prefix: str) -> Subjects:
    return Subjects(prefix=subject_prefix)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def call_control(nc: NATS, subjects: Subjects) -> AsyncIterator[FakeCallControl]:
    cc = await FakeCallControl(nc, subjects).start()
    try:
        yield cc
    finally:
        await cc.stop()


RunnerFactory = Callable[..., Awaitable[Runner]]
IngressFactory = Callable[[], FakeIngress]


@pytest.fixture
async def jetstream_cleanup(nc: NATS, subject_prefix: str) -> AsyncIterator[None]:
    """Leave no per-test events stream or checkpoint bucket behind on the shared NATS server."""
    yield
    subjects = Subjects(prefix=subject_prefix)
    js = nc.jetstream()
    for stream in (subjects.events_stream, subjects.intents_stream):
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
    with contextlib.suppress(Exception):
        await js.delete_key_value(subjects.checkpoint_bucket)
    with contextlib.suppress(Exception):
        await js.delete_key_value(subjects.claims_bucket)


@pytest.fixture
async def make_runner(nats_url: str, subject_prefix: str, models: SharedModels,
                      jetstream_cleanup: None) -> AsyncIterator[RunnerFactory]:
    runners: list[Runner] = []

    async def factory(**overrides: Any) -> Runner:
        fields: dict[str, Any] = dict(nats_url=nats_url, subject_prefix=subject_prefix, capacity=2,
                                      warm_models=False, media_timeout_s=5.0)
        fields.update(overrides)
        runner = Runner(RunnerSettings(**fields), models=models)
        await runner.start()
        runners.append(runner)
        return runner

    try:
        yield factory
    finally:
        for runner in runners:
            await runner.stop(drain_timeout_s=0)


@pytest.fixture
async def ingress(nc: NATS, subjects: Subjects) -> AsyncIterator[IngressFactory]:
    made: list[FakeIngress] = []

    def factory() -> FakeIngress:
        ing = FakeIngress(nc, subjects)
        made.append(ing)
        return ing

    try:
        yield factory
    finally:
        for ing in made:
            await ing.close()
