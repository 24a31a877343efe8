"""One call on this runner: its NATS subscriptions, heartbeats, watchdogs, pipeline and ending.

Order of events (the offer handler in :mod:`voicebus.agent_runner.runner` drives the first part):

1. :meth:`CallSession.prepare` subscribes to ``media.in``/``event.in`` *before* the offer is answered
   (so no early frame is lost; they wait in the input transport's inbox), starts the heartbeats and the
   inbound-media watchdog.
2. :meth:`CallSession.run` builds and runs one pipecat ``PipelineWorker`` under its own
   ``WorkerRunner(handle_sigint=False)``.
3. Whoever ends the call records *why* first (:meth:`request_end` for the agent and the max-duration
   limit, :meth:`abort` for caller hangup, lost ingress, shutdown); only the first reason counts.
4. :meth:`_finish` turns that reason into the bus contract: ``close`` on ``event.out`` and the hangup
   intent to call-control (or, if call-control is unreachable, ``CallEnded`` published here), deletes
   the checkpoint, stops the heartbeats and unsubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import EndFrame, Frame, InterruptionFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.workers.runner import WorkerRunner
from pydantic import ValidationError

from voicebus.agent_runner.flow import FlowEngine
from voicebus.agent_runner.models import DEFAULT_VOICE, SharedModels, VoiceNotAvailable
from voicebus.agent_runner.scripted import ScriptedFlowProcessor
from voicebus.agent_runner.services import SharedPiperTTSService, SharedSileroVADAnalyzer
from voicebus.agent_runner.settings import RunnerSettings
from voicebus.agent_runner.transport import NatsCallTransport
from voicebus.bus.agent import AgentDefinition, FlowNode, ScriptedFlow
from voicebus.bus.events import publish_call_ended
from voicebus.bus.intents import IntentNotStored, publish_hangup_intent
from voicebus.bus.media import sender_headers
from voicebus.bus.messages import (
    HEARTBEAT_INTERVAL_S,
    CallCheckpoint,
    CallEnded,
    CallerHangupEvent,
    CallOffer,
    CloseEvent,
    DtmfEvent,
    HangupRequest,
    Heartbeat,
    event_in_adapter,
)
from voicebus.bus.subjects import Subjects

log = logging.getLogger("voicebus.agent_runner.call")

SOURCE = "agent-runner"

# Reasons whose run ends "completed"; anything else (ingress_lost, pipeline_error, runner_shutdown,
# flow_loop, ...) ends "failed".
COMPLETED_REASONS = frozenset({"agent_hangup", "max_duration", "caller_hangup"})
# The caller already hung up: ingress publishes the terminal event, the runner asks for no hangup.
CALLER_GONE = "caller_hangup"
# The call was resumed on another runner (this one was presumed dead): stop without a word to ingress or
# call-control, and leave the checkpoint, which is the successor's now.
SUPERSEDED = "superseded"

# After an end was requested, how long the goodbye may take to play before the pipeline is cancelled.
END_GRACE_S = 30.0


@dataclass
class RunnerContext:
    """What every call on a runner shares."""

    nc: NATS
    js: JetStreamContext
    subjects: Subjects
    runner_id: str
    models: SharedModels
    settings: RunnerSettings
    checkpoints: KeyValue


class CallSession:
    def __init__(self, ctx: RunnerContext, offer: CallOffer, checkpoint: CallCheckpoint | None = None,
                 *, on_pipeline_done: Callable[[CallSession], None] | None = None) -> None:
        self.ctx = ctx
        self.offer = offer
        self.call_id = offer.call_id
        self.definition: AgentDefinition = offer.agent.definition
        self.resume_from = checkpoint if offer.resume else None
        self.end_reason: str | None = None
        self.end_state: str | None = None
        self.turn = checkpoint.turn if checkpoint is not None and offer.resume else 0
        self.flow_node: str | None = checkpoint.flow_node if self.resume_from else None
        self.done = asyncio.Event()
        self.pipeline_done = asyncio.Event()
        self._on_pipeline_done = on_pipeline_done
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._hb_task: asyncio.Task[None] | None = None
        self._last_media = time.monotonic()
        self._media_frames = 0
        self._transport: NatsCallTransport | None = None
        self._worker: PipelineWorker | None = None
        self._runner: WorkerRunner | None = None
        self._brain: FrameProcessor | None = None
        self._ckpt_latest: CallCheckpoint | None = None
        self._ckpt_event = asyncio.Event()
        self._ckpt_task: asyncio.Task[None] | None = None
        self._ckpt_closed = False
        self._started_at = time.monotonic()

    # ================================================================== CallControl
    @property
    def ending(self) -> bool:
        return self.end_reason is not None

    async def request_end(self, reason: str, goodbye: str | None = None, *, interrupt: bool = False) -> None:
        if self.end_reason is not None:
            return
        self._set_end(reason)
        log.info("call %s: agent ends the call (%s)", self.call_id, reason)
        worker = self._worker
        if worker is None or worker.has_finished():
            return
        frames: list[Frame] = []
        if interrupt:
            frames.append(InterruptionFrame())
        if goodbye and goodbye.strip():
            speak = TTSSpeakFrame(goodbye, append_to_context=False)
            speak.interruptible = False  # barge-in must not cut the goodbye
            frames.append(speak)
        frames.append(EndFrame(reason=reason))
        await worker.queue_frames(frames)
        self._spawn(self._cancel_after(END_GRACE_S + 0.1 * len(goodbye or "")), "end-grace")

    def checkpoint(self, *, turn: int, flow_node: str | None = None,
                   messages: list[dict[str, Any]] | None = None) -> None:
        if self._ckpt_closed:
            return
        self.turn = turn
        if flow_node is not None:
            self.flow_node = flow_node
        self._ckpt_latest = CallCheckpoint(
            call_id=self.call_id, run_id=self.offer.run_id, runner_id=self.ctx.runner_id, turn=turn,
            flow_node=self.flow_node, messages=_jsonable(messages or []),
        )
        self._ckpt_event.set()
        if self._ckpt_task is None:
            self._ckpt_task = asyncio.create_task(self._checkpoint_writer(), name=f"ckpt-{self.call_id[:8]}")

    # ================================================================== lifecycle
    async def prepare(self) -> None:
        """Subscribe to the call's inbound subjects and start heartbeats (before the offer is answered)."""
        s = self.ctx.subjects
        self._transport = NatsCallTransport(nc=self.ctx.nc, subjects=s, call_id=self.call_id,
                                            sample_rate=self.offer.media.sample_rate, sender=self.ctx.runner_id)
        self._subs.append(await self.ctx.nc.subscribe(s.media_in(self.call_id), cb=self._on_media))
        self._subs.append(await self.ctx.nc.subscribe(s.event_in(self.call_id), cb=self._on_event))
        self._last_media = time.monotonic()
        self._hb_task = asyncio.create_task(self._heartbeats(), name=f"hb-{self.call_id[:8]}")
        await self._heartbeat_once(0)  # ingress counts its 1.5 s from the accept; be early, not late
        self._spawn(self._media_watchdog(), "media-watchdog")

    async def run(self) -> None:
        try:
            if self.end_reason is None:
                await self._run_pipeline()
        except Exception:
            log.exception("call %s: pipeline failed", self.call_id)
            if self.end_reason is None:
                self._set_end("pipeline_error")
        finally:
            if self.end_reason is None:
                # The pipeline stopped without anyone asking (e.g. a fatal processor error).
                self._set_end("pipeline_error")
            self.pipeline_done.set()
            if self._on_pipeline_done is not None:
                self._on_pipeline_done(self)
            try:
                await self._finish()
            finally:
                self.done.set()

    async def abort(self, reason: str) -> None:
        """End now, without a goodbye: the caller is gone, ingress is lost, or the runner is shutting down."""
        if self.end_reason is not None:
            if reason == CALLER_GONE and self._worker is not None:
                await self._worker.cancel(reason=reason)  # nobody is left to hear the goodbye
            return
        self._set_end(reason)
        log.info("call %s: ending (%s)", self.call_id, reason)
        if self._worker is not None:
            await self._worker.cancel(reason=reason)

    async def _detach(self) -> None:
        """Stop heartbeating and leave the call's subjects: from now on ingress sees this runner gone."""
        if self._hb_task is not None:
            self._hb_task.cancel()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def discard(self) -> None:
        """Undo :meth:`prepare` for an offer that could not be accepted (ingress will offer it elsewhere)."""
        self._ckpt_closed = True
        for task in self._tasks:
            task.cancel()
        await self._detach()
        self.pipeline_done.set()
        self.done.set()

    # ================================================================== NATS callbacks
    async def _on_media(self, msg: NatsMsg) -> None:
        self._last_media = time.monotonic()
        self._media_frames += 1
        if self._transport is not None:
            self._transport.input().feed_audio(msg.data)

    async def _on_event(self, msg: NatsMsg) -> None:
        try:
            event = event_in_adapter.validate_json(msg.data)
        except ValidationError as e:
            log.warning("call %s: ignoring malformed event.in message: %s", self.call_id, e.errors()[:1])
            return
        if isinstance(event, DtmfEvent):
            if self._transport is not None:
                self._transport.input().feed_dtmf(event.digit)
        elif isinstance(event, CallerHangupEvent):
            self._spawn(self.abort(CALLER_GONE), "caller-hangup")
        # MarkAckEvent: the runner sends no marks yet, so acknowledgements need no handling.

    # ================================================================== pipeline
    async def _run_pipeline(self) -> None:
        assert self._transport is not None
        rate = self.offer.media.sample_rate
        transport = self._transport
        tts = await self._build_tts(rate)
        processors: list[FrameProcessor] = [transport.input()]
        vad_needed = self.definition.barge_in or (self.definition.llm is not None
                                                  and self.definition.llm.stt_model is not None)
        if vad_needed:
            processors.append(VADProcessor(vad_analyzer=SharedSileroVADAnalyzer(
                self.ctx.models, params=VADParams(confidence=0.7, start_secs=0.2, stop_secs=0.6))))
        if self.definition.llm is not None:
            from voicebus.agent_runner.llm import build_llm_processors

            before_tts, after_output = build_llm_processors(self, self.definition, self.resume_from)
            processors += [*before_tts, tts, transport.output(), *after_output]
        else:
            flow = self.definition.flow or _announcement_flow(self.definition)
            engine = FlowEngine(flow, greeting=self.definition.greeting, goodbye=self.definition.goodbye)
            resume_node = self.flow_node if self.resume_from and self.flow_node in flow.nodes else None
            self._brain = ScriptedFlowProcessor(
                engine, self, barge_in=self.definition.barge_in, resume_node=resume_node,
                resume_turn=self.turn if resume_node else 0)
            processors += [self._brain, tts, transport.output()]

        self._worker = PipelineWorker(
            Pipeline(processors),
            params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
            enable_rtvi=False,
            idle_timeout_secs=None,
            cancel_on_idle_timeout=False,
            enable_turn_tracking=_tracing_enabled(),
            enable_tracing=_tracing_enabled(),
            conversation_id=self.call_id,
            name=f"call-{self.call_id[:12]}",
        )
        self._runner = WorkerRunner(handle_sigint=False, name=f"runner-{self.call_id[:12]}")
        await self._runner.add_workers(self._worker)
        self._spawn(self._max_duration(), "max-duration")
        if self.end_reason is not None:  # ended while we were building (e.g. caller hung up at once)
            return
        await self._runner.run()

    async def _build_tts(self, rate: int) -> SharedPiperTTSService:
        voice_id = self.definition.voice.voice
        models = self.ctx.models
        try:
            voice = models.piper_voice(voice_id) if models.has_voice(voice_id) else \
                await asyncio.to_thread(models.piper_voice, voice_id)
        except VoiceNotAvailable as e:
            log.warning("call %s: %s; using %s", self.call_id, e, DEFAULT_VOICE)
            voice_id = DEFAULT_VOICE
            voice = models.piper_voice(voice_id) if models.has_voice(voice_id) else \
                await asyncio.to_thread(models.piper_voice, voice_id)
        return SharedPiperTTSService(voice=voice, voice_id=voice_id, sample_rate=rate)

    # ================================================================== timers
    async def _heartbeats(self) -> None:
        seq = 1
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            await self._heartbeat_once(seq)
            seq += 1

    async def _heartbeat_once(self, seq: int) -> None:
        hb = Heartbeat(runner_id=self.ctx.runner_id, seq=seq, turn=self.turn)
        with contextlib.suppress(Exception):  # a reconnecting client buffers; a closed one is shutting down
            await self.ctx.nc.publish(self.ctx.subjects.heartbeat(self.call_id), hb.encode())

    async def _media_watchdog(self) -> None:
        timeout = self.ctx.settings.media_timeout_s
        while self.end_reason is None:
            remaining = self._last_media + timeout - time.monotonic()
            if remaining <= 0 and not self.ctx.nc.is_connected:
                # Our NATS connection is down (a NATS restart): the silence is not ingress's. Count again,
                # from now, so ingress gets a whole timeout after we are back.
                self._last_media = time.monotonic()
                continue
            if remaining <= 0:
                log.warning("call %s: no media.in for %.1fs; the ingress is presumed lost", self.call_id, timeout)
                await self.abort("ingress_lost")
                return
            await asyncio.sleep(remaining)

    async def _max_duration(self) -> None:
        limit = self.definition.max_call_secs - (time.monotonic() - self._started_at)
        await asyncio.sleep(max(0.0, limit))
        await self.request_end("max_duration", self.definition.goodbye, interrupt=True)

    async def _cancel_after(self, secs: float) -> None:
        await asyncio.sleep(secs)
        if self._worker is not None and not self._worker.has_finished():
            log.warning("call %s: goodbye did not finish within %.0fs; cancelling the pipeline", self.call_id, secs)
            await self._worker.cancel(reason="end_grace_expired")

    # ================================================================== checkpoints
    async def _checkpoint_writer(self) -> None:
        while True:
            await self._ckpt_event.wait()
            self._ckpt_event.clear()
            cp = self._ckpt_latest
            if cp is None:
                continue
            try:
                await self.ctx.checkpoints.put(self.call_id, cp.encode())
            except Exception as e:
                log.warning("call %s: checkpoint write failed: %s", self.call_id, e)

    # ================================================================== ending
    def _set_end(self, reason: str) -> None:
        self.end_reason = reason
        self.end_state = "completed" if reason in COMPLETED_REASONS else "failed"

    async def _finish(self) -> None:
        reason = self.end_reason or "pipeline_error"
        state = self.end_state or "failed"
        for task in self._tasks:
            task.cancel()
        if reason not in (CALLER_GONE, SUPERSEDED):
            # Ingress closes the carrier socket on this; then call-control hangs up the carrier leg.
            await self._publish_event_out(CloseEvent(reason=reason, state=state).encode())
            await self._request_hangup(reason, state)
        await self._drop_checkpoint(keep=reason == SUPERSEDED)
        await self._detach()
        out = self._transport.output() if self._transport else None
        log.info("call %s ended: %s/%s after %.1fs (media in %d frames, out %d frames, %d clears)",
                 self.call_id, state, reason, time.monotonic() - self._started_at, self._media_frames,
                 out.frames_sent if out else 0, out.clears_sent if out else 0)

    async def _publish_event_out(self, data: bytes) -> None:
        try:
            await self.ctx.nc.publish(self.ctx.subjects.event_out(self.call_id), data,
                                      headers=sender_headers(self.ctx.runner_id))
        except Exception as e:
            log.warning("call %s: could not publish on event.out: %s", self.call_id, e)

    async def _request_hangup(self, reason: str, state: str) -> None:
        """Queue the durable hangup intent: call-control hangs up the call's carrier legs (it knows them by
        call id) and ends the run, now or, if it is down, once it is back.

        Only if JetStream itself would not store the intent (NATS away for longer than the retries) does
        the runner end the run here; the leg is then left to call-control's reconcile on its next start.
        """
        o = self.offer
        req = HangupRequest(call_id=o.call_id, run_id=o.run_id, organization_id=o.organization_id,
                            reason=reason, end_state=state)  # type: ignore[arg-type]
        try:
            await publish_hangup_intent(self.ctx.js, self.ctx.subjects, req)
            return
        except IntentNotStored as e:
            log.warning("call %s: the hangup intent could not be queued (%s); ending the run here", self.call_id, e)
        ended = CallEnded(call_id=o.call_id, run_id=o.run_id, organization_id=o.organization_id, source=SOURCE,
                          state=state, reason=reason)  # type: ignore[arg-type]
        try:
            await publish_call_ended(self.ctx.js, self.ctx.subjects, ended)
        except Exception as e:
            log.error("call %s: could not publish CallEnded(%s, %s): %s", self.call_id, state, reason, e)

    async def _drop_checkpoint(self, keep: bool = False) -> None:
        """Stop writing checkpoints and delete the call's; ``keep``: it belongs to a successor now."""
        self._ckpt_closed = True
        if self._ckpt_task is not None:
            self._ckpt_task.cancel()
            with contextlib.suppress(BaseException):
                await self._ckpt_task
        if keep or (self._ckpt_latest is None and self.resume_from is None):
            return  # nothing was ever written for this call
        try:
            await self.ctx.checkpoints.delete(self.call_id)
        except Exception as e:
            log.warning("call %s: could not delete the checkpoint: %s", self.call_id, e)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.call_id[:8]}")
        self._tasks.append(task)


def _tracing_enabled() -> bool:
    """pipecat's conversation/turn/tts spans, when the service exports traces at all (see observability)."""
    return os.environ.get("OTEL_TRACES_EXPORTER", "none").lower() not in ("", "none")


def _announcement_flow(definition: AgentDefinition) -> ScriptedFlow:
    """A definition with neither flow nor LLM is an announcement: greeting, goodbye, hang up."""
    return ScriptedFlow(start="goodbye", nodes={"goodbye": FlowNode(say=definition.goodbye, hangup=True)})


def _jsonable(messages: list[Any]) -> list[dict[str, Any]]:
    """LLM context messages as plain JSON (pipecat may hold provider objects in them)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, dict):
            out.append(json.loads(json.dumps(m, default=str)))
    return out
