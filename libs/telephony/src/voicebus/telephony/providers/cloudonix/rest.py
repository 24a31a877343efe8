"""The Cloudonix REST calls voicebus makes: session confirmation and hangup (call-control only).

Both hit one URL, ``{base}/customers/self/domains/{domain}/sessions/{session}``: ``GET`` answers 200
only when the bearer token is valid for the domain *and* the session exists, ``DELETE`` ends the call.

Why this client classifies rather than returns raw responses: call-control answers other services
with stable error codes (``carrier_auth_failed`` vs ``carrier_error``) and must treat "the call is
already gone" (404) as a successful hangup. Transient failures (connection errors, 5xx) are retried a
couple of times because a hangup that silently fails leaves a caller listening to a dead agent, and
both calls are idempotent.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from voicebus.telephony.calls import BindResult, CallInfo, CarrierError, DialRequest, DialResult, HangupOutcome
from voicebus.telephony.http import send_with_retries
from voicebus.telephony.providers.cloudonix.config import CloudonixCredentials

log = logging.getLogger("voicebus.telephony.cloudonix.rest")

DEFAULT_API_URL = "https://api.cloudonix.io"
# Whole-call budgets across retries. Confirmation runs inside the caller's 10 s handshake deadline and
# ingress waits ~6 s for it; a hangup request is waited on for ~15 s by its callers.
CONFIRM_BUDGET_S = 5.0
HANGUP_BUDGET_S = 12.0


class CloudonixClient:
    """Talks to one Cloudonix API for one domain with one bearer token.

    The token lives only in the ``Authorization`` header of each request; it is never part of a
    message, an exception or ``repr`` so it cannot leak into a log line or a bus reply.
    """

    def __init__(self, base_url: str, domain: str, bearer_token: str, http: httpx.AsyncClient, *,
                 timeout_s: float = 5.0, retries: int = 2, backoff_s: float = 0.2,
                 confirm_budget_s: float = CONFIRM_BUDGET_S, hangup_budget_s: float = HANGUP_BUDGET_S) -> None:
        if not bearer_token:
            raise CarrierError("carrier_auth_failed", f"the Cloudonix configuration for {domain} has no bearer_token")
        self.base_url = base_url.rstrip("/")
        self.domain = domain
        self._token = bearer_token
        self._http = http
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._confirm_budget_s = confirm_budget_s
        self._hangup_budget_s = hangup_budget_s

    def __repr__(self) -> str:
        return f"CloudonixClient(base_url={self.base_url!r}, domain={self.domain!r})"

    def session_url(self, session: str) -> str:
        """Path parts are percent-encoded (``safe=""``) so a session token can never add a path segment."""
        if not self.domain or not session:
            raise ValueError("domain and session are required")
        return (f"{self.base_url}/customers/self/domains/{quote(self.domain, safe='')}"
                f"/sessions/{quote(session, safe='')}")

    async def _send(self, method: str, url: str, budget_s: float) -> httpx.Response:
        return await send_with_retries(
            self._http, method, url, label="Cloudonix",
            headers={"Authorization": f"Bearer {self._token}", "Accept": "application/json"},
            timeout_s=self._timeout_s, retries=self._retries, backoff_s=self._backoff_s, budget_s=budget_s)

    async def confirm_call(self, carrier_call_id: str) -> tuple[bool, int]:
        """``(True, 200)`` when the session is live and the token valid for the domain.

        Any definite answer other than 200 (401/403 wrong token, 404 unknown or ended session) is
        ``(False, status)``: the caller refuses the call either way and reports the status. Only an
        unreachable or failing carrier (after retries) raises ``carrier_error``, since then nobody
        knows the answer.
        """
        resp = await self._send("GET", self.session_url(carrier_call_id), self._confirm_budget_s)
        if resp.status_code == 200:
            return True, 200
        log.info("Cloudonix session validation refused: domain=%s status=%s", self.domain, resp.status_code)
        return False, resp.status_code

    async def hangup(self, carrier_call_id: str) -> HangupOutcome:
        """End the call; a session Cloudonix no longer knows (404) is already over, which is success."""
        resp = await self._send("DELETE", self.session_url(carrier_call_id), self._hangup_budget_s)
        status = resp.status_code
        if status in (200, 202, 204):
            return "hung_up"
        if status == 404:
            return "already_ended"
        if status in (401, 403):
            raise CarrierError("carrier_auth_failed",
                               f"Cloudonix rejected the bearer token for domain {self.domain} ({status})", status)
        raise CarrierError("carrier_error", f"Cloudonix answered {status} to the hangup", status)

    async def dial(self, req: DialRequest) -> DialResult:
        raise CarrierError("not_supported", "outbound dialing through Cloudonix is not implemented yet")

    async def call_info(self, carrier_call_id: str) -> CallInfo:
        raise CarrierError("not_supported", "Cloudonix call status queries are not implemented yet")

    async def bind_number(self, number: str, voice_url: str) -> BindResult:
        raise CarrierError("not_supported", "binding numbers through Cloudonix is not implemented yet")


def client(credentials: BaseModel, base_url: str, http: httpx.AsyncClient) -> CloudonixClient:
    """The provider's :data:`~voicebus.telephony.rest.RestFactory`."""
    assert isinstance(credentials, CloudonixCredentials)
    return CloudonixClient(base_url or DEFAULT_API_URL, credentials.domain_id, credentials.bearer_token, http)
