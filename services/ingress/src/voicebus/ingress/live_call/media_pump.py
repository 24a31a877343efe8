"""A live call's audio and events in both directions, between the carrier socket and NATS.

Carrier frames are decoded by the provider's codec to PCM16, cut into exact 20 ms frames and
published on ``media.in``; DTMF and mark acknowledgements go to ``event.in``. The runner's ``media.out``
and ``event.out`` (clear, mark, close) come back on ONE subscription, so NATS keeps a mark or a close
behind the audio published before it, and are encoded for the carrier.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from voicebus.audio import FrameCutter
from voicebus.bus.media import RUNNER_HEADER, media_headers
from voicebus.bus.messages import ClearEvent, CloseEvent, DtmfEvent, MarkAckEvent, MarkEvent, event_out_adapter
from voicebus.bus.subjects import Subjects
from voicebus.ingress.live_call.socket import CarrierSocket
from voicebus.telephony.stream import AudioIn, CarrierDisconnected, DtmfIn, Frame, Ignored, MarkIn, MediaCodec, StopIn

log = logging.getLogger("voicebus.ingress.media")


class MediaPump:
    def __init__(self, nc: NATS, subjects: Subjects, call_id: str, socket: CarrierSocket, codec: MediaCodec,
                 frame_bytes: int, *, runner_ready: Callable[[], bool], on_caller_gone: Callable[[], None],
                 on_agent_close: Callable[[CloseEvent], None], output_open: Callable[[], bool],
                 retired: Callable[[str], bool] = lambda _runner: False) -> None:
        self.nc = nc
        self.subjects = subjects
        self.call_id = call_id
        self.socket = socket
        self.codec = codec
        self._cutter = FrameCutter(frame_bytes)
        self._runner_ready = runner_ready
        self._on_caller_gone = on_caller_gone
        self._on_agent_close = on_agent_close
        self._output_open = output_open
        self._retired = retired
        self._stale_frames = 0
        self._seq = 0
        self._problems = 0
        self._bad_out_frames = 0
        self._sub: Subscription | None = None
        self._media_out = subjects.media_out(call_id)
        self._event_out = subjects.event_out(call_id)

    async def subscribe(self) -> None:
        """Before the offer, so the greeting a runner sends right after accepting is not lost."""
        base = self._media_out.removesuffix("media.out")
        assert self._event_out.removesuffix("event.out") == base, "subject layout changed: fix the wildcard"
        self._sub = await self.nc.subscribe(base + "*.out", cb=self._on_runner_output)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def read_carrier(self) -> None:
        media_in = self.subjects.media_in(self.call_id)
        event_in = self.subjects.event_in(self.call_id)
        try:
            while True:
                msg = self.codec.decode(await self.socket.receive())
                if isinstance(msg, AudioIn):
                    if not self._runner_ready():
                        continue  # nobody listens yet; stale audio would only confuse the runner's VAD
                    for frame in self._cutter.push(msg.pcm16):
                        await self.nc.publish(media_in, frame, headers=media_headers(self._seq, self._seq * 20))
                        self._seq += 1
                elif isinstance(msg, DtmfIn):
                    await self.nc.publish(event_in, DtmfEvent(digit=msg.digit).encode())
                elif isinstance(msg, MarkIn):
                    await self.nc.publish(event_in, MarkAckEvent(name=msg.name).encode())
                elif isinstance(msg, StopIn):
                    if not self.socket.closed_by_us:
                        self._on_caller_gone()
                    return
                elif isinstance(msg, Ignored) and msg.problem:
                    self._problems += 1
                    if self._problems == 1 or self._problems % 100 == 0:
                        log.warning("call %s: ignored carrier frame (%s): %s [%d so far]",
                                    self.call_id, msg.what, msg.problem, self._problems)
        except CarrierDisconnected:
            if not self.socket.closed_by_us:  # we closed it (runner lost, shutdown): that path decides the ending
                self._on_caller_gone()

    async def _on_runner_output(self, msg: NatsMsg) -> None:
        if not self._output_open():
            return
        sender = (msg.headers or {}).get(RUNNER_HEADER)
        if sender is not None and self._retired(sender):
            self._stale_frames += 1  # a runner presumed dead is still talking: its successor has the call
            if self._stale_frames == 1:
                log.warning("call %s: dropping output of retired runner %s", self.call_id, sender)
            return
        if msg.subject == self._media_out:
            try:
                frame: Frame | None = self.codec.encode_audio(msg.data)
            except ValueError:
                self._bad_out_frames += 1
                if self._bad_out_frames == 1:
                    log.warning("call %s: dropped malformed media.out frame (%d bytes)", self.call_id, len(msg.data))
                return
            await self.socket.send(frame)
            return
        try:
            event = event_out_adapter.validate_json(msg.data)
        except ValidationError as e:
            log.warning("call %s: ignored malformed event.out: %s", self.call_id, e.errors()[:1])
            return
        if isinstance(event, ClearEvent):
            await self.socket.send(self.codec.encode_clear())
        elif isinstance(event, MarkEvent):
            await self.socket.send(self.codec.encode_mark(event.name))
        elif isinstance(event, CloseEvent):
            log.info("call %s: runner closed the call (%s)", self.call_id, event.reason)
            self._on_agent_close(event)
