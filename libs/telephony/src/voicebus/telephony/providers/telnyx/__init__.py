"""Telnyx: registered so configurations can be stored; media and REST support land in later issues.

Agent Stream is not supported for this provider yet (ingress answers 1011).
"""

from pydantic import BaseModel, ConfigDict, Field

from voicebus.telephony.registry import ProviderSpec, UIField, register


class TelnyxCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(min_length=1)
    connection_id: str = Field(min_length=1)


SPEC = register(
    ProviderSpec(
        name="telnyx",
        display_name="Telnyx",
        credentials_model=TelnyxCredentials,
        ui_fields=(
            UIField("api_key", "API key", type="password", sensitive=True),
            UIField("connection_id", "Connection ID"),
        ),
        account_id_field="connection_id",
    )
)
