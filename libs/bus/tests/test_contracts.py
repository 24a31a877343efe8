"""Bus contracts: subject building, message schemas, agent definition validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from voicebus.bus import Subjects
from voicebus.bus.agent import AgentDefinition, FlowNode, LLMSpec, ScriptedFlow, demo_definition
from voicebus.bus.messages import (
    CallerHangupEvent,
    ClearEvent,
    CloseEvent,
    DtmfEvent,
    MediaFormat,
    event_in_adapter,
    event_out_adapter,
)


def test_subjects_follow_the_documented_layout() -> None:
    s = Subjects()
    assert s.media_in("abc") == "vb.call.abc.media.in"
    assert s.media_out("abc") == "vb.call.abc.media.out"
    assert s.event_in("abc") == "vb.call.abc.event.in"
    assert s.event_out("abc") == "vb.call.abc.event.out"
    assert s.heartbeat("abc") == "vb.call.abc.hb"
    assert s.dispatch_offer == "vb.dispatch.offer"
    assert s.ctl("hangup") == "vb.ctl.hangup"
    assert s.cfg("agent.resolve") == "vb.cfg.agent.resolve"
    assert s.evt("call.ended") == "vb.evt.call.ended"
    assert s.events_stream == "VB_EVENTS"
    assert Subjects("stage-2").events_stream == "STAGE_2_EVENTS"
    assert Subjects("stage-2").checkpoint_bucket == "stage_2_checkpoints"


@pytest.mark.parametrize("bad", ["a.b", "a*", ">", "a b", ""])
def test_call_ids_cannot_escape_their_subject_token(bad: str) -> None:
    with pytest.raises(ValueError, match="call id"):
        Subjects().media_in(bad)


def test_prefix_is_a_single_token() -> None:
    with pytest.raises(ValueError, match="prefix"):
        Subjects("vb.prod")


def test_events_round_trip_through_their_unions() -> None:
    for event in (DtmfEvent(digit="5"), CallerHangupEvent()):
        assert event_in_adapter.validate_json(event.encode()) == event
    for event in (ClearEvent(), CloseEvent(reason="agent_hangup")):
        assert event_out_adapter.validate_json(event.encode()) == event
    with pytest.raises(ValidationError):
        event_out_adapter.validate_json(b'{"type":"explode"}')


def test_media_format_frame_size() -> None:
    assert MediaFormat().frame_bytes == 320
    assert MediaFormat(sample_rate=16000).frame_bytes == 640


def test_demo_definition_is_valid_and_scripted() -> None:
    d = demo_definition()
    assert d.mode == "scripted"
    assert AgentDefinition.model_validate(d.model_dump()) == d


def test_flow_references_are_checked() -> None:
    with pytest.raises(ValidationError, match="unknown node 'nowhere'"):
        ScriptedFlow(start="a", nodes={"a": FlowNode(say="hi", next="nowhere")})
    with pytest.raises(ValidationError, match="is not a node"):
        ScriptedFlow(start="missing", nodes={"a": FlowNode(say="hi")})
    with pytest.raises(ValidationError, match="cannot also have next"):
        ScriptedFlow(start="a", nodes={"a": FlowNode(say="bye", hangup=True, next="a")})
    with pytest.raises(ValidationError, match="dtmf keys"):
        FlowNode(dtmf={"x": "a"})


def test_a_definition_has_one_brain() -> None:
    flow = ScriptedFlow(start="a", nodes={"a": FlowNode(say="hi", hangup=True)})
    llm = LLMSpec(base_url="http://127.0.0.1:1/v1", model="m")
    with pytest.raises(ValidationError, match="not both"):
        AgentDefinition(flow=flow, llm=llm)
    assert AgentDefinition(llm=llm).mode == "llm"
    with pytest.raises(ValidationError, match="base_url"):
        LLMSpec(base_url="ftp://x", model="m")
    with pytest.raises(ValidationError):
        AgentDefinition.model_validate({"greeting": "hi", "surprise": 1})
