"""The scripted-flow rules, without audio: events in, actions out."""

from __future__ import annotations

import pytest

from voicebus.agent_runner.flow import (
    AwaitPlayback,
    CancelTimer,
    Checkpoint,
    FlowEngine,
    FlowError,
    Hangup,
    Interrupt,
    Say,
    StartTimer,
)
from voicebus.bus.agent import FlowNode, ScriptedFlow, demo_definition


def demo_engine() -> FlowEngine:
    d = demo_definition()
    assert d.flow is not None
    return FlowEngine(d.flow, greeting=d.greeting, goodbye=d.goodbye)


def token_of(actions: list) -> int:
    marks = [a for a in actions if isinstance(a, AwaitPlayback)]
    assert len(marks) == 1, actions
    return marks[0].token


def says(actions: list) -> list[str]:
    return [a.text for a in actions if isinstance(a, Say)]


def test_begin_speaks_greeting_then_start_node_and_checkpoints() -> None:
    e = demo_engine()
    acts = e.begin()
    assert says(acts) == ["Hello, and thanks for calling voicebus.",
                          "Press 1 to hear our opening hours, or press 9 to end the call."]
    assert Checkpoint("menu", 1) in acts
    assert isinstance(acts[-1], AwaitPlayback)
    assert e.node == "menu" and e.phase == "speaking"
    assert e.begin() == []  # only once


def test_prompt_played_starts_silence_timer() -> None:
    e = demo_engine()
    tok = token_of(e.begin())
    assert e.on_played(tok + 99) == []  # a stale marker changes nothing
    assert e.on_played(tok) == [StartTimer(8)]
    assert e.phase == "waiting"


def test_valid_digit_enters_node_and_next_follows_after_playback() -> None:
    e = demo_engine()
    e.on_played(token_of(e.begin()))
    acts = e.on_dtmf("1")
    assert acts[0] == CancelTimer()
    assert Checkpoint("hours", 2) in acts
    assert says(acts) == ["We are open every day from nine to five."]
    acts = e.on_played(token_of(acts))
    assert Checkpoint("bye", 3) in acts
    assert acts[-1] == Hangup(goodbye="Thank you for calling. Goodbye!")
    assert e.phase == "ended"
    assert e.on_dtmf("1") == [] and e.on_timeout() == []


def test_digit_during_prompt_interrupts_it() -> None:
    e = demo_engine()
    e.begin()
    acts = e.on_dtmf("9")
    assert acts[:2] == [Interrupt(), CancelTimer()]
    assert acts[-1] == Hangup(goodbye="Thank you for calling. Goodbye!")


def test_invalid_digit_says_invalid_and_repeats_prompt() -> None:
    e = demo_engine()
    e.on_played(token_of(e.begin()))
    acts = e.on_dtmf("5")
    assert says(acts) == ["Sorry, that is not an option.",
                          "Press 1 to hear our opening hours, or press 9 to end the call."]
    assert e.node == "menu" and e.phase == "speaking"
    assert e.on_played(token_of(acts)) == [StartTimer(8)]


def test_silence_repeats_then_goes_to_on_timeout() -> None:
    e = demo_engine()  # menu: max_repeats=1, on_timeout="bye"
    e.on_played(token_of(e.begin()))
    acts = e.on_timeout()
    assert says(acts) == ["Press 1 to hear our opening hours, or press 9 to end the call."]
    assert e.repeats == 1
    e.on_played(token_of(acts))
    acts = e.on_timeout()
    assert Checkpoint("bye", e.turn) in acts and acts[-1] == Hangup(goodbye="Thank you for calling. Goodbye!")


def test_silence_without_on_timeout_says_goodbye_and_hangs_up() -> None:
    flow = ScriptedFlow(start="ask", nodes={"ask": FlowNode(say="Anyone there?", dtmf={"1": "ask"},
                                                            timeout_secs=3, max_repeats=0)})
    e = FlowEngine(flow, greeting="", goodbye="Bye now.")
    acts = e.begin()
    assert says(acts) == ["Anyone there?"]  # an empty greeting is not spoken
    assert e.on_played(token_of(acts)) == [StartTimer(3)]
    assert e.on_timeout() == [Hangup(goodbye="Bye now.")]


def test_interruption_counts_as_played() -> None:
    e = demo_engine()
    e.begin()
    assert e.on_interrupted() == [StartTimer(8)]
    assert e.on_interrupted() == []  # nothing is playing any more


def test_nodes_without_menu_ignore_digits() -> None:
    flow = ScriptedFlow(start="info", nodes={"info": FlowNode(say="Just listen.", timeout_secs=5)})
    e = FlowEngine(flow, greeting="Hi.", goodbye="Bye.")
    e.begin()
    assert e.on_dtmf("1") == []


def test_silent_next_chain_is_followed_and_loops_are_cut() -> None:
    flow = ScriptedFlow(start="a", nodes={"a": FlowNode(next="b"), "b": FlowNode(say="Hello from b.")})
    e = FlowEngine(flow, greeting="", goodbye="Bye.")
    acts = e.begin()
    assert [a for a in acts if isinstance(a, Checkpoint)] == [Checkpoint("a", 1), Checkpoint("b", 2)]
    assert says(acts) == ["Hello from b."]

    loop = ScriptedFlow(start="a", nodes={"a": FlowNode(next="b"), "b": FlowNode(next="a")})
    e = FlowEngine(loop, greeting="", goodbye="Bye.")
    assert e.begin()[-1] == Hangup(goodbye="Bye.", reason="flow_loop")


def test_resume_skips_greeting_and_keeps_turns() -> None:
    e = demo_engine()
    acts = e.begin(resume_node="hours", turn=5)
    assert says(acts) == ["We are open every day from nine to five."]
    assert Checkpoint("hours", 6) in acts
    with pytest.raises(FlowError):
        demo_engine().begin(resume_node="nowhere")


def test_hangup_start_node_and_end() -> None:
    flow = ScriptedFlow(start="bye", nodes={"bye": FlowNode(say="Closed today.", hangup=True)})
    e = FlowEngine(flow, greeting="Hi.", goodbye="Bye.")
    assert e.begin() == [Say("Hi."), Checkpoint("bye", 1), Hangup(goodbye="Closed today.")]
    e2 = demo_engine()
    e2.begin()
    e2.end()
    assert e2.on_dtmf("1") == [] and e2.on_interrupted() == [] and e2.phase == "ended"


def test_greeting_is_the_prompt_when_start_node_is_silent() -> None:
    flow = ScriptedFlow(start="wait", nodes={"wait": FlowNode(say="", timeout_secs=9)})
    e = FlowEngine(flow, greeting="Hello.", goodbye="Bye.")
    acts = e.begin()
    assert acts[0] == Say("Hello.") and Checkpoint("wait", 1) in acts
    assert not any(isinstance(a, StartTimer) for a in acts)
    assert e.phase == "speaking"  # barge-in may cut the greeting
    assert e.on_played(token_of(acts)) == [StartTimer(9)]
