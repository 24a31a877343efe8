"""Twilio: the reference carrier on the provider SPI, every capability implemented.

- ``config``: credentials (Account SID, auth token, E.164 ``from_numbers``).
- ``webhook``: voice webhooks, call and Stream status callbacks, TwiML answers (ingress).
- ``verify``: ``X-Twilio-Signature`` on webhooks and the media socket upgrade (call-control).
- ``rest``: the Calls and IncomingPhoneNumbers APIs (call-control).
- ``handshake``: Media Streams openings on the per-call socket and on Agent Stream (ingress).
- ``fake``: Twilio's side, for the simulator and tests (never imported by services).

docs/carriers.md describes each part against Twilio's documentation.
"""

from voicebus.telephony.dialects.twilio_media import SAMPLE_RATE
from voicebus.telephony.providers.twilio import handshake, rest
from voicebus.telephony.providers.twilio.config import TwilioCredentials
from voicebus.telephony.providers.twilio.verify import VERIFIER
from voicebus.telephony.providers.twilio.webhook import DIALECT
from voicebus.telephony.registry import ProviderSpec, UIField, register
from voicebus.telephony.stream import StreamCapability

__all__ = ["SPEC", "TwilioCredentials"]

SPEC = register(
    ProviderSpec(
        name="twilio",
        display_name="Twilio",
        credentials_model=TwilioCredentials,
        ui_fields=(
            UIField("account_sid", "Account SID", description="AC followed by 32 hex digits (Twilio Console)"),
            UIField("auth_token", "Auth token", type="password", sensitive=True),
            UIField("from_numbers", "Phone numbers", type="string-array", required=False,
                    description="E.164 numbers on this account that outbound calls may come from"),
            UIField("webhook_shared_key", "Webhook shared key", type="password", sensitive=True, required=False,
                    description="Only if Twilio signs this account's webhooks with HMAC_SHA256 and a shared key"),
        ),
        account_id_field="account_sid",
        normalize_account_id=lambda v: v.strip(),
        docs_url="https://www.twilio.com/docs/voice",
        default_api_url=rest.DEFAULT_API_URL,
        stream=StreamCapability(sample_rate=SAMPLE_RATE, agent_stream=handshake.agent_stream,
                                media_socket=handshake.media_socket),
        webhook=DIALECT,
        verifier=VERIFIER,
        rest=rest.client,
        rest_actions=frozenset({"hangup", "confirm_call", "dial", "call_info", "bind_number"}),
        fake="voicebus.telephony.providers.twilio.fake",
    )
)
