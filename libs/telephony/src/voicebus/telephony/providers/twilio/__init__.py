"""Twilio: registered so configurations can be stored; media and REST support land in later issues.

Agent Stream is not supported for this provider yet (ingress answers 1011).
"""

from pydantic import BaseModel, ConfigDict, Field

from voicebus.telephony.registry import ProviderSpec, UIField, register


class TwilioCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_sid: str = Field(min_length=1)
    auth_token: str = Field(min_length=1)


SPEC = register(
    ProviderSpec(
        name="twilio",
        display_name="Twilio",
        credentials_model=TwilioCredentials,
        ui_fields=(
            UIField("account_sid", "Account SID"),
            UIField("auth_token", "Auth token", type="password", sensitive=True),
        ),
        account_id_field="account_sid",
    )
)
