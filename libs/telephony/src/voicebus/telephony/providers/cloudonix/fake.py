"""Cloudonix's side, for the simulator and tests: the Twilio-framed socket Cloudonix opens (with its
``session``), and its domain rule. Services never import this module (``registry.load_fake``)."""

from voicebus.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voicebus.telephony.contract import ContractKit, Exchange, RestCase, SentFrame, StreamOpening
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
from voicebus.telephony.providers.cloudonix.config import CloudonixCredentials, normalize_domain
from voicebus.telephony.stream import Frame

__all__ = [
    "CONTRACT", "ServerClear", "ServerMark", "ServerMedia", "ServerMessage", "ServerOther", "carrier_connected",
    "carrier_dtmf", "carrier_mark", "carrier_media", "carrier_start", "carrier_start_message", "carrier_stop",
    "normalize_domain", "parse_server_frame",
]


# --------------------------------------------------------------------------- the contract kit
# Cloudonix has no webhook signatures and no answer markup here (Agent Stream only): its kit covers the
# stream and the two REST actions it implements.

_DOMAIN = "acme.cloudonix.net"
_TOKEN = "cloudonix-contract-bearer-0001"
_SESSION = "sess-contract-1"
_STREAM = "MZcontract1"
_SESSION_PATH = rf"/customers/self/domains/{_DOMAIN}/sessions/{_SESSION}"


def _agent_stream_opening() -> StreamOpening:
    start = carrier_start(stream_sid=_STREAM, call_sid="CAcontract1", account_sid=_DOMAIN, session=_SESSION,
                          from_number="+15550001", to_number="+15550002", context="inbound")
    return StreamOpening(frames=(carrier_connected(), start), carrier_call_ref=_SESSION, stream_id=_STREAM,
                         params={"provider": "cloudonix", "Domain": "acme"}, account_id=_DOMAIN)


def _media_frame(pcm16: bytes, seq: int) -> Frame:
    return carrier_media(_STREAM, pcm16_to_ulaw(pcm16), seq, timestamp_ms=seq * 20)


def _parse_sent(frame: Frame) -> SentFrame:
    msg = parse_server_frame(frame)
    if isinstance(msg, ServerMedia):
        return SentFrame("media", pcm16=msg.pcm16)
    if isinstance(msg, ServerClear):
        return SentFrame("clear")
    if isinstance(msg, ServerMark):
        return SentFrame("mark", name=msg.name)
    return SentFrame("other")


CONTRACT = ContractKit(
    provider="cloudonix",
    credentials=CloudonixCredentials(domain_id="acme", bearer_token=_TOKEN),
    agent_stream_opening=_agent_stream_opening,
    media_frame=_media_frame,
    parse_sent=_parse_sent,
    audio_sample=ulaw_to_pcm16(bytes(range(256)) * 2),
    rest_cases=(
        RestCase("hangup", "hangup", (_SESSION,), (Exchange("DELETE", _SESSION_PATH, 204),), "hung_up"),
        RestCase("hangup of an ended session", "hangup", (_SESSION,), (Exchange("DELETE", _SESSION_PATH, 404),),
                 "already_ended"),
        RestCase("hangup with a wrong token", "hangup", (_SESSION,), (Exchange("DELETE", _SESSION_PATH, 401),),
                 error="carrier_auth_failed"),
        RestCase("confirm a live session", "confirm_call", (_SESSION,),
                 (Exchange("GET", _SESSION_PATH, 200, {"token": _SESSION, "domain": _DOMAIN}),), (True, 200)),
        RestCase("confirm an unknown session", "confirm_call", (_SESSION,), (Exchange("GET", _SESSION_PATH, 404),),
                 (False, 404)),
    ),
    auth_header=f"Bearer {_TOKEN}",
)
