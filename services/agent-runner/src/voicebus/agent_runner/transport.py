"""A pipecat transport whose input and output are a call's NATS subjects ("option A" in pipecat.md).

Input: the call session feeds raw PCM16LE frames from ``media.in`` and DTMF digits from ``event.in``
into :class:`NatsInputTransport`, which turns them into pipecat frames. Output: audio reaching
:class:`NatsOutputTransport` is cut into 20 ms PCM16LE frames at the call's rate and published on
``media.out``, **paced in real time here** (sleep to a monotonic clock with about one frame of lead,
exactly like pipecat's websocket transports). Pacing on the runner keeps ``clear`` meaningful: ingress
forwards at once, so the carrier never holds more than ~one frame that a barge-in could not take back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.client import Client as NATS
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from voicebus.agent_runner.frames import PlaybackMarkerFrame, PlayedOutFrame
from voicebus.bus.media import media_headers, sender_headers
from voicebus.bus.messages import ClearEvent
from voicebus.bus.subjects import Subjects

log = logging.getLogger("voicebus.agent_runner.transport")

# Inbound items waiting for the pipeline (it starts a little after the offer is accepted). 250 frames
# of 20 ms is 5 s; beyond that the oldest audio is dropped, which is what a late listener wants.
INBOX_MAX = 250


def transport_params(sample_rate: int) -> TransportParams:
    """Telephony params: the call's rate both ways, 20 ms output chunks, no trailing 2 s of silence.

    ``audio_out_end_silence_secs`` is pipecat's guard against a socket closing under the last words; here
    the session waits for the paced clock to reach the end of the audio instead, so silence would only
    delay the hangup.
    """
    return TransportParams(
        audio_in_enabled=True,
        audio_in_sample_rate=sample_rate,
        audio_out_enabled=True,
        audio_out_sample_rate=sample_rate,
        audio_out_10ms_chunks=2,
        audio_out_end_silence_secs=0,
    )


class NatsInputTransport(BaseInputTransport):
    def __init__(self, params: TransportParams, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._vb_inbox: asyncio.Queue[bytes | KeypadEntry] = asyncio.Queue(maxsize=INBOX_MAX)
        self._vb_rx_task: asyncio.Task[None] | None = None
        self._vb_odd_warned = False

    # -- fed by the call session from its NATS subscriptions (never blocks the NATS reader) --
    def feed_audio(self, pcm: bytes) -> None:
        if len(pcm) % 2:
            if not self._vb_odd_warned:
                log.warning("dropping media.in payloads with an odd byte count (%d); PCM16 needs whole samples",
                            len(pcm))
                self._vb_odd_warned = True
            return
        self._vb_put(pcm)

    def feed_dtmf(self, digit: str) -> bool:
        try:
            key = KeypadEntry(digit)
        except ValueError:
            log.warning("ignoring DTMF digit %r: not one of 0-9, * or #", digit[:8])
            return False
        self._vb_put(key)
        return True

    def _vb_put(self, item: bytes | KeypadEntry) -> None:
        while True:
            try:
                self._vb_inbox.put_nowait(item)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._vb_inbox.get_nowait()

    # -- pipecat lifecycle --
    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)
        if self._vb_rx_task is None:
            self._vb_rx_task = self.create_task(self._vb_receive(), "nats_input_receive")

    async def stop(self, frame: EndFrame) -> None:
        await self._vb_stop_rx()
        await super().stop(frame)

    async def cancel(self, frame: CancelFrame) -> None:
        await self._vb_stop_rx()
        await super().cancel(frame)

    async def cleanup(self) -> None:
        await self._vb_stop_rx()
        await super().cleanup()

    async def _vb_stop_rx(self) -> None:
        if self._vb_rx_task is not None:
            task, self._vb_rx_task = self._vb_rx_task, None
            await self.cancel_task(task)

    async def _vb_receive(self) -> None:
        while True:
            item = await self._vb_inbox.get()
            if isinstance(item, KeypadEntry):
                await self.push_frame(InputDTMFFrame(button=item))
            else:
                await self.push_audio_frame(
                    InputAudioRawFrame(audio=item, sample_rate=self.sample_rate, num_channels=1))


class NatsOutputTransport(BaseOutputTransport):
    def __init__(self, params: TransportParams, *, nc: NATS, subjects: Subjects, call_id: str,
                 sender: str | None = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._vb_nc = nc
        self._vb_sender = sender
        self._vb_media_subject = subjects.media_out(call_id)
        self._vb_event_subject = subjects.event_out(call_id)
        self._vb_frame_bytes = 0
        self._vb_interval = 0.0
        self._vb_next_send = 0.0
        self._vb_t0: float | None = None
        self._vb_seq = 0
        self.frames_sent = 0
        self.clears_sent = 0

    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        # audio_out_10ms_chunks=2 makes pipecat's chunk exactly one 20 ms bus frame.
        self._vb_frame_bytes = self.audio_chunk_size
        self._vb_interval = self._vb_frame_bytes / (self.sample_rate * 2)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)  # drains queued audio, paced
        await self.wait_played_out()

    async def wait_played_out(self) -> None:
        """Return once the paced clock has passed the end of the last frame published."""
        delay = self._vb_next_send - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            self._vb_next_send = 0.0
            self.clears_sent += 1
            await self._vb_publish(self._vb_event_subject, ClearEvent().encode())

    async def write_transport_frame(self, frame: Frame) -> None:
        if isinstance(frame, PlaybackMarkerFrame):
            await self.push_frame(PlayedOutFrame(token=frame.token), FrameDirection.UPSTREAM)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        audio = frame.audio
        size = self._vb_frame_bytes
        for offset in range(0, len(audio), size):
            chunk = audio[offset:offset + size]
            if len(chunk) < size:
                chunk = chunk + bytes(size - len(chunk))
            now = time.monotonic()
            if self._vb_t0 is None:
                self._vb_t0 = now
            headers = media_headers(self._vb_seq, int((now - self._vb_t0) * 1000))
            if not await self._vb_publish(self._vb_media_subject, chunk, headers):
                return False
            self._vb_seq += 1
            self.frames_sent += 1
            await self._vb_pace()
        return True

    async def _vb_pace(self) -> None:
        # pipecat's websocket clock: first frame at once, then one interval per frame (about one frame of lead).
        delay = max(0.0, self._vb_next_send - time.monotonic())
        if delay:
            await asyncio.sleep(delay)
            self._vb_next_send += self._vb_interval
        else:
            self._vb_next_send = time.monotonic() + self._vb_interval

    async def _vb_publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> bool:
        if self._vb_sender is not None:
            headers = sender_headers(self._vb_sender, headers)
        try:
            await self._vb_nc.publish(subject, data, headers=headers)
            return True
        except Exception as e:  # connection closed/draining or buffer full: drop, as a sound card would
            log.debug("publish on %s failed: %s", subject, e)
            return False


class NatsCallTransport(BaseTransport):
    """The input/output pair for one call."""

    def __init__(self, *, nc: NATS, subjects: Subjects, call_id: str, sample_rate: int,
                 sender: str | None = None) -> None:
        super().__init__(input_name=f"in-{call_id[:8]}", output_name=f"out-{call_id[:8]}")
        params = transport_params(sample_rate)
        self._vb_input = NatsInputTransport(params, name=self._input_name)
        self._vb_output = NatsOutputTransport(params, nc=nc, subjects=subjects, call_id=call_id, sender=sender,
                                              name=self._output_name)

    def input(self) -> NatsInputTransport:
        return self._vb_input

    def output(self) -> NatsOutputTransport:
        return self._vb_output
