"""call-control on real NATS: the Cloudonix stand-in and a test-only carrier on real HTTP, a fake config.

The test-only carrier (``Fake…``) exists so call-control's generic paths (dial, call status, number
binding, signatures with a replay key) are tested against a carrier that has every capability,
independently of any real provider package. Its signature scheme is deliberately not Twilio's:
HMAC-SHA256 over ``METHOD\\nURL\\nBODY`` in ``X-Fake-Signature``, a delivery id in ``X-Fake-Delivery``.
The signing side (:func:`sign`) and the verifying side (:class:`FakeVerifier`) are written separately.
Its spec is registered under a unique name per test and removed afterwards, so provider listings in
other test modules of the same session never see it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl

import httpx
import nats
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError
from pydantic import BaseModel, ConfigDict, Field

from voicebus.bus.messages import (
    HangupRequest,
    HangupResult,
    LegRegister,
    LegRegistered,
    RunGetRequest,
    RunRecord,
    TelephonyCredentials,
    TelephonyCredentialsRequest,
)
from voicebus.bus.rpc import BusError, request, serve
from voicebus.bus.subjects import (
    CFG_RUN_GET,
    CFG_TELEPHONY_CREDENTIALS,
    CONFIG_QUEUE,
    CTL_HANGUP,
    CTL_LEG_REGISTER,
    Subjects,
)
from voicebus.call_control.carriers import Carriers
from voicebus.call_control.legs import legs_bucket
from voicebus.call_control.service import CallControlService, actions_bucket, replay_bucket
from voicebus.simulator._server import RunningServer, serve_app
from voicebus.simulator.cloudonix_api import RunningCloudonixApi, run_cloudonix_api
from voicebus.telephony import registry
from voicebus.telephony.calls import BindResult, CallInfo, CarrierError, DialRequest, DialResult, HangupOutcome
from voicebus.telephony.http import send_with_retries
from voicebus.telephony.registry import ProviderSpec, UIField
from voicebus.telephony.verify import Verdict
from voicebus.telephony.webhook import WebhookRequest

DOMAIN = "acme.cloudonix.net"
TOKEN = "tok-3c1f0a9e5b7d"
ORG = 7
CONFIG_ID = 11
FAKE_CONFIG_ID = 21
FAKE_KEY = "key-5e6f7a8b9c0d"
FAKE_SECRET = "sig-0a1b2c3d4e5f"
FAKE_FROM = ["+15550100001", "+15550100002"]
PUBLIC_URL = "https://voice.example.test"
R = TypeVar("R", bound=BaseModel)


SIGNATURE_HEADER = "x-fake-signature"
DELIVERY_HEADER = "x-fake-delivery"


class FakeCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(min_length=1)
    signing_secret: str = Field(min_length=1)
    from_numbers: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------ the carrier's side (HTTP server)
@dataclass
class FakeCall:
    id: str
    to: str
    from_: str
    answer_url: str
    status_url: str
    timeout: int
    status: str = "queued"


@dataclass
class FakeCarrier:
    api_key: str
    calls: dict[str, FakeCall] = field(default_factory=dict)
    numbers: dict[str, str] = field(default_factory=dict)  # number -> voice_url
    seen: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)
    fail_next: list[int] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add_call(self, to: str, from_: str) -> str:
        """A call the carrier knows without voicebus having dialed it (e.g. an inbound one)."""
        call = FakeCall(f"FK{next(self._ids):04d}", to, from_, "", "", 30, status="in-progress")
        self.calls[call.id] = call
        return call.id

    def app(self) -> FastAPI:
        app = FastAPI()

        def answer(request: Request, status: int, body: dict[str, Any] | None = None) -> Response:
            self.seen.append((request.method, request.url.path, status))
            if body is None:
                return Response(status_code=status)
            return JSONResponse(body, status_code=status)

        def refused(request: Request) -> Response | None:
            if self.fail_next:
                return answer(request, self.fail_next.pop(0), {"error": "injected"})
            if request.headers.get("authorization") != f"Key {self.api_key}":
                return answer(request, 401, {"error": "bad key"})
            return None

        @app.post("/calls")
        async def create(request: Request) -> Response:
            if (r := refused(request)) is not None:
                return r
            form = dict(parse_qsl((await request.body()).decode()))
            to = str(form.get("to", ""))
            if not to.startswith("+") or not to[1:].isdigit():
                return answer(request, 400, {"error": "invalid number"})
            call = FakeCall(f"FK{next(self._ids):04d}", to, str(form["from"]), str(form["answer_url"]),
                            str(form["status_url"]), int(form["timeout"]))
            self.calls[call.id] = call
            return answer(request, 201, {"id": call.id, "status": call.status})

        @app.get("/calls/{call_id}")
        async def fetch(call_id: str, request: Request) -> Response:
            if (r := refused(request)) is not None:
                return r
            call = self.calls.get(call_id)
            if call is None:
                return answer(request, 404, {"error": "no such call"})
            return answer(request, 200, {"id": call.id, "status": call.status, "duration": 42, "price": "-0.0130"})

        @app.delete("/calls/{call_id}")
        async def end(call_id: str, request: Request) -> Response:
            if (r := refused(request)) is not None:
                return r
            call = self.calls.get(call_id)
            if call is None or call.status == "completed":
                return answer(request, 404, {"error": "no such call"})
            call.status = "completed"
            return answer(request, 204)

        @app.put("/numbers/{number}")
        async def bind(number: str, request: Request) -> Response:
            if (r := refused(request)) is not None:
                return r
            voice_url = dict(parse_qsl((await request.body()).decode())).get("voice_url", "")
            self.numbers[number] = voice_url
            return answer(request, 200, {"sid": f"PN{abs(hash(number)) % 10_000:04d}", "number": number,
                                         "voice_url": voice_url})

        return app


# ------------------------------------------------------------------------ voicebus's side (the provider)
_STATUSES = {"queued": "initiated", "ringing": "ringing", "in-progress": "answered", "completed": "completed"}


class FakeRest:
    def __init__(self, creds: FakeCredentials, base_url: str, http: httpx.AsyncClient) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = creds.api_key
        self._http = http

    async def _send(self, method: str, path: str, data: dict[str, Any] | None = None) -> httpx.Response:
        return await send_with_retries(self._http, method, f"{self.base_url}{path}", label="Fake",
                                       headers={"Authorization": f"Key {self._key}"}, data=data,
                                       backoff_s=0.01, budget_s=3.0)

    @staticmethod
    def _fail(resp: httpx.Response, what: str) -> CarrierError:
        if resp.status_code in (401, 403):
            return CarrierError("carrier_auth_failed", f"Fake rejected the API key ({resp.status_code})",
                                resp.status_code)
        if resp.status_code == 400:
            return CarrierError("carrier_invalid_number", f"Fake refused the {what}: invalid number", 400)
        return CarrierError("carrier_error", f"Fake answered {resp.status_code} to the {what}", resp.status_code)

    async def hangup(self, carrier_call_id: str) -> HangupOutcome:
        resp = await self._send("DELETE", f"/calls/{carrier_call_id}")
        if resp.status_code == 204:
            return "hung_up"
        if resp.status_code == 404:
            return "already_ended"
        raise self._fail(resp, "hangup")

    async def confirm_call(self, carrier_call_id: str) -> tuple[bool, int]:
        raise CarrierError("not_supported", "Fake cannot confirm calls")

    async def dial(self, req: DialRequest) -> DialResult:
        resp = await self._send("POST", "/calls", {"to": req.to_number, "from": req.from_number,
                                                   "answer_url": req.answer_url, "status_url": req.status_url,
                                                   "timeout": req.ring_timeout_s})
        if resp.status_code != 201:
            raise self._fail(resp, "dial")
        body = resp.json()
        return DialResult(carrier_call_id=body["id"], status=body["status"], raw=body)

    async def call_info(self, carrier_call_id: str) -> CallInfo:
        resp = await self._send("GET", f"/calls/{carrier_call_id}")
        if resp.status_code != 200:
            raise self._fail(resp, "call query")
        body = resp.json()
        return CallInfo(carrier_call_id=body["id"], status=_STATUSES.get(body["status"]),  # type: ignore[arg-type]
                        raw_status=body["status"], duration_s=body["duration"], price=float(body["price"]),
                        price_unit="USD")

    async def bind_number(self, number: str, voice_url: str) -> BindResult:
        resp = await self._send("PUT", f"/numbers/{number}", {"voice_url": voice_url})
        if resp.status_code != 200:
            raise self._fail(resp, "number binding")
        body = resp.json()
        return BindResult(number=body["number"], number_sid=body["sid"], voice_url=body["voice_url"])


def rest_factory(credentials: BaseModel, base_url: str, http: httpx.AsyncClient) -> FakeRest:
    assert isinstance(credentials, FakeCredentials)
    return FakeRest(credentials, base_url, http)


class FakeVerifier:
    def __init__(self) -> None:
        self.calls = 0
        self.explode = False  # a test sets it to check that a verifier bug fails closed

    def verify(self, req: WebhookRequest, credentials: BaseModel, *, now: float) -> Verdict:
        assert isinstance(credentials, FakeCredentials)
        self.calls += 1
        if self.explode:
            raise RuntimeError("verifier bug")
        given = req.header(SIGNATURE_HEADER)
        if not given:
            return Verdict.refuse("missing X-Fake-Signature")
        signed = f"{req.method}\n{req.url}\n".encode() + req.body
        expected = hmac.new(credentials.signing_secret.encode(), signed, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given, expected):
            return Verdict.refuse("X-Fake-Signature does not match")
        return Verdict(True, replay_key=req.header(DELIVERY_HEADER))


def sign(secret: str, method: str, url: str, body: bytes) -> str:
    """The carrier's signing, written from the scheme's description (not by calling the verifier)."""
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    mac.update(method.encode() + b"\n" + url.encode() + b"\n" + body)
    return mac.hexdigest()


@dataclass
class FakeProvider:
    spec: ProviderSpec
    carrier: FakeCarrier
    server: RunningServer
    verifier: FakeVerifier

    @property
    def name(self) -> str:
        return self.spec.name

    def signed_headers(self, method: str, url: str, body: bytes, *, secret: str = FAKE_SECRET,
                       delivery: str | None = None) -> dict[str, str]:
        """Headers as the carrier sends them (mixed case, as on the wire), signed with ``secret``."""
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "X-Fake-Signature": sign(secret, method, url, body)}
        if delivery is not None:
            headers["X-Fake-Delivery"] = delivery
        return headers


@asynccontextmanager
async def fake_provider(api_key: str) -> AsyncIterator[FakeProvider]:
    name = f"fake{uuid.uuid4().hex[:8]}"
    verifier = FakeVerifier()
    spec = registry.register(ProviderSpec(
        name=name, display_name=f"Fake {name[4:]}", credentials_model=FakeCredentials,
        ui_fields=(UIField("api_key", "API key", type="password", sensitive=True),
                   UIField("signing_secret", "Signing secret", type="password", sensitive=True),
                   UIField("from_numbers", "From numbers", type="string-array", required=False)),
        account_id_field="api_key", verifier=verifier,
        rest=rest_factory, rest_actions=frozenset({"hangup", "dial", "call_info", "bind_number"}),
        default_api_url="https://fake.invalid"))
    carrier = FakeCarrier(api_key)
    try:
        async with serve_app(carrier.app()) as server:
            yield FakeProvider(spec, carrier, server, verifier)
    finally:
        registry._REGISTRY.pop(name, None)  # test-only spec: keep other modules' provider listings clean


@pytest.fixture
def bare_provider() -> Iterator[str]:
    """A registered provider with neither REST nor a verifier (what config can store, nothing more)."""
    name = f"bare{uuid.uuid4().hex[:8]}"
    registry.register(ProviderSpec(name=name, display_name=f"Bare {name[4:]}", credentials_model=FakeCredentials,
                                   ui_fields=(), account_id_field="api_key"))
    try:
        yield name
    finally:
        registry._REGISTRY.pop(name, None)


# ------------------------------------------------------------------------ fixtures
@dataclass
class FakeConfig:
    """Serves ``cfg.telephony.credentials`` (and ``cfg.run.get``) from dicts the test can change, and counts
    requests."""

    configs: dict[int, TelephonyCredentials] = field(default_factory=dict)
    runs: dict[int, str] = field(default_factory=dict)  # run id -> state
    requests: int = 0

    async def run_get(self, req: RunGetRequest) -> RunRecord:
        state = self.runs.get(req.run_id)
        if state is None:
            raise BusError("not_found", f"run {req.run_id} not found")
        now = datetime.now(UTC)
        return RunRecord(id=req.run_id, name=f"WR-{req.run_id}", organization_id=ORG, agent_uuid=str(uuid.uuid4()),
                         call_id=None, call_type="inbound", mode="cloudonix", state=state,  # type: ignore[arg-type]
                         end_reason=None, telephony_configuration_id=CONFIG_ID, agent_version=1,
                         definition_source="published", initial_context={}, gathered_context={}, logs={},
                         created_at=now, started_at=now, ended_at=None, updated_at=now)

    async def handle(self, req: TelephonyCredentialsRequest) -> TelephonyCredentials:
        self.requests += 1
        found = self.configs.get(req.telephony_config_id)
        if found is None:
            raise BusError("not_found", f"telephony configuration {req.telephony_config_id} not found")
        return found


@dataclass
class Stack:
    ORG: ClassVar[int] = ORG
    CONFIG_ID: ClassVar[int] = CONFIG_ID
    TOKEN: ClassVar[str] = TOKEN

    nc: NATS
    subjects: Subjects
    cloudonix: RunningCloudonixApi
    fake: FakeProvider
    config: FakeConfig
    http: httpx.AsyncClient
    carriers: Carriers
    make_service: Callable[..., CallControlService]
    service: CallControlService

    def session(self, name: str) -> str:
        self.cloudonix.state.add_session(DOMAIN, name, "+15551230001", "+15551230002")
        return name

    def deletes(self, session: str) -> int:
        return sum(1 for r in self.cloudonix.state.sessions[session].requests if r.method == "DELETE")

    def add_config(self, config_id: int, provider: str, credentials: dict[str, Any], org: int = ORG) -> None:
        self.config.configs[config_id] = TelephonyCredentials(
            telephony_config_id=config_id, organization_id=org, provider=provider, credentials=credentials)

    # Requests over the bus, the way other services send them.
    async def ask(self, action: str, req: BaseModel, reply: type[R], timeout: float = 15) -> R:
        return await request(self.nc, self.subjects.ctl(action), req, reply, timeout=timeout)

    async def register(self, carrier_call_id: str, call_id: str, *, config_id: int = CONFIG_ID, run_id: int = 42,
                       org: int = ORG, confirm: bool = False, direction: str = "inbound") -> LegRegistered:
        return await self.ask(CTL_LEG_REGISTER, LegRegister(
            call_id=call_id, run_id=run_id, organization_id=org, telephony_config_id=config_id,
            carrier_call_id=carrier_call_id, direction=direction, confirm=confirm),  # type: ignore[arg-type]
            LegRegistered)

    async def hangup(self, call_id: str, *, run_id: int = 42, org: int = ORG, reason: str = "agent_hangup",
                     end_state: str | None = "completed") -> HangupResult:
        return await self.ask(CTL_HANGUP, HangupRequest(call_id=call_id, run_id=run_id, organization_id=org,
                                                        reason=reason, end_state=end_state),  # type: ignore[arg-type]
                              HangupResult)

    async def leg(self, call_id: str) -> dict[str, Any] | None:
        kv = await self.nc.jetstream().key_value(legs_bucket(self.subjects))
        try:
            entry = await kv.get(call_id)
        except KeyNotFoundError:
            return None
        return json.loads(entry.value or b"null")

    async def last_event(self, name: str) -> dict[str, Any]:
        msg = await self.nc.jetstream().get_last_msg(self.subjects.events_stream, self.subjects.evt(name))
        return json.loads(msg.data)

    async def event_count(self) -> int:
        return (await self.nc.jetstream().stream_info(self.subjects.events_stream)).state.messages


@pytest.fixture
async def stack(nats_url: str, subject_prefix: str) -> AsyncIterator[Stack]:
    subjects = Subjects(prefix=subject_prefix)
    nc = await nats.connect(nats_url)
    config = FakeConfig()
    cfg_sub = await serve(nc, subjects.cfg(CFG_TELEPHONY_CREDENTIALS), TelephonyCredentialsRequest, config.handle,
                          queue=CONFIG_QUEUE)
    run_sub = await serve(nc, subjects.cfg(CFG_RUN_GET), RunGetRequest, config.run_get, queue=CONFIG_QUEUE)
    services: list[CallControlService] = []
    async with (run_cloudonix_api({DOMAIN: TOKEN}) as cloudonix, fake_provider(FAKE_KEY) as fake,
                httpx.AsyncClient(trust_env=False) as http):
        carriers = Carriers(http, {"cloudonix": cloudonix.url, fake.name: fake.server.url})

        def make_service(api_urls: dict[str, str] | None = None, **kw: Any) -> CallControlService:
            chosen = carriers if api_urls is None else Carriers(http, api_urls)
            svc = CallControlService(nc, subjects, chosen, **{"public_url": PUBLIC_URL, **kw})
            services.append(svc)
            return svc

        stack = Stack(nc, subjects, cloudonix, fake, config, http, carriers, make_service,
                      make_service(instance_id="cc-a"))
        stack.add_config(CONFIG_ID, "cloudonix", {"domain_id": "acme", "bearer_token": TOKEN})
        stack.add_config(FAKE_CONFIG_ID, fake.name, {"api_key": FAKE_KEY, "signing_secret": FAKE_SECRET,
                                                     "from_numbers": list(FAKE_FROM)})
        await stack.service.start()
        try:
            yield stack
        finally:
            for svc in services:
                await svc.stop()
            await cfg_sub.unsubscribe()
            await run_sub.unsubscribe()
            js = nc.jetstream()
            for stream in (subjects.events_stream, subjects.intents_stream):
                with contextlib.suppress(Exception):
                    await js.delete_stream(stream)
            for bucket in (actions_bucket(subjects), legs_bucket(subjects), replay_bucket(subjects)):
                with contextlib.suppress(Exception):
                    await js.delete_key_value(bucket)
            await nc.close()
