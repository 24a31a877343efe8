"""The Twilio REST calls voicebus makes (call-control only): the Calls and IncomingPhoneNumbers APIs.

Base ``{api_url}/2010-04-01/Accounts/{AccountSid}``, HTTP Basic auth ``AccountSid:AuthToken``, form
bodies, JSON answers (https://www.twilio.com/docs/voice/api/call-resource). Answers are classified
into the carrier-neutral outcomes of :mod:`voicebus.telephony.calls` so call-control can answer other
services with stable codes: a 404 on hangup means the call is already over (success), Twilio's
number-validation error codes become ``carrier_invalid_number`` with Twilio's own explanation, and a
401/403 is ``carrier_auth_failed``.

Creating a call is the one non-idempotent action: it is never retried, because a request that timed
out may still have placed the call and a retry would ring the callee twice.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from voicebus.telephony.calls import BindResult, CallInfo, CarrierError, DialRequest, DialResult, HangupOutcome
from voicebus.telephony.http import send_with_retries
from voicebus.telephony.providers.twilio.config import E164, TwilioCredentials
from voicebus.telephony.providers.twilio.webhook import normalize_status

log = logging.getLogger("voicebus.telephony.twilio.rest")

DEFAULT_API_URL = "https://api.twilio.com"
API_VERSION = "2010-04-01"
CONFIRM_BUDGET_S = 5.0
HANGUP_BUDGET_S = 12.0
DIAL_BUDGET_S = 10.0
STATUS_CALLBACK_EVENTS = ("initiated", "ringing", "answered", "completed")
LIVE_STATUSES = frozenset({"queued", "initiated", "ringing", "in-progress"})
# Twilio error codes that mean "this phone number is wrong for this request"
# (https://www.twilio.com/docs/api/errors): invalid To/From, unverified or unreachable numbers.
INVALID_NUMBER_CODES = frozenset({13223, 13224, 21210, 21211, 21212, 21213, 21214, 21217, 21219, 21401, 21421})
CALL_NOT_IN_PROGRESS = 21220  # updating a call that has already ended
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
MAX_MESSAGE = 200


def _clean(text: Any) -> str:
    s = _UNPRINTABLE.sub("?", str(text))
    return s if len(s) <= MAX_MESSAGE else s[: MAX_MESSAGE - 3] + "..."


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _twilio_error(resp: httpx.Response) -> tuple[int | None, str]:
    body = _json(resp)
    code = body.get("code")
    return (code if isinstance(code, int) else None), _clean(body.get("message") or f"HTTP {resp.status_code}")


class TwilioClient:
    """One Twilio account. The auth token lives only in each request's Authorization header: it is in
    no message, exception or ``repr``."""

    def __init__(self, base_url: str, account_sid: str, auth_token: str, http: httpx.AsyncClient, *,
                 timeout_s: float = 5.0, retries: int = 2, backoff_s: float = 0.2) -> None:
        if not auth_token:
            raise CarrierError("carrier_auth_failed", f"the Twilio configuration for {account_sid} has no auth_token")
        self.api_url = (base_url or DEFAULT_API_URL).rstrip("/")
        self.account_sid = account_sid
        self._auth = (account_sid, auth_token)
        self._http = http
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s

    def __repr__(self) -> str:
        return f"TwilioClient(api_url={self.api_url!r}, account_sid={self.account_sid!r})"

    @property
    def base(self) -> str:
        return f"{self.api_url}/{API_VERSION}/Accounts/{quote(self.account_sid, safe='')}"

    def _call_url(self, call_sid: str) -> str:
        if not call_sid or len(call_sid) > 64:
            raise CarrierError("carrier_error", "a Twilio Call SID is required")
        return f"{self.base}/Calls/{quote(call_sid, safe='')}.json"

    async def _send(self, method: str, url: str, *, budget_s: float, data: Any = None, params: Any = None,
                    retries: int | None = None) -> httpx.Response:
        return await send_with_retries(
            self._http, method, url, label="Twilio", auth=self._auth, headers={"Accept": "application/json"},
            data=data, params=params, timeout_s=self._timeout_s,
            retries=self._retries if retries is None else retries, backoff_s=self._backoff_s, budget_s=budget_s)

    def _fail(self, resp: httpx.Response, action: str) -> CarrierError:
        status = resp.status_code
        code, message = _twilio_error(resp)
        if status in (401, 403):
            return CarrierError("carrier_auth_failed",
                                f"Twilio rejected the credentials of account {self.account_sid} ({status})", status)
        if code in INVALID_NUMBER_CODES:
            return CarrierError("carrier_invalid_number", f"Twilio error {code}: {message}", status)
        shown = f"error {code}: {message}" if code else message
        return CarrierError("carrier_error", f"Twilio answered {status} to {action} ({shown})", status)

    # ------------------------------------------------------------------ actions
    async def hangup(self, carrier_call_id: str) -> HangupOutcome:
        resp = await self._send("POST", self._call_url(carrier_call_id), budget_s=HANGUP_BUDGET_S,
                                data={"Status": "completed"})
        if resp.status_code in (200, 202, 204):
            return "hung_up"
        if resp.status_code == 404:
            return "already_ended"
        if resp.status_code == 400 and _twilio_error(resp)[0] == CALL_NOT_IN_PROGRESS:
            return "already_ended"
        raise self._fail(resp, "the hangup")

    async def confirm_call(self, carrier_call_id: str) -> tuple[bool, int]:
        resp = await self._send("GET", self._call_url(carrier_call_id), budget_s=CONFIRM_BUDGET_S)
        if resp.status_code != 200:
            log.info("Twilio call confirmation refused: account=%s status=%s", self.account_sid, resp.status_code)
            return False, resp.status_code
        status = str(_json(resp).get("status") or "")
        return status in LIVE_STATUSES, 200

    async def dial(self, req: DialRequest) -> DialResult:
        for name, number in (("to", req.to_number), ("from", req.from_number)):
            if not E164.match(number or ""):
                raise CarrierError("carrier_invalid_number", f"the {name} number must be E.164, such as +14155550100")
        data = {
            "To": req.to_number,
            "From": req.from_number,
            "Url": req.answer_url,
            "Method": "POST",
            "StatusCallback": req.status_url,
            "StatusCallbackMethod": "POST",
            "StatusCallbackEvent": list(STATUS_CALLBACK_EVENTS),
            "Timeout": str(req.ring_timeout_s),
        }
        resp = await self._send("POST", f"{self.base}/Calls.json", budget_s=DIAL_BUDGET_S, data=data, retries=0)
        if resp.status_code in (200, 201):
            body = _json(resp)
            sid = body.get("sid")
            if not isinstance(sid, str) or not sid:
                raise CarrierError("carrier_error", "Twilio created a call but its answer has no sid", resp.status_code)
            status = body.get("status")
            return DialResult(carrier_call_id=sid, status=status if isinstance(status, str) else None,
                              raw={k: body[k] for k in ("sid", "status", "direction", "to", "from") if k in body})
        raise self._fail(resp, "the call creation")

    async def call_info(self, carrier_call_id: str) -> CallInfo:
        resp = await self._send("GET", self._call_url(carrier_call_id), budget_s=CONFIRM_BUDGET_S)
        if resp.status_code != 200:
            raise self._fail(resp, "the call status query")
        body = _json(resp)
        raw_status = str(body.get("status") or "")
        duration = body.get("duration")
        price = body.get("price")
        try:
            duration_s = int(duration) if duration not in (None, "") else None
            price_value = abs(float(price)) if price not in (None, "") else None
        except (TypeError, ValueError) as e:
            raise CarrierError("carrier_error", "Twilio answered a call with a malformed duration or price") from e
        unit = body.get("price_unit")
        return CallInfo(carrier_call_id=str(body.get("sid") or carrier_call_id), status=normalize_status(raw_status),
                        raw_status=raw_status, duration_s=duration_s, price=price_value,
                        price_unit=unit if isinstance(unit, str) else None)

    async def bind_number(self, number: str, voice_url: str) -> BindResult:
        if not E164.match(number or ""):
            raise CarrierError("carrier_invalid_number", "the number must be E.164, such as +14155550100")
        resp = await self._send("GET", f"{self.base}/IncomingPhoneNumbers.json", budget_s=CONFIRM_BUDGET_S,
                                params={"PhoneNumber": number})
        if resp.status_code != 200:
            raise self._fail(resp, "the phone number lookup")
        listed = _json(resp).get("incoming_phone_numbers")
        rows = [n for n in listed if isinstance(n, dict)] if isinstance(listed, list) else []
        sid = next((n.get("sid") for n in rows if n.get("phone_number") == number), None)
        if not isinstance(sid, str) or not sid:
            raise CarrierError("carrier_invalid_number", f"number {number} is not on this Twilio account")
        resp = await self._send("POST", f"{self.base}/IncomingPhoneNumbers/{quote(sid, safe='')}.json",
                                budget_s=HANGUP_BUDGET_S, data={"VoiceUrl": voice_url, "VoiceMethod": "POST"})
        if resp.status_code != 200:
            raise self._fail(resp, "the phone number update")
        bound = _json(resp).get("voice_url")
        return BindResult(number=number, number_sid=sid, voice_url=bound if isinstance(bound, str) else voice_url)


def client(credentials: BaseModel, base_url: str, http: httpx.AsyncClient) -> TwilioClient:
    """The provider's :data:`~voicebus.telephony.rest.RestFactory`."""
    if not isinstance(credentials, TwilioCredentials):
        raise CarrierError("carrier_error", "the configuration does not hold Twilio credentials")
    return TwilioClient(base_url or DEFAULT_API_URL, credentials.account_sid, credentials.auth_token, http)
