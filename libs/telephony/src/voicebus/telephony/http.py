"""One retry policy for every carrier REST client.

Connection errors, timeouts and 5xx answers are retried with exponential backoff; 4xx answers are
final and returned to the caller, which knows what they mean for its action. Each attempt times out
and all attempts together stay within ``budget_s``, so a retry never makes the caller wait longer
than it was promised. Messages name the carrier and the method, never the URL's secrets or headers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from voicebus.telephony.calls import CarrierError

log = logging.getLogger("voicebus.telephony.http")


async def send_with_retries(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    label: str,
    headers: dict[str, str] | None = None,
    auth: httpx.Auth | tuple[str, str] | None = None,
    data: Any = None,
    params: Any = None,
    timeout_s: float = 5.0,
    retries: int = 2,
    backoff_s: float = 0.2,
    budget_s: float = 12.0,
) -> httpx.Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    last_error = "was not tried"
    last_status: int | None = None
    attempts = 0
    for attempt in range(max(0, retries) + 1):
        if attempt:
            pause = backoff_s * (2 ** (attempt - 1))
            if deadline - loop.time() <= pause + 0.05:
                break
            await asyncio.sleep(pause)  # backoff between attempts, not a synchronization
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        attempts += 1
        try:
            resp = await http.request(method, url, headers=headers, auth=auth, data=data, params=params,
                                      timeout=httpx.Timeout(min(timeout_s, remaining)))
        except httpx.TimeoutException:
            last_error, last_status = "timed out", None
        except httpx.TransportError as e:
            last_error, last_status = f"unreachable ({type(e).__name__})", None
        else:
            if resp.status_code < 500:
                return resp
            last_error, last_status = f"answered {resp.status_code}", resp.status_code
        log.warning("%s %s attempt %d/%d %s", label, method, attempt + 1, retries + 1, last_error)
    raise CarrierError("carrier_error", f"{label} {method} {last_error} ({attempts} attempt(s))", last_status)
