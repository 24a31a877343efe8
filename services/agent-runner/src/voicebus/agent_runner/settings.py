"""Runner settings from the environment (``VOICEBUS_RUNNER_*`` plus the shared service settings)."""

from __future__ import annotations

import os
import socket
import uuid

from pydantic import AliasChoices, Field

from voicebus.kit import ServiceSettings


class RunnerSettings(ServiceSettings):
    capacity: int = Field(
        default=4, ge=1, le=256, validation_alias=AliasChoices("VOICEBUS_RUNNER_CAPACITY", "capacity"),
        description="Calls this process runs at once; it takes offers only while below this.",
    )
    port: int = Field(default=8082, ge=0, le=65535, validation_alias=AliasChoices("VOICEBUS_RUNNER_PORT", "port"))
    media_timeout_s: float = Field(
        default=5.0, gt=0, validation_alias=AliasChoices("VOICEBUS_RUNNER_MEDIA_TIMEOUT_S", "media_timeout_s"),
        description="No media.in for this long means the ingress holding the call is gone.",
    )
    drain_timeout_s: float = Field(
        default=600.0, ge=0, validation_alias=AliasChoices("VOICEBUS_RUNNER_DRAIN_TIMEOUT_S", "drain_timeout_s"),
        description="On SIGTERM, how long running calls may take to finish before they are ended.",
    )
    handover_on_drain: bool = Field(
        default=True, validation_alias=AliasChoices("VOICEBUS_RUNNER_HANDOVER", "handover_on_drain"),
        description="At the drain deadline, hand the calls still running to other runners (they resume from "
                    "the checkpoint) instead of ending them.",
    )
    runner_id: str | None = Field(
        default=None, validation_alias=AliasChoices("VOICEBUS_INSTANCE_ID", "runner_id"),
        description="Names this runner in heartbeats and CallAnswered; generated when unset.",
    )
    warm_models: bool = Field(
        default=True, validation_alias=AliasChoices("VOICEBUS_RUNNER_WARM", "warm_models"),
        description="Load the default Piper voice and Silero VAD at start instead of on the first call.",
    )

    def resolved_runner_id(self) -> str:
        """``VOICEBUS_INSTANCE_ID``, else hostname-pid-random.

        Deliberately not ``HOSTNAME`` alone: two processes on one host (the e2e suite, a local demo) would
        share it, and ingress could not tell their heartbeats apart.
        """
        if self.runner_id:
            return self.runner_id
        return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
