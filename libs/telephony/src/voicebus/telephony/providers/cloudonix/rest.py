"""The Cloudonix REST calls voicebus makes: session validation and hangup (call-control only).

Both hit one URL, ``{base}/customers/self/domains/{domain}/sessions/{session}``: ``GET`` answers 200
only when the bearer token is valid for the domain *and* the session exists, ``DELETE`` ends the call.

Why this client classifies rather than returns raw responses: call-control answers other services
with stable error codes (``carrier_auth_failed`` vs ``carrier_error``) and must treat "the call is
already gone" (404) as a successful hangup, so every caller would otherwise repeat the same mapping.
Transient failures (connection errors, 5xx) are retried a couple of times because a hangup that
silently fails leaves a caller listening to a dead agent, and both calls are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal
from urllib.parse import quote

import httpx

log = logging.getLogger("voicebus.telephony.cloudonix.rest")

DEFAULT_API_URL = "https://api.cloudonix.io"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_S = 0.2
# Whole-call budgets across retries. Validation runs inside the caller's 10 s handshake deadline and
# ingress waits ~6 s for it; a hangup request is waited on for ~15 s by its callers.
VALIDATE_BUDGET_S = 5.0
HANGUP_BUDGET_S = 12.0

HangupOutcome = Literal["hung_up", "already_ended"]


class CarrierError(Exception):
    """A carrier REST call failed; ``code`` is the bus error code call-control answers with."""

    def __init__(self, code: Literal["carrier_auth_failed", "carrier_error"], message: str,
                 status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class CloudonixClient:
    """Talks to one Cloudonix API with one bearer token; holds no state beyond the shared HTTP client.

    The token lives only in the ``Authorization`` header of each request; it is never part of a
    message, an exception or ``repr`` so it cannot leak into a log line or a bus reply.
    """

    def __init__(
        self,
        base_url: str,
        bearer_token: str,
        http: httpx.AsyncClient,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        validate_budget_s: float = VALIDATE_BUDGET_S,
        hangup_budget_s: float = HANGUP_BUDGET_S,
    ) -> None:
        if not bearer_token:
            raise ValueError("a Cloudonix bearer token is required")
        self.base_url = base_url.rstrip("/")
        self._token = bearer_token
        self._http = http
        self._timeout_s = timeout_s
        self._validate_budget_s = validate_budget_s
        self._hangup_budget_s = hangup_budget_s
        self._retries = max(0, retries)
        self._backoff_s = backoff_s

    def __repr__(self) -> str:
        return f"CloudonixClient(base_url={self.base_url!r})"

    def session_url(self, domain: str, session: str) -> str:
        """Path parts are percent-encoded (``safe=""``) so a session token can never add a path segment."""
        if not domain or not session:
            raise ValueError("domain and session are required")
        return (f"{self.base_url}/customers/self/domains/{quote(domain, safe='')}"
                f"/sessions/{quote(session, safe='')}")

    async def validate_session(self, domain: str, session: str) -> tuple[bool, int]:
        """``(True, 200)`` when the session is live and the token valid for the domain.

        Any definite answer other than 200 (401/403 wrong token, 404 unknown or ended session) is
        ``(False, status)``: the caller refuses the call either way and reports the status. Only an
        unreachable or failing carrier (after retries) raises :class:`CarrierError` ``carrier_error``,
        since then nobody knows the answer.
        """
        resp = await self._send("GET", self.session_url(domain, session), self._validate_budget_s)
        if resp.status_code == 200:
            return True, 200
        log.info("Cloudonix session validation refused: domain=%s status=%s", domain, resp.status_code)
        return False, resp.status_code

    async def hangup(self, domain: str, session: str) -> tuple[HangupOutcome, int]:
        """End the call; a session Cloudonix no longer knows (404) is already over, which is success."""
        resp = await self._send("DELETE", self.session_url(domain, session), self._hangup_budget_s)
        status = resp.status_code
        if status in (200, 202, 204):
            return "hung_up", status
        if status == 404:
            return "already_ended", status
        if status in (401, 403):
            raise CarrierError("carrier_auth_failed",
                               f"Cloudonix rejected the bearer token for domain {domain} ({status})", status)
        raise CarrierError("carrier_error", f"Cloudonix answered {status} to the hangup", status)

    async def _send(self, method: str, url: str, budget_s: float) -> httpx.Response:
        """Send with retries on connection errors and 5xx; 4xx answers are final and returned.

        Each attempt times out after ``timeout_s`` and all of them together stay within ``budget_s``,
        so a retry never makes the caller wait longer than it was promised.
        """
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json",
                   "Accept": "application/json"}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        last_error = "was not tried"
        last_status: int | None = None
        attempts = 0
        for attempt in range(self._retries + 1):
            if attempt:
                pause = self._backoff_s * (2 ** (attempt - 1))
                if deadline - loop.time() <= pause + 0.05:
                    break
                await asyncio.sleep(pause)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            attempts += 1
            try:
                resp = await self._http.request(method, url, headers=headers,
                                                timeout=httpx.Timeout(min(self._timeout_s, remaining)))
            except httpx.TimeoutException:
                last_error, last_status = "timed out", None
            except httpx.TransportError as e:
                last_error, last_status = f"unreachable ({type(e).__name__})", None
            else:
                if resp.status_code < 500:
                    return resp
                last_error, last_status = f"answered {resp.status_code}", resp.status_code
            log.warning("Cloudonix %s attempt %d/%d %s", method, attempt + 1, self._retries + 1, last_error)
        raise CarrierError("carrier_error", f"Cloudonix {method} {last_error} ({attempts} attempt(s))", last_status)
