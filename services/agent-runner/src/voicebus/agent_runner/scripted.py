"""The pipecat processor that runs a :class:`~voicebus.agent_runner.flow.FlowEngine` on a live call.

Sits between the VAD and the TTS: it turns DTMF, playback echoes, barge-in and its silence timer into
engine events, and the engine's actions into ``TTSSpeakFrame``s, playback markers and call-control
requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputDTMFFrame,
    InterruptionFrame,
    StartFrame,
    TTSSpeakFrame,
    VADUserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from voicebus.agent_runner.control import CallControl
from voicebus.agent_runner.flow import (
    Action,
    AwaitPlayback,
    CancelTimer,
    Checkpoint,
    FlowEngine,
    Hangup,
    Interrupt,
    Say,
    StartTimer,
)
from voicebus.agent_runner.frames import PlaybackMarkerFrame, PlayedOutFrame

log = logging.getLogger("voicebus.agent_runner.scripted")


class ScriptedFlowProcessor(FrameProcessor):
    def __init__(self, engine: FlowEngine, control: CallControl, *, barge_in: bool = True,
                 resume_node: str | None = None, resume_turn: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.engine = engine
        self._vb_control = control
        self._vb_barge_in = barge_in
        self._vb_resume_node = resume_node
        self._vb_resume_turn = resume_turn
        self._vb_timer: asyncio.Task[None] | None = None
        self._vb_lock = asyncio.Lock()
        self.interruptions = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)

        if isinstance(frame, PlayedOutFrame):
            await self._vb_handle(lambda: self.engine.on_played(frame.token))
            return  # our own echo; nobody upstream needs it
        await self.push_frame(frame, direction)

        if isinstance(frame, StartFrame):
            await self._vb_handle(lambda: self.engine.begin(resume_node=self._vb_resume_node,
                                                            turn=self._vb_resume_turn))
        elif isinstance(frame, InputDTMFFrame):
            await self._vb_handle(lambda: self.engine.on_dtmf(frame.button.value))
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            if self._vb_barge_in and self.engine.phase == "speaking" and not self._vb_control.ending:
                self.interruptions += 1
                await self.broadcast_interruption()
                await self._vb_handle(self.engine.on_interrupted)
        elif isinstance(frame, InterruptionFrame):
            await self._vb_handle(self.engine.on_interrupted)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            self.engine.end()
            await self._vb_cancel_timer()

    async def cleanup(self) -> None:
        await self._vb_cancel_timer()
        await super().cleanup()

    # ------------------------------------------------------------------ actions
    async def _vb_handle(self, event: Callable[[], list[Action]]) -> None:
        async with self._vb_lock:
            if self._vb_control.ending:
                self.engine.end()
                return
            actions = event()
            for action in actions:
                await self._vb_apply(action)

    async def _vb_apply(self, action: Action) -> None:
        if isinstance(action, Say):
            await self.push_frame(TTSSpeakFrame(action.text, append_to_context=False))
        elif isinstance(action, AwaitPlayback):
            await self.push_frame(PlaybackMarkerFrame(token=action.token))
        elif isinstance(action, StartTimer):
            await self._vb_cancel_timer()
            self._vb_timer = self.create_task(self._vb_silence(action.secs), "flow_silence_timer")
        elif isinstance(action, CancelTimer):
            await self._vb_cancel_timer()
        elif isinstance(action, Interrupt):
            self.interruptions += 1
            await self.broadcast_interruption()
        elif isinstance(action, Checkpoint):
            self._vb_control.checkpoint(turn=action.turn, flow_node=action.node)
        elif isinstance(action, Hangup):
            await self._vb_cancel_timer()
            await self._vb_control.request_end(action.reason, action.goodbye)

    async def _vb_silence(self, secs: float) -> None:
        await asyncio.sleep(secs)
        self._vb_timer = None  # this task is finishing; do not let the handler cancel itself
        await self._vb_handle(self.engine.on_timeout)

    async def _vb_cancel_timer(self) -> None:
        task, self._vb_timer = self._vb_timer, None
        if task is not None and task is not asyncio.current_task():
            await self.cancel_task(task)
