"""What the agent's brain (scripted flow or LLM) may ask of the call it runs in.

The brain decides *that* the call ends; the call session decides *how* (goodbye, drain the audio,
``close`` to ingress, hangup intent to call-control). Keeping that behind this small interface lets the
flow processor be tested in a bare pipeline with a recording stand-in.
"""

from __future__ import annotations

from typing import Any, Protocol


class CallControl(Protocol):
    @property
    def ending(self) -> bool:
        """True once an end was requested; the brain stops starting new speech."""
        ...

    async def request_end(self, reason: str, goodbye: str | None = None, *, interrupt: bool = False) -> None:
        """End the call: say ``goodbye`` (not interruptible), let it play out, then hang up.

        ``interrupt`` cuts whatever the agent is saying first (used for the max-duration limit).
        Only the first request counts.
        """
        ...

    def checkpoint(self, *, turn: int, flow_node: str | None = None,
                   messages: list[dict[str, Any]] | None = None) -> None:
        """Record the conversation state after a turn so another runner could resume the call."""
        ...
