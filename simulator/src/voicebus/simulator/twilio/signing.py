"""Requests signed as Twilio signs them, and what voicebus answered to each.

The signature is the official SDK's :class:`twilio.request_validator.RequestValidator`: base64
HMAC-SHA1 over the full URL followed by every POST parameter name+value, names sorted. Using the SDK
(not voicebus's verifier) keeps the two sides of the check independent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
from twilio.request_validator import RequestValidator

USER_AGENT = "TwilioProxy/1.1"
API_VERSION = "2010-04-01"
Pairs = list[tuple[str, str]]


class _Form(dict[str, list[str]]):
    """Repeated form fields for RequestValidator, which reads them through ``getlist``."""

    def getlist(self, key: str) -> list[str]:
        return self[key]


def _form(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> _Form:
    form = _Form()
    for k, v in (params.items() if isinstance(params, Mapping) else params):
        form.setdefault(k, []).append(v)
    return form


def sign(auth_token: str, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> str:
    """``X-Twilio-Signature`` for a request to ``url`` with form ``params`` (none for GET or the WS upgrade)."""
    return RequestValidator(auth_token).compute_signature(url, _form(params))


def rfc2822(at: datetime | None = None) -> str:
    """Twilio's date format in REST resources and callbacks: ``Tue, 31 Aug 2010 20:36:28 +0000``."""
    return format_datetime(at or datetime.now(UTC)).replace("-0000", "+0000")


def with_query(url: str, params: Pairs) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query))


@dataclass
class SentRequest:
    """One request the simulated Twilio made to voicebus and the answer it got (for inspection)."""

    kind: str  # "webhook", "answer", "status-callback", "stream-callback"
    event: str
    method: str
    url: str
    params: Pairs
    http_status: int | None = None
    error: str | None = None
    body: str = field(default="", repr=False)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "event": self.event, "method": self.method, "url": self.url,
                "params": dict(self.params), "http_status": self.http_status, "error": self.error,
                "at": self.at.isoformat()}


@dataclass(frozen=True)
class Tamper:
    """Negative tests: how a request deviates from what Twilio sends."""

    no_signature: bool = False
    wrong_token: bool = False
    alter_field: str | None = None  # changed after signing


async def send_signed(http: httpx.AsyncClient, kind: str, event: str, url: str, params: Pairs, auth_token: str, *,
                      method: Literal["GET", "POST"] = "POST", idempotency_token: str | None = None,
                      tamper: Tamper = Tamper(), timeout_s: float = 15.0) -> SentRequest:
    """Send ``params`` to ``url`` as Twilio does (form body for POST, query for GET), signed.

    Never raises on HTTP trouble: a failed delivery is recorded in the returned :class:`SentRequest`,
    as Twilio records it in its debugger and goes on with the call.
    """
    target = url if method == "POST" else with_query(url, params)
    signed_params = params if method == "POST" else []
    token = auth_token + "-wrong" if tamper.wrong_token else auth_token
    signature = sign(token, target, signed_params)
    sent = list(params)
    if tamper.alter_field:
        sent = [(k, v + "0" if k == tamper.alter_field else v) for k, v in sent]
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*", "X-Home-Region": "us1",
               "I-Twilio-Idempotency-Token": idempotency_token or str(uuid.uuid4())}
    if not tamper.no_signature:
        headers["X-Twilio-Signature"] = signature
    record = SentRequest(kind, event, method, target, sent)
    try:
        if method == "POST":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            resp = await http.post(target, content=urlencode(sent), headers=headers, timeout=timeout_s)
        else:
            resp = await http.get(target, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    record.http_status, record.body = resp.status_code, resp.text
    return record
