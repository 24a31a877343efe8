"""Twilio credentials: what an admin stores for one Twilio account.

Validated strictly at the door because every later use is security-relevant: the Account SID routes
inbound webhooks to one configuration (a typo would route nothing, or someone else's calls), the auth
token is the HMAC key for every signature check, and ``from_numbers`` become the ``From`` of calls
voicebus places, which Twilio refuses unless they are E.164.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

ACCOUNT_SID = re.compile(r"^AC[0-9a-f]{32}$")
E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
MAX_FROM_NUMBERS = 1000


class TwilioCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_sid: str = Field(description="Twilio Account SID: AC followed by 32 hex digits.")
    auth_token: str = Field(min_length=1, max_length=256, repr=False,
                            description="The account's Auth Token: the key of X-Twilio-Signature and REST auth.")
    from_numbers: list[str] = Field(default_factory=list, max_length=MAX_FROM_NUMBERS,
                                    description="E.164 numbers on this account that outbound calls may come from.")
    webhook_shared_key: str = Field(default="", max_length=256, repr=False,
                                    description="Optional SharedKey secret for webhooks Twilio signs with "
                                                "HMAC_SHA256 (X-Twilio-Webhooks-Signature-Settings).")

    @field_validator("account_sid")
    @classmethod
    def _account_sid(cls, v: str) -> str:
        sid = v.strip()
        # Twilio prints SIDs in lower-case hex; accept upper-case hex from a copy-paste but store Twilio's form.
        candidate = sid[:2] + sid[2:].lower() if sid[:2] == "AC" else sid
        if not ACCOUNT_SID.match(candidate):
            raise ValueError("account_sid must be a Twilio Account SID: 'AC' followed by 32 hexadecimal digits")
        return candidate

    @field_validator("from_numbers")
    @classmethod
    def _from_numbers(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for i, raw in enumerate(v):
            number = raw.strip()
            if not E164.match(number):
                shown = number[:20] + ("..." if len(number) > 20 else "")
                raise ValueError(f"from_numbers[{i}] must be an E.164 number such as +14155550100, got {shown!r}")
            if number not in out:
                out.append(number)
        return out
