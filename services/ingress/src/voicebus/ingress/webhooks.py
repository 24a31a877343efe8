"""Carrier webhooks: verify -> parse -> route -> answer markup that points at a per-call media socket.

- ``POST /api/v1/telephony/inbound/run``: any carrier; the provider is detected from the request.
- ``POST /api/v1/telephony/answer/{run_id}``: the answer URL of an outbound call voicebus placed.
- ``POST /api/v1/telephony/{provider}/status-callback/{run_id}``: status callbacks, normalized onto the bus.
- Paths a carrier's documentation uses (Twilio's ``/twiml``) are mounted from the registry
  (``WebhookDialect.aliases``), never written here.

Ingress holds no carrier secret: every signature is checked by call-control (``ctl.verify``), and
nothing is created before it says yes. Answers a carrier can play (unknown number, busy) are markup
in the carrier's language; answers meant for whoever is probing (bad signature, malformed request)
are plain HTTP errors with a specific reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from voicebus.bus.messages import (
    CallStatusEvent,
    LegRegister,
    QuotaLease,
    ResolvedAgent,
    RunCreate,
    RunRecord,
    RunUpdate,
)
from voicebus.bus.rpc import BusError
from voicebus.ingress.admission import new_call_id, run_name
from voicebus.ingress.bus import SOURCE, BusClient
from voicebus.ingress.close_codes import CLOSE_POLICY, Refusal
from voicebus.ingress.live_call import publish_end
from voicebus.ingress.pending import PendingCall, new_token, token_hash
from voicebus.telephony import ProviderSpec, all_specs, get_spec
from voicebus.telephony.stream import echo_safe
from voicebus.telephony.webhook import (
    MAX_WEBHOOK_BODY,
    InboundCall,
    MediaSocket,
    WebhookParseError,
    WebhookRequest,
)

if TYPE_CHECKING:
    from voicebus.ingress.service import IngressService

log = logging.getLogger("voicebus.ingress.webhooks")

PREFIX = "/api/v1/telephony"
UNKNOWN_ACCOUNT_SAY = "This number is not configured. Goodbye."
UNKNOWN_NUMBER_SAY = "The number you called is not configured. Goodbye."
NO_AGENT_SAY = "This number has no agent. Goodbye."
BUSY_SAY = "All our lines are busy. Please call again later."
UNAVAILABLE_SAY = "We cannot take your call right now. Please try again later."
ENDED_SAY = "This call has already ended. Goodbye."


class WebhookError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def response(self) -> Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return PlainTextResponse(self.message, status_code=self.status, headers=headers)


def _markup(spec: ProviderSpec, message: str, status: int = 200, retry_after: int | None = None) -> Response:
    assert spec.webhook is not None
    m = spec.webhook.answer_refusal(message)
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return Response(m.body, media_type=m.media_type, status_code=status, headers=headers)


class Webhooks:
    def __init__(self, service: IngressService) -> None:
        self.svc = service
        self._keepers: set[asyncio.Task[None]] = set()

    @property
    def bus(self) -> BusClient:
        return self.svc.bus

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.post(PREFIX + "/inbound/run")
        async def inbound_run(request: Request) -> Response:
            return await self._guard(self.inbound(await self._request(request)))

        @router.post(PREFIX + "/answer/{run_id}")
        async def answer(run_id: int, request: Request) -> Response:
            return await self._guard(self.outbound_answer(run_id, await self._request(request)))

        @router.post(PREFIX + "/{provider}/status-callback/{run_id}")
        async def status_callback(provider: str, run_id: int, request: Request) -> Response:
            return await self._guard(self.status(provider, run_id, await self._request(request)))

        for spec in all_specs():
            if spec.webhook is None:
                continue
            for path, kind in spec.webhook.aliases.items():
                if kind == "answer":
                    router.add_api_route(PREFIX + "/" + path, self._alias_answer(spec), methods=["POST"])
        return router

    def _alias_answer(self, spec: ProviderSpec) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            req = await self._request(request)
            run_id = request.query_params.get("run_id")
            if run_id is not None:
                if not run_id.isdigit():
                    return PlainTextResponse("run_id must be a number", status_code=400)
                return await self._guard(self.outbound_answer(int(run_id), req, provider=spec.name))
            return await self._guard(self.inbound(req, provider=spec.name))

        return endpoint

    async def stop(self) -> None:
        for task in list(self._keepers):
            task.cancel()
        for task in list(self._keepers):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ plumbing
    async def _request(self, request: Request) -> WebhookRequest | WebhookError:
        """The request as the carrier signed it, read with a size limit (413 past it)."""
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_WEBHOOK_BODY:
                return WebhookError(413, f"Request body larger than {MAX_WEBHOOK_BODY} bytes")
        public = self.svc.settings.public_url
        url = str(request.url)
        if public:
            url = public.rstrip("/") + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k.lower(): v for k, v in request.headers.items()}
        return WebhookRequest(request.method, url, headers, bytes(body))

    async def _guard(self, handler: Awaitable[Response]) -> Response:
        try:
            return await handler
        except WebhookError as e:
            return e.response()

    async def _verify(self, telephony_config_id: int, req: WebhookRequest, what: str,
                      allow_replay: bool = False) -> None:
        """Signature checked by call-control; a replayed delivery is refused unless ``allow_replay``."""
        try:
            verdict = await self.bus.verify(telephony_config_id, req)
        except BusError as e:
            log.warning("%s: signature check unavailable (%s)", what, e.code)
            raise WebhookError(503, "Signature check unavailable; retry", retry_after=1) from e
        if not verdict.valid:
            log.warning("%s refused: %s", what, verdict.reason)
            raise WebhookError(403, f"Signature validation failed: {verdict.reason}")
        if verdict.replayed and not allow_replay:
            log.warning("%s refused: replayed delivery", what)
            raise WebhookError(409, "Replayed request: this delivery was already handled")

    # ------------------------------------------------------------------ inbound
    def _detect(self, req: WebhookRequest, provider: str | None) -> ProviderSpec:
        if provider is not None:
            spec = get_spec(provider)
            assert spec is not None and spec.webhook is not None
            return spec
        for spec in all_specs():
            if spec.webhook is not None and spec.webhook.detect(req):
                return spec
        raise WebhookError(400, "Unrecognized carrier webhook: no provider recognizes this request")

    async def inbound(self, req: WebhookRequest | WebhookError, provider: str | None = None) -> Response:
        if isinstance(req, WebhookError):
            raise req
        spec = self._detect(req, provider)
        assert spec.webhook is not None
        try:
            call = spec.webhook.parse_inbound(req)
        except WebhookParseError as e:
            raise WebhookError(400, f"Malformed {spec.display_name} webhook: {e}") from e
        if call.direction != "inbound":
            raise WebhookError(400, f"Not an inbound call (direction {echo_safe(call.direction)})")
        account = spec.normalize_account_id(call.account_id)
        try:
            route = await self.bus.inbound_route(spec.name, account, call.to_number or "")
        except BusError as e:
            said = {"unknown_account": UNKNOWN_ACCOUNT_SAY, "unknown_number": UNKNOWN_NUMBER_SAY,
                    "not_found": NO_AGENT_SAY}.get(e.code)
            if said is None:
                log.warning("inbound %s call: routing unavailable (%s)", spec.name, e.code)
                return _markup(spec, UNAVAILABLE_SAY, 503, retry_after=1)
            log.warning("inbound %s call refused (%s): account %s, called number %s", spec.name, e.code,
                        echo_safe(account, 64), echo_safe(call.to_number or "-", 24))
            return _markup(spec, said)
        await self._verify(route.telephony_config_id, req, f"inbound {spec.name} webhook")

        call_id = new_call_id()
        try:
            lease = await self.bus.acquire_quota(route.organization_id, holder=call_id)
        except Refusal as e:
            if e.code == CLOSE_POLICY:
                log.info("inbound %s call refused: organization %s at its concurrent call limit", spec.name,
                         route.organization_id)
                return _markup(spec, BUSY_SAY)
            return _markup(spec, UNAVAILABLE_SAY, 503, retry_after=1)
        try:
            run = await self._create_inbound_run(spec, call, route.telephony_config_id, route.agent, lease, call_id)
        except (Refusal, BusError):
            await self.bus.release_quota(lease.organization_id, lease.lease_id)
            return _markup(spec, UNAVAILABLE_SAY, 503, retry_after=1)
        try:
            await self.bus.register_leg(LegRegister(
                call_id=call_id, run_id=run.id, organization_id=run.organization_id,
                telephony_config_id=route.telephony_config_id, carrier_call_id=call.carrier_call_id))
        except BusError as e:
            log.warning("call %s: ctl.leg_register failed: %s", call_id, e)
            await publish_end(self.bus, call_id, run, "failed", "call-control unavailable", lease.lease_id)
            await self.bus.release_quota(lease.organization_id, lease.lease_id)
            return _markup(spec, UNAVAILABLE_SAY, 503, retry_after=1)
        log.info("call %s: run %s created for inbound %s call", call_id, run.id, spec.name)
        return await self._answer(spec, call_id, run, route.telephony_config_id, route.agent.agent_uuid, lease,
                                  "inbound", call.from_number, call.to_number, call)

    async def _create_inbound_run(self, spec: ProviderSpec, call: InboundCall, telephony_config_id: int,
                                  agent: ResolvedAgent, lease: QuotaLease, call_id: str) -> RunRecord:
        initial = {"caller_number": call.from_number, "called_number": call.to_number, "direction": "inbound",
                   "provider": spec.name, "telephony_configuration_id": telephony_config_id}
        run = await self.bus.create_run(RunCreate(
            organization_id=agent.organization_id, agent_uuid=agent.agent_uuid, name=run_name("WR-TEL-IN"),
            call_type="inbound", mode=spec.name, call_id=call_id, agent_version=agent.version,
            definition_source=agent.definition_source,
            initial_context={k: v for k, v in initial.items() if v is not None},
            gathered_context={"call_id": call.carrier_call_id},
            logs={"inbound_webhook": {"account_id": call.account_id, **call.fields}},
            quota_lease_id=lease.lease_id,
        ))
        return await self.bus.update_run(RunUpdate(run_id=run.id, telephony_configuration_id=telephony_config_id))

    # ------------------------------------------------------------------ outbound answer
    async def outbound_answer(self, run_id: int, req: WebhookRequest | WebhookError,
                              provider: str | None = None) -> Response:
        if isinstance(req, WebhookError):
            raise req
        run = await self._run(run_id)
        spec = get_spec(run.mode)
        if run.call_type != "outbound" or spec is None or spec.webhook is None or (provider and provider != spec.name):
            raise WebhookError(404, f"Run {run_id} is not an outbound call of this provider")
        if run.telephony_configuration_id is None:
            raise WebhookError(409, f"Run {run_id} has no telephony configuration")
        # A carrier retries an answer whose reply it lost: answering again is safe while the run still waits
        # for its socket (the new token replaces the old one), so a replay is not refused here.
        await self._verify(run.telephony_configuration_id, req, f"outbound {spec.name} answer", allow_replay=True)
        if run.state != "created" or not run.quota_lease_id or not run.call_id:
            log.warning("run %s answered in state %s; refusing", run.id, run.state)
            return _markup(spec, ENDED_SAY)
        try:
            agent = await self.bus.resolve_agent(run.agent_uuid)
        except Refusal as e:
            await publish_end(self.bus, run.call_id, run, "failed", e.reason, run.quota_lease_id)
            return _markup(spec, NO_AGENT_SAY)
        try:  # renewing also tells us the lease's TTL, which the socket's renewal must beat
            lease = await self.bus.renew_quota(run.organization_id, run.quota_lease_id)
        except BusError as e:
            log.warning("run %s answered but its quota lease could not be renewed (%s)", run.id, e.code)
            if e.code in ("lease_expired", "not_found"):
                await publish_end(self.bus, run.call_id, run, "failed", "quota lease expired before answer",
                                  run.quota_lease_id)
                return _markup(spec, ENDED_SAY)
            return _markup(spec, UNAVAILABLE_SAY, 503, retry_after=1)
        initial = run.initial_context
        return await self._answer(spec, run.call_id, run, run.telephony_configuration_id, agent.agent_uuid, lease,
                                  "outbound", initial.get("caller_number"), initial.get("called_number"), None)

    async def _run(self, run_id: int) -> RunRecord:
        try:
            run = await self.bus.get_run(run_id)
        except BusError as e:
            raise WebhookError(503, "Run lookup unavailable; retry", retry_after=1) from e
        if run is None:
            raise WebhookError(404, f"Unknown run {run_id}")
        return run

    # ------------------------------------------------------------------ the answer: a media socket
    async def _answer(self, spec: ProviderSpec, call_id: str, run: RunRecord, telephony_config_id: int,
                      agent_uuid: str, lease: QuotaLease, direction: str, caller: str | None, called: str | None,
                      call: InboundCall | None) -> Response:
        assert spec.webhook is not None
        settings = self.svc.settings
        token = new_token()
        await self.svc.pending.put(PendingCall(
            call_id=call_id, run_id=run.id, organization_id=run.organization_id, agent_uuid=agent_uuid,
            provider=spec.name, telephony_config_id=telephony_config_id, lease_id=lease.lease_id,
            lease_ttl_s=lease.ttl_s, direction=direction,  # type: ignore[arg-type]
            caller_number=caller, called_number=called, token_sha256=token_hash(token),
            expires_at=time.time() + settings.media_token_ttl_s,
        ))
        self._keep_lease_while_pending(call_id, lease)
        base = self.svc.public_base()
        socket = MediaSocket(url=base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
                             + f"{PREFIX}/media/{call_id}",
                             token=token, status_url=f"{base}{PREFIX}/{spec.name}/status-callback/{run.id}")
        markup = spec.webhook.answer_stream(socket, call)
        return Response(markup.body, media_type=markup.media_type, status_code=markup.status_code)

    def _keep_lease_while_pending(self, call_id: str, lease: QuotaLease) -> None:
        """Renew the slot until the carrier opens the socket (which then keeps it) or the token expires."""
        async def keep() -> None:
            deadline = time.monotonic() + self.svc.settings.media_token_ttl_s + 5
            while time.monotonic() < deadline:
                await asyncio.sleep(max(lease.ttl_s / 3, 0.05))  # a timer, not a synchronization
                if not await self.svc.pending.still_waiting(call_id):
                    return
                with contextlib.suppress(BusError):
                    await self.bus.renew_quota(lease.organization_id, lease.lease_id)

        task = asyncio.create_task(keep(), name=f"pending-lease-{call_id}")
        self._keepers.add(task)
        task.add_done_callback(self._keepers.discard)

    # ------------------------------------------------------------------ status callbacks
    async def status(self, provider: str, run_id: int, req: WebhookRequest | WebhookError) -> Response:
        if isinstance(req, WebhookError):
            raise req
        spec = get_spec(provider)
        if spec is None or spec.webhook is None:
            raise WebhookError(404, f"Unknown provider {echo_safe(provider)}")
        run = await self._run(run_id)
        if run.mode != spec.name or run.telephony_configuration_id is None or not run.call_id:
            raise WebhookError(404, f"Run {run_id} is not a {spec.display_name} call")
        await self._verify(run.telephony_configuration_id, req, f"{spec.name} status callback")
        try:
            update = spec.webhook.parse_status(req)
        except WebhookParseError as e:
            raise WebhookError(400, f"Malformed {spec.display_name} status callback: {e}") from e
        digest = hashlib.sha256(req.body).hexdigest()[:32]
        try:
            await self.bus.call_status(CallStatusEvent(
                event_id=f"{run.call_id}.status.{digest}", call_id=run.call_id, run_id=run.id,
                organization_id=run.organization_id, source=SOURCE, status=update.status,
                raw_status=update.raw_status, duration_s=update.duration_s, fields=update.fields))
        except Exception as e:
            log.warning("run %s: status callback not recorded: %s", run.id, e)
            raise WebhookError(503, "Status not recorded; retry", retry_after=1) from e
        log.info("run %s: %s status %s (%s)", run.id, spec.name, update.status, echo_safe(update.raw_status, 24))
        return Response(status_code=204)
