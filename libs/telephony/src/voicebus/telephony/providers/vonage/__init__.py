"""Vonage: registered so configurations can be stored; media and REST support land in later issues.

Agent Stream is not supported for this provider yet (ingress answers 1011).
"""

from pydantic import BaseModel, ConfigDict, Field

from voicebus.telephony.registry import ProviderSpec, UIField, register


class VonageCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    application_id: str = Field(min_length=1)
    private_key: str = Field(min_length=1)
    api_key: str = Field(min_length=1)
    api_secret: str = Field(min_length=1)


SPEC = register(
    ProviderSpec(
        name="vonage",
        display_name="Vonage",
        credentials_model=VonageCredentials,
        ui_fields=(
            UIField("application_id", "Application ID"),
            UIField("private_key", "Private key", type="password", sensitive=True),
            UIField("api_key", "API key"),
            UIField("api_secret", "API secret", type="password", sensitive=True),
        ),
        account_id_field="application_id",
    )
)
