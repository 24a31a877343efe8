"""Vobiz: registered so configurations can be stored; media and REST support land in later issues.

Agent Stream is not supported for this provider yet (ingress answers 1011).
"""

from pydantic import BaseModel, ConfigDict, Field

from voicebus.telephony.registry import ProviderSpec, UIField, register


class VobizCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    auth_id: str = Field(min_length=1)
    auth_token: str = Field(min_length=1)


SPEC = register(
    ProviderSpec(
        name="vobiz",
        display_name="Vobiz",
        credentials_model=VobizCredentials,
        ui_fields=(
            UIField("auth_id", "Auth ID"),
            UIField("auth_token", "Auth token", type="password", sensitive=True),
        ),
        account_id_field="auth_id",
    )
)
