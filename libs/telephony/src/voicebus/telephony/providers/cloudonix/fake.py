"""Cloudonix's side, for the simulator and tests: the Twilio-framed socket Cloudonix opens (with its
``session``), and its domain rule. Services never import this module (``registry.load_fake``)."""

from voicebus.telephony.dialects.twilio_media_carrier import (
    ServerClear,
    ServerMark,
    ServerMedia,
    ServerMessage,
    ServerOther,
    carrier_connected,
    carrier_dtmf,
    carrier_mark,
    carrier_media,
    carrier_start,
    carrier_start_message,
    carrier_stop,
    parse_server_frame,
)
from voicebus.telephony.providers.cloudonix.config import normalize_domain

__all__ = [
    "ServerClear", "ServerMark", "ServerMedia", "ServerMessage", "ServerOther", "carrier_connected",
    "carrier_dtmf", "carrier_mark", "carrier_media", "carrier_start", "carrier_start_message", "carrier_stop",
    "normalize_domain", "parse_server_frame",
]
