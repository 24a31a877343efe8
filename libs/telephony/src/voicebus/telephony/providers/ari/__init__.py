"""Asterisk ARI: registered so configurations can be stored; media and REST support land in later issues.

Agent Stream is not supported for this provider yet (ingress answers 1011).
"""

from pydantic import BaseModel, ConfigDict, Field

from voicebus.telephony.registry import ProviderSpec, UIField, register


class AriCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ari_endpoint: str = Field(min_length=1)
    app_name: str = Field(min_length=1)
    app_password: str = Field(min_length=1)


SPEC = register(
    ProviderSpec(
        name="ari",
        display_name="Asterisk ARI",
        credentials_model=AriCredentials,
        ui_fields=(
            UIField("ari_endpoint", "ARI endpoint"),
            UIField("app_name", "Stasis app name"),
            UIField("app_password", "ARI password", type="password", sensitive=True),
        ),
        account_id_field="ari_endpoint",
    )
)
