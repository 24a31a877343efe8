"""The scripted-flow state machine, free of audio and pipecat so it can be tested exhaustively.

The engine takes events (call started, prompt played out, key pressed, silence timer fired, agent
interrupted) and answers with a list of actions for the pipeline to perform, in order. Keeping the
decisions here and the side effects in :mod:`voicebus.agent_runner.scripted` means every rule of
``AgentDefinition.flow`` is unit-tested without synthesising a single sample.

Rules (see ``voicebus.bus.agent.FlowNode``):

- start: speak the greeting, then enter ``flow.start``; a resumed call enters its checkpointed node and
  skips the greeting.
- entering a node speaks ``say``; once that has been played out, ``next`` is entered if set, else the
  silence timer (``timeout_secs``) starts.
- a key with a ``dtmf`` entry enters that node (cutting the prompt short if it is still playing); any
  other key says ``invalid_say`` and repeats the prompt. Nodes without a menu ignore keys.
- silence: the prompt is repeated up to ``max_repeats`` times, then ``on_timeout`` is entered, or the
  agent says its goodbye and hangs up.
- a ``hangup`` node says its text and ends the call once that has been heard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from voicebus.bus.agent import FlowNode, ScriptedFlow

# A chain of nodes that say nothing and only point at ``next`` would otherwise spin forever.
MAX_SILENT_HOPS = 32


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class AwaitPlayback:
    """Mark the end of what was just said; the engine waits for :meth:`FlowEngine.on_played` with it."""

    token: int


@dataclass(frozen=True)
class StartTimer:
    secs: float


@dataclass(frozen=True)
class CancelTimer:
    pass


@dataclass(frozen=True)
class Interrupt:
    """Cut the agent's current speech (the caller answered the menu before it finished)."""


@dataclass(frozen=True)
class Checkpoint:
    node: str
    turn: int


@dataclass(frozen=True)
class Hangup:
    goodbye: str
    reason: str = "agent_hangup"


Action = Say | AwaitPlayback | StartTimer | CancelTimer | Interrupt | Checkpoint | Hangup
Phase = Literal["idle", "speaking", "waiting", "ended"]


class FlowError(ValueError):
    pass


class FlowEngine:
    def __init__(self, flow: ScriptedFlow, *, greeting: str, goodbye: str) -> None:
        self.flow = flow
        self.greeting = greeting
        self.goodbye = goodbye
        self.node: str | None = None
        self.phase: Phase = "idle"
        self.turn = 0
        self.repeats = 0
        self._token = 0
        self._pending: int | None = None

    @property
    def current(self) -> FlowNode:
        if self.node is None:
            raise FlowError("the flow has not started")
        return self.flow.nodes[self.node]

    # ------------------------------------------------------------------ events
    def begin(self, *, resume_node: str | None = None, turn: int = 0) -> list[Action]:
        """Start the call, or resume it at ``resume_node`` (no greeting) after another runner died."""
        if self.phase != "idle":
            return []
        self.turn = turn
        if resume_node is not None:
            if resume_node not in self.flow.nodes:
                raise FlowError(f"checkpointed node {resume_node!r} is not in this flow")
            return self._enter(resume_node)
        acts = self._enter(self.flow.start)
        if not self.greeting.strip():
            return acts
        if self.phase == "waiting":
            # The start node says nothing: the greeting is the prompt, so the silence timer (and
            # barge-in) wait for it to be heard.
            acts = [a for a in acts if not isinstance(a, StartTimer)]
            return [Say(self.greeting), *acts, *self._speak([])]
        return [Say(self.greeting), *acts]

    def on_played(self, token: int) -> list[Action]:
        if self.phase != "speaking" or token != self._pending:
            return []  # a stale marker (the prompt it closed was interrupted or superseded)
        self._pending = None
        return self._after_prompt()

    def on_interrupted(self) -> list[Action]:
        """The prompt was cut short (barge-in): behave as if it had been heard."""
        if self.phase != "speaking":
            return []
        self._pending = None
        return self._after_prompt()

    def on_dtmf(self, digit: str) -> list[Action]:
        if self.phase not in ("speaking", "waiting"):
            return []
        node = self.current
        if not node.dtmf:
            return []
        acts: list[Action] = []
        if self.phase == "speaking":
            acts.append(Interrupt())
        acts.append(CancelTimer())
        target = node.dtmf.get(digit)
        if target is not None:
            return acts + self._enter(target)
        return acts + self._speak([node.invalid_say, node.say])

    def on_timeout(self) -> list[Action]:
        if self.phase != "waiting":
            return []
        node = self.current
        if self.repeats < node.max_repeats:
            self.repeats += 1
            self.turn += 1
            return [Checkpoint(self.node or "", self.turn), *self._speak([node.say])]
        if node.on_timeout is not None:
            return self._enter(node.on_timeout)
        self.phase = "ended"
        return [Hangup(goodbye=self.goodbye)]

    def end(self) -> None:
        """The call is ending for another reason (caller hung up, max duration): ignore everything now."""
        self.phase = "ended"
        self._pending = None

    # ------------------------------------------------------------------ internals
    def _enter(self, name: str, hops: int = 0) -> list[Action]:
        node = self.flow.nodes[name]
        self.node = name
        self.repeats = 0
        self.turn += 1
        acts: list[Action] = [Checkpoint(name, self.turn)]
        if node.hangup:
            self.phase = "ended"
            self._pending = None
            return [*acts, Hangup(goodbye=node.say)]
        if node.say.strip():
            return acts + self._speak([node.say])
        if node.next is not None:
            if hops >= MAX_SILENT_HOPS:
                self.phase = "ended"
                return [*acts, Hangup(goodbye=self.goodbye, reason="flow_loop")]
            return acts + self._enter(node.next, hops + 1)
        self.phase = "waiting"
        return [*acts, StartTimer(node.timeout_secs)]

    def _speak(self, texts: list[str]) -> list[Action]:
        self._token += 1
        self._pending = self._token
        self.phase = "speaking"
        return [*(Say(t) for t in texts if t.strip()), AwaitPlayback(self._token)]

    def _after_prompt(self) -> list[Action]:
        node = self.current
        if node.next is not None:
            return self._enter(node.next)
        self.phase = "waiting"
        return [StartTimer(node.timeout_secs)]
