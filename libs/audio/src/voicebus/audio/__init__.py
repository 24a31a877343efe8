"""G.711 codecs and fixed-size framing shared by ingress, the runner and the carrier simulator."""

from voicebus.audio.framing import FrameCutter, frame_bytes
from voicebus.audio.g711 import alaw_to_pcm16, pcm16_to_alaw, pcm16_to_ulaw, ulaw_to_pcm16

__all__ = ["FrameCutter", "alaw_to_pcm16", "frame_bytes", "pcm16_to_alaw", "pcm16_to_ulaw", "ulaw_to_pcm16"]
