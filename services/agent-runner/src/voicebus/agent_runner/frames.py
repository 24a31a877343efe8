"""Frames the runner adds to pipecat's set."""

from __future__ import annotations

from dataclasses import dataclass

from pipecat.frames.frames import ControlFrame, SystemFrame


@dataclass
class PlaybackMarkerFrame(ControlFrame):
    """Sent downstream after speech; the output transport answers it once all audio before it is out.

    It is a control frame, so the TTS service holds it behind the audio it is still generating and the
    output transport's media sender handles it only after writing (pacing) every chunk queued before it.
    That makes its echo, :class:`PlayedOutFrame`, a reliable "the caller has heard it" signal. An
    interruption drops it together with the audio, which is why the flow also listens for interruptions.
    """

    token: int


@dataclass
class PlayedOutFrame(SystemFrame):
    """Upstream echo of a :class:`PlaybackMarkerFrame` from the output transport."""

    token: int
