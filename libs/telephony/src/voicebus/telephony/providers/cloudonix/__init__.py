"""Cloudonix: TwiML-compatible SIP platform; Agent Stream over Twilio Media Streams framing.

- ``config``: credentials schema and domain normalization.
- ``handshake``: the ``connected``/``start`` exchange on the Agent Stream socket (ingress).
- ``rest``: session confirmation and hangup (call-control).
- ``fake``: Cloudonix's side, for the simulator and tests.
"""

from voicebus.telephony.dialects.twilio_media import SAMPLE_RATE
from voicebus.telephony.providers.cloudonix import handshake, rest
from voicebus.telephony.providers.cloudonix.config import CloudonixCredentials, normalize_domain
from voicebus.telephony.registry import ProviderSpec, UIField, register
from voicebus.telephony.stream import StreamCapability

SPEC = register(
    ProviderSpec(
        name="cloudonix",
        display_name="Cloudonix",
        credentials_model=CloudonixCredentials,
        ui_fields=(
            UIField("domain_id", "Domain", description="Cloudonix domain, e.g. acme.cloudonix.net"),
            UIField("bearer_token", "API bearer token", type="password", sensitive=True),
        ),
        account_id_field="domain_id",
        normalize_account_id=normalize_domain,
        docs_url="https://developers.cloudonix.com/",
        default_api_url=rest.DEFAULT_API_URL,
        stream=StreamCapability(sample_rate=SAMPLE_RATE, agent_stream=handshake.agent_stream),
        rest=rest.client,
        rest_actions=frozenset({"hangup", "confirm_call"}),
        fake="voicebus.telephony.providers.cloudonix.fake",
    )
)
