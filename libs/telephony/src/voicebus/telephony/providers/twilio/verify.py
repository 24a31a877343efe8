"""X-Twilio-Signature, checked the way Twilio computes it (call-control only: it needs the auth token).

The scheme (https://www.twilio.com/docs/usage/security#validating-requests), as the official SDK's
``twilio.request_validator`` implements it:

- the string signed is the full URL Twilio requested (scheme, host, path, query) followed, for a form
  POST, by every parameter name and value concatenated, names sorted (each name once), values of a
  repeated name sorted (each value once);
- a JSON (or any non-form) body is not concatenated: the URL carries ``bodySHA256`` (hex SHA-256 of the
  raw body), which must match, and the URL alone is signed;
- a GET (webhooks configured as GET, and the Media Streams WebSocket upgrade) signs the URL alone;
- the signature is base64(HMAC-SHA1(auth token, string)); with ``X-Twilio-Webhooks-Signature-Settings:
  key=...,algorithm=HMAC_SHA256`` it is HMAC-SHA256 with the account's shared key;
- Twilio is inconsistent about the default port, so the URL is tried with and without it.

There is no timestamp in the scheme, hence no replay window: replays are caught by the delivery's
``I-Twilio-Idempotency-Token`` (returned as :attr:`Verdict.replay_key`) at the caller.

Written with hmac/hashlib here, not by calling the SDK, so that tests can use the SDK as the
independent check of this code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qs, parse_qsl, urlparse

from pydantic import BaseModel

from voicebus.telephony.providers.twilio.config import TwilioCredentials
from voicebus.telephony.verify import Verdict
from voicebus.telephony.webhook import MAX_WEBHOOK_BODY, WebhookRequest

SIGNATURE_HEADER = "x-twilio-signature"
SETTINGS_HEADER = "x-twilio-webhooks-signature-settings"
IDEMPOTENCY_HEADER = "i-twilio-idempotency-token"
HMAC_SHA1 = "HMAC_SHA1"
HMAC_SHA256 = "HMAC_SHA256"
_HASHES = {HMAC_SHA1: hashlib.sha1, HMAC_SHA256: hashlib.sha256}
MAX_SIGNATURE = 256  # a base64 SHA-256 MAC is 44 characters
MAX_REPLAY_KEY = 256


def signature_algorithm(settings: str | None) -> str:
    """The ``algorithm=`` of the settings header (upper-cased), HMAC_SHA1 when absent."""
    for part in (settings or "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip() == "algorithm" and value.strip():
            return value.strip().upper()
    return HMAC_SHA1


def signed_string(url: str, params: Mapping[str, Sequence[str]]) -> str:
    s = url
    for name in sorted(set(params)):
        for value in sorted(set(params[name])):
            s += name + value
    return s


def compute(key: str, url: str, params: Mapping[str, Sequence[str]], algorithm: str = HMAC_SHA1) -> str:
    mac = hmac.new(key.encode("utf-8"), signed_string(url, params).encode("utf-8"), _HASHES[algorithm])
    return base64.b64encode(mac.digest()).decode("ascii")


def url_variants(url: str) -> tuple[str, str]:
    """``(without port, with port)``, derived exactly as the SDK does (``urlparse(...).geturl()``, default
    port 443 for https and 80 for anything else), so both sides sign the very same strings."""
    parts = urlparse(url)
    if parts.port:  # raises ValueError on a malformed port: a refusal
        host = parts.netloc[: parts.netloc.rfind(":")]
        return parts._replace(netloc=host).geturl(), parts.geturl()
    default = 443 if parts.scheme == "https" else 80
    return parts.geturl(), parts._replace(netloc=f"{parts.netloc}:{default}").geturl()


class TwilioSignatureVerifier:
    """The :class:`~voicebus.telephony.verify.SignatureVerifier` of Twilio. Fails closed on anything odd."""

    def verify(self, req: WebhookRequest, credentials: BaseModel, *, now: float) -> Verdict:
        try:
            return self._verify(req, credentials)
        except Exception as e:  # a malformed request must be a refusal, never a 500 that leaks details
            return Verdict.refuse(f"malformed request ({type(e).__name__})")

    def _verify(self, req: WebhookRequest, credentials: BaseModel) -> Verdict:
        if not isinstance(credentials, TwilioCredentials):
            return Verdict.refuse("the configuration does not hold Twilio credentials")
        signature = (req.header(SIGNATURE_HEADER) or "").strip()
        if not signature:
            return Verdict.refuse("missing X-Twilio-Signature")
        if len(signature) > MAX_SIGNATURE or not signature.isascii():
            return Verdict.refuse("malformed X-Twilio-Signature")
        settings = req.header(SETTINGS_HEADER)
        algorithm = signature_algorithm(settings)
        if algorithm not in _HASHES:
            return Verdict.refuse(f"unsupported signature algorithm {algorithm[:32]!r}")
        # Webhooks signed under signature settings use the account's shared key; without one stored, the
        # auth token is the key (what the SDK does with RequestValidator(auth_token)).
        key = credentials.webhook_shared_key if settings and credentials.webhook_shared_key else credentials.auth_token
        if not key:
            return Verdict.refuse("the Twilio configuration has no auth token")
        if len(req.body) > MAX_WEBHOOK_BODY:
            return Verdict.refuse("body too large")

        params: dict[str, list[str]] = {}
        method = req.method.upper()
        if method not in ("GET", "HEAD"):
            query = parse_qs(urlparse(req.url).query)
            if req.content_type in ("application/x-www-form-urlencoded", ""):
                try:
                    text = req.body.decode("utf-8")
                except UnicodeDecodeError:
                    return Verdict.refuse("form body is not UTF-8")
                for name, value in parse_qsl(text, keep_blank_values=True):
                    params.setdefault(name, []).append(value)
            elif "bodySHA256" in query:
                digest = hashlib.sha256(req.body).hexdigest()
                if not hmac.compare_digest(digest.encode(), query["bodySHA256"][0].strip().encode("utf-8")):
                    return Verdict.refuse("body does not match bodySHA256")
            else:
                return Verdict.refuse(f"a {req.content_type[:60]} body must be signed with bodySHA256 in the URL")

        given = signature.encode("ascii")
        matches = [hmac.compare_digest(compute(key, url, params, algorithm).encode("ascii"), given)
                   for url in url_variants(req.url)]
        if not any(matches):
            return Verdict.refuse("signature does not match")
        replay = (req.header(IDEMPOTENCY_HEADER) or "").strip()[:MAX_REPLAY_KEY] or None
        return Verdict(True, "", replay_key=replay)


VERIFIER = TwilioSignatureVerifier()
