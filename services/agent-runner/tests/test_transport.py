"""The NATS transport with the real Piper TTS: 20 ms PCM frames, real-time pacing, clear, input frames."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import uuid

from nats.aio.client import Client as NATS
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterruptionFrame,
    TTSSpeakFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from voicebus.agent_runner.frames import PlaybackMarkerFrame, PlayedOutFrame
from voicebus.agent_runner.models import SharedModels
from voicebus.agent_runner.services import SharedPiperTTSService
from voicebus.agent_runner.transport import NatsCallTransport
from voicebus.bus.media import read_media_headers
from voicebus.bus.subjects import Subjects

from .conftest import FRAME_BYTES, RATE, FakeIngress, rms, wait_until


class Recorder(FrameProcessor):
    """Records what flows past it (both directions) and forwards everything."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Frame, FrameDirection]] = []
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        self.seen.append((frame, direction))
        self.changed.set()
        await self.push_frame(frame, direction)

    def of(self, cls: type) -> list[Frame]:
        return [f for f, _d in self.seen if isinstance(f, cls)]


async def run_pipeline(nc: NATS, subjects: Subjects, call_id: str, models: SharedModels,
                       ) -> tuple[NatsCallTransport, Recorder, PipelineWorker, asyncio.Task[None]]:
    transport = NatsCallTransport(nc=nc, subjects=subjects, call_id=call_id, sample_rate=RATE)
    recorder = Recorder()
    tts = SharedPiperTTSService(voice=models.piper_voice(), voice_id="en_US-joe-medium", sample_rate=RATE)
    worker = PipelineWorker(
        Pipeline([transport.input(), recorder, tts, transport.output()]),
        params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE),
        enable_rtvi=False, idle_timeout_secs=None, cancel_on_idle_timeout=False, enable_turn_tracking=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    return transport, recorder, worker, asyncio.create_task(runner.run())


async def test_tts_audio_is_paced_20ms_speech_frames(nc: NATS, subjects: Subjects, models: SharedModels) -> None:
    ing = FakeIngress(nc, subjects, call_id=uuid.uuid4().hex)
    await ing.listen()
    transport, recorder, worker, task = await run_pipeline(nc, subjects, ing.call_id, models)
    await worker.queue_frames([TTSSpeakFrame("Thank you for calling voicebus.", append_to_context=False),
                               PlaybackMarkerFrame(token=7), EndFrame()])
    await asyncio.wait_for(task, 20)

    frames = ing.frames
    assert len(frames) > 50  # well over a second of speech
    assert all(len(f.data) == FRAME_BYTES for f in frames)
    assert max(rms(f.data) for f in frames) > 1000  # speech, not silence
    # Sequence and timestamp headers count up.
    seqs = [read_media_headers(f.headers)[0] for f in frames]
    assert seqs == list(range(len(frames)))
    # Paced in real time: the whole utterance takes about as long to arrive as it lasts.
    duration = len(frames) * 0.02
    elapsed = frames[-1].at - frames[0].at
    assert duration - 0.1 <= elapsed + 0.02 <= duration + 0.3, (elapsed, duration)
    gaps = [b.at - a.at for a, b in itertools.pairwise(frames[10:])]
    assert 0.015 < statistics.mean(gaps) < 0.025
    # The marker came back upstream only after the audio before it was out.
    played = recorder.of(PlayedOutFrame)
    assert [f.token for f in played] == [7]
    assert transport.output().frames_sent == len(frames)


async def test_interruption_publishes_clear_and_stops_audio(nc: NATS, subjects: Subjects,
                                                            models: SharedModels) -> None:
    ing = FakeIngress(nc, subjects, call_id=uuid.uuid4().hex)
    await ing.listen()
    transport, _recorder, worker, task = await run_pipeline(nc, subjects, ing.call_id, models)
    text = "This is a long sentence that the caller is going to interrupt well before it has finished playing."
    await worker.queue_frame(TTSSpeakFrame(text, append_to_context=False))
    await ing.wait_frames(10)
    await worker.queue_frame(InterruptionFrame())
    clear = await ing.wait_event("clear", 5)
    assert clear.type == "clear"
    clear_at = ing.events[0][0]
    await worker.queue_frame(EndFrame())
    await asyncio.wait_for(task, 10)
    after = [f for f in ing.frames if f.at > clear_at + 0.1]
    assert len(after) <= 2, f"{len(after)} frames still arrived after the clear"
    assert len(ing.frames) < 150  # the sentence lasts far longer than what was played
    assert transport.output().clears_sent == 1


async def test_input_frames_from_the_bus(nc: NATS, subjects: Subjects, models: SharedModels) -> None:
    call_id = uuid.uuid4().hex
    transport, recorder, worker, task = await run_pipeline(nc, subjects, call_id, models)
    pcm = (1000).to_bytes(2, "little", signed=True) * 160
    for _ in range(5):
        transport.input().feed_audio(pcm)
    transport.input().feed_audio(b"\x01\x02\x03")  # odd length: not PCM16, dropped
    assert transport.input().feed_dtmf("5")
    assert not transport.input().feed_dtmf("x")
    await wait_until(lambda: len(recorder.of(InputAudioRawFrame)) >= 5 and bool(recorder.of(InputDTMFFrame)),
                     5, "input frames", recorder.changed)
    audio = recorder.of(InputAudioRawFrame)
    assert all(f.audio == pcm and f.sample_rate == RATE for f in audio)  # type: ignore[attr-defined]
    assert [f.button.value for f in recorder.of(InputDTMFFrame)] == ["5"]  # type: ignore[attr-defined]
    await worker.queue_frame(EndFrame())
    await asyncio.wait_for(task, 10)
