"""Cloudonix: TwiML-compatible SIP platform; the first provider with Agent Stream support.

- ``config``: credentials schema and domain normalization.
- ``handshake``: the ``connected``/``start`` exchange on the Agent Stream socket (used by ingress).
- ``media``: Twilio-compatible media framing, both directions (used by ingress and the simulator).
- ``rest``: the Cloudonix REST calls voicebus makes (used by call-control only).
"""

from voicebus.telephony.providers.cloudonix.config import CloudonixCredentials, normalize_domain
from voicebus.telephony.registry import ProviderSpec, UIField, register

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
        supports_agent_stream=True,
        docs_url="https://developers.cloudonix.com/",
    )
)
