"""The LLM brain: an OpenAI-compatible chat model, fed by DTMF (and speech, when an STT model is set).

Pipeline shape (the call session adds the transport, the VAD and the TTS around these)::

    input -> VAD -> [STT] -> CallerInputToLLM -> user aggregator -> LLM -> TTS -> output -> assistant aggregator

- The greeting is spoken first (a ``TTSSpeakFrame`` that the assistant aggregator records in the context).
- A key press becomes a user message, "The caller pressed 1.", and runs the LLM (cutting the agent short
  when barge-in is on): telephony callers answer menus with the keypad even when an LLM listens.
- Speech is transcribed by ``OpenAISTTService`` at the same base URL when ``llm.stt_model`` is set.
  Turn end is a speech timeout rather than pipecat's default Smart-Turn model, which would be one more
  model per call.
- The LLM gets one tool, ``end_call``: it hands the end to the call session, which says the agent's
  goodbye, lets it play out and hangs up (see :meth:`CallSession.request_end`).
- After every assistant turn the context messages are checkpointed; a resumed call restores them and
  skips the greeting.
"""

from __future__ import annotations

import logging

from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    FunctionCallResultProperties,
    InputDTMFFrame,
    LLMMessagesAppendFrame,
    LLMRunFrame,
    StartFrame,
    TTSSpeakFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.turns.user_start import TranscriptionUserTurnStartStrategy, VADUserTurnStartStrategy
from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from voicebus.agent_runner.control import CallControl
from voicebus.bus.agent import AgentDefinition
from voicebus.bus.messages import CallCheckpoint

log = logging.getLogger("voicebus.agent_runner.llm")

END_CALL_TOOL = "end_call"
# The openai client refuses to start without a key; local OpenAI-compatible servers ignore it.
NO_KEY = "voicebus-no-key"


class _ClosingClient:
    """pipecat leaves the OpenAI client (an httpx pool) open after the pipeline; close it per call."""

    _client: object

    async def cleanup(self) -> None:
        await super().cleanup()  # type: ignore[misc]
        close = getattr(self._client, "close", None)
        if close is not None:
            try:
                await close()
            except Exception as e:  # closing is best effort; the call is over either way
                log.debug("closing the OpenAI client failed: %s", e)


class CallLLMService(_ClosingClient, OpenAILLMService):
    pass


class CallSTTService(_ClosingClient, OpenAISTTService):
    pass


def dtmf_user_text(digit: str) -> str:
    return f"The caller pressed {digit}."


class CallerInputToLLM(FrameProcessor):
    """Speaks the greeting at start and turns key presses into user messages for the LLM."""

    def __init__(self, control: CallControl, *, greeting: str, barge_in: bool, resume_messages: bool,
                 answer_on_start: bool, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._vb_control = control
        self._vb_greeting = greeting
        self._vb_barge_in = barge_in
        self._vb_resume = resume_messages
        self._vb_answer_on_start = answer_on_start
        self._vb_bot_speaking = False

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputDTMFFrame):
            await self._vb_on_digit(frame.button.value)
            return
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            if not self._vb_resume and self._vb_greeting.strip():
                await self.push_frame(TTSSpeakFrame(self._vb_greeting))
            elif self._vb_answer_on_start:
                await self.push_frame(LLMRunFrame())
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._vb_bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._vb_bot_speaking = False

    async def _vb_on_digit(self, digit: str) -> None:
        if self._vb_control.ending:
            return
        if self._vb_barge_in and self._vb_bot_speaking:
            await self.broadcast_interruption()
        await self.push_frame(LLMMessagesAppendFrame(
            messages=[{"role": "user", "content": dtmf_user_text(digit)}], run_llm=True))


def build_llm_processors(control: CallControl, definition: AgentDefinition,
                         resume: CallCheckpoint | None) -> tuple[list[FrameProcessor], list[FrameProcessor]]:
    """Processors before the TTS, and after the output transport, for an LLM agent."""
    spec = definition.llm
    if spec is None:
        raise ValueError("definition has no llm")
    api_key = spec.api_key or NO_KEY

    async def end_call(params: FunctionCallParams) -> None:
        await params.result_callback({"status": "ending the call"},
                                     properties=FunctionCallResultProperties(run_llm=False))
        await control.request_end("agent_hangup", definition.goodbye)

    tools = ToolsSchema(standard_tools=[FunctionSchema(
        name=END_CALL_TOOL,
        description="Say goodbye and hang up. Call this when the caller wants to end the call or the "
                    "conversation is complete.",
        properties={}, required=[], handler=end_call)])

    # The system prompt rides the service settings (pipecat 1.9+), so the context, and with it the
    # checkpoint, holds only the conversation itself.
    restored = [m for m in (resume.messages if resume else [])
                if isinstance(m, dict) and m.get("role") != "system"]
    context = LLMContext(messages=list(restored), tools=tools)

    settings = OpenAILLMService.Settings(model=spec.model, system_instruction=spec.system_prompt)
    if spec.temperature is not None:
        settings.temperature = spec.temperature
    llm = CallLLMService(api_key=api_key, base_url=spec.base_url, settings=settings)

    aggregators = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(
            user_turn_strategies=UserTurnStrategies(
                start=[VADUserTurnStartStrategy(enable_interruptions=definition.barge_in),
                       TranscriptionUserTurnStartStrategy(enable_interruptions=definition.barge_in)],
                stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.6)],
            ),
            empty_user_turn=None,  # speech we could not transcribe is not a question to answer
        ),
    )
    user_agg, assistant_agg = aggregators.user(), aggregators.assistant()

    turns = {"n": resume.turn if resume else 0}

    @assistant_agg.event_handler("on_assistant_turn_stopped")
    async def _on_assistant_turn(_aggregator: object, _message: object) -> None:
        turns["n"] += 1
        control.checkpoint(turn=turns["n"], messages=list(context.get_messages()))

    before: list[FrameProcessor] = []
    if spec.stt_model:
        before.append(CallSTTService(api_key=api_key, base_url=spec.base_url,
                                       settings=OpenAISTTService.Settings(model=spec.stt_model)))
    answer_on_start = bool(restored) and restored[-1].get("role") == "user"
    before += [
        CallerInputToLLM(control, greeting=definition.greeting, barge_in=definition.barge_in,
                         resume_messages=bool(restored), answer_on_start=answer_on_start),
        user_agg,
        llm,
    ]
    return before, [assistant_agg]
