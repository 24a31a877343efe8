"""Cloudonix credentials and domain normalization."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


def normalize_domain(value: str) -> str:
    """``Acme.`` -> ``acme.cloudonix.net``; a fully qualified domain is kept (lower-cased).

    Cloudonix accepts a bare domain name and its ``.cloudonix.net`` form interchangeably, so both
    the stored configuration and the ``Domain`` on the URL are normalized the same way before matching.
    """
    v = value.strip().rstrip(".").lower()
    if not v:
        return ""
    return v if "." in v else f"{v}.cloudonix.net"


class CloudonixCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domain_id: str = Field(min_length=1, max_length=253)
    bearer_token: str = Field(default="", max_length=4096)

    @field_validator("domain_id")
    @classmethod
    def _domain(cls, v: str) -> str:
        d = normalize_domain(v)
        if not d or any(c.isspace() or c in "/?#" for c in d):
            raise ValueError("domain_id must be a domain name such as acme.cloudonix.net")
        return d
