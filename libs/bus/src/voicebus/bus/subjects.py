"""NATS subject names (contract version 1).

All subjects hang off one prefix (default ``vb``) so several independent voicebus stacks (a demo, a
test run, staging) can share one NATS cluster without seeing each other's calls or lifecycle events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")

# Queue groups: every replica of a service joins the same group, so NATS delivers each request to one.
RUNNER_QUEUE = "agent-runners"
CONFIG_QUEUE = "config"
CALL_CONTROL_QUEUE = "call-control"


def check_token(value: str, what: str = "subject token") -> str:
    """Refuse anything that could escape its place in a subject (dots, wildcards, spaces)."""
    if not _TOKEN.match(value):
        raise ValueError(f"invalid {what}: {value!r}")
    return value


@dataclass(frozen=True)
class Subjects:
    """Builds every subject of the contract for one deployment prefix."""

    prefix: str = "vb"

    def __post_init__(self) -> None:
        check_token(self.prefix, "subject prefix")

    # -- per-call media and control (core NATS, at-most-once, low latency) --
    def media_in(self, call_id: str) -> str:
        return f"{self.prefix}.call.{check_token(call_id, 'call id')}.media.in"

    def media_out(self, call_id: str) -> str:
        return f"{self.prefix}.call.{check_token(call_id, 'call id')}.media.out"

    def event_in(self, call_id: str) -> str:
        return f"{self.prefix}.call.{check_token(call_id, 'call id')}.event.in"

    def event_out(self, call_id: str) -> str:
        return f"{self.prefix}.call.{check_token(call_id, 'call id')}.event.out"

    def heartbeat(self, call_id: str) -> str:
        return f"{self.prefix}.call.{check_token(call_id, 'call id')}.hb"

    # -- dispatch --
    @property
    def dispatch_offer(self) -> str:
        return f"{self.prefix}.dispatch.offer"

    # -- call-control request-reply --
    def ctl(self, action: str) -> str:
        return f"{self.prefix}.ctl.{check_token(action, 'ctl action')}"

    @property
    def ctl_all(self) -> str:
        return f"{self.prefix}.ctl.*"

    # -- config request-reply --
    def cfg(self, action: str) -> str:
        return f"{self.prefix}.cfg.{action}"

    @property
    def cfg_all(self) -> str:
        return f"{self.prefix}.cfg.>"

    # -- durable lifecycle events (JetStream) --
    def evt(self, name: str) -> str:
        return f"{self.prefix}.evt.{name}"

    @property
    def evt_all(self) -> str:
        return f"{self.prefix}.evt.>"

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_EVENTS"

    # -- durable carrier intents (JetStream work queue; see voicebus.bus.intents) --
    def intent(self, name: str) -> str:
        return f"{self.prefix}.intent.{check_token(name, 'intent')}"

    @property
    def intent_all(self) -> str:
        return f"{self.prefix}.intent.>"

    @property
    def intents_stream(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_INTENTS"

    @property
    def checkpoint_bucket(self) -> str:
        return f"{self.prefix.replace('-', '_')}_checkpoints"

    @property
    def claims_bucket(self) -> str:
        return f"{self.prefix.replace('-', '_')}_call_claims"


# Config request-reply actions (suffixes of ``{prefix}.cfg.``).
CFG_AGENT_RESOLVE = "agent.resolve"
CFG_TELEPHONY_MATCH = "telephony.match"
CFG_TELEPHONY_CREDENTIALS = "telephony.credentials"
CFG_RUN_CREATE = "run.create"
CFG_RUN_UPDATE = "run.update"
CFG_RUN_GET = "run.get"
CFG_QUOTA_ACQUIRE = "quota.acquire"
CFG_QUOTA_RENEW = "quota.renew"
CFG_QUOTA_RELEASE = "quota.release"
CFG_INBOUND_ROUTE = "inbound.route"

# Call-control actions (suffixes of ``{prefix}.ctl.``).
CTL_HANGUP = "hangup"
CTL_LEG_REGISTER = "leg_register"
CTL_VERIFY = "verify"
CTL_TRANSFER = "transfer"
CTL_INITIATE = "initiate"
CTL_CALL_INFO = "call_info"
CTL_BIND_NUMBER = "bind_number"

# Carrier intent names (suffixes of ``{prefix}.intent.``), carried out by call-control.
INTENT_HANGUP = "hangup"

# Lifecycle event names (suffixes of ``{prefix}.evt.``).
EVT_CALL_STARTED = "call.started"
EVT_CALL_ANSWERED = "call.answered"
EVT_CALL_ENDED = "call.ended"
EVT_CALL_FAILED = "call.failed"
EVT_CALL_HANGUP = "call.hangup"
EVT_CALL_STATUS = "call.status"
