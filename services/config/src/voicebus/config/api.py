"""Admin REST API under ``/api/v1`` (OpenAPI at ``/docs``).

Every route is scoped to the organization of the calling API key: another organization's objects
are reported as 404, not 403, so ids do not reveal what exists elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from voicebus.bus.messages import BindNumberResult, CallInfoResult, RunRecord
from voicebus.config.errors import CallNotPlaced, ConfigError, Invalid, Unauthorized
from voicebus.config.schemas import (
    AgentCreate,
    AgentOut,
    AgentUpdate,
    AgentVersionOut,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    BindNumber,
    InitiateCall,
    InitiateCallOut,
    OrganizationOut,
    OrganizationPatch,
    PhoneNumberCreate,
    PhoneNumberOut,
    PhoneNumberUpdate,
    QuotaOut,
    TelephonyCreate,
    TelephonyOut,
    TelephonyUpdate,
)
from voicebus.config.store import Principal
from voicebus.kit import health_router
from voicebus.telephony import all_specs

if TYPE_CHECKING:
    from voicebus.config.service import ConfigService

MAX_PAGE = 500

_bearer = HTTPBearer(auto_error=False, description="An API key of your organization: `Bearer vbk_…`")


def _summary(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


async def principal(request: Request,
                    _creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Principal:
    """The caller's organization, from ``Authorization: Bearer <api key>``, with a reason when refused."""
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header; expected 'Bearer <api key>'")
    svc: ConfigService = request.app.state.svc
    return await svc.store.authenticate(token.strip())


# Module level: FastAPI resolves the (postponed) annotations of route functions in this module's globals.
Auth = Annotated[Principal, Depends(principal)]


def create_app(svc: ConfigService) -> FastAPI:
    app = FastAPI(
        title="voicebus config",
        version="1",
        description="Organizations, API keys, agents, telephony configurations, phone numbers, outbound calls, "
                    "runs and quota. "
                    "Authenticate with `Authorization: Bearer <api key>`; secrets in responses are masked.",
    )
    app.state.svc = svc
    store = svc.store

    @app.exception_handler(ConfigError)
    async def _config_error(_request: Request, exc: ConfigError) -> JSONResponse:
        if isinstance(exc, Invalid):
            return JSONResponse({"detail": jsonable_encoder(exc.errors), "message": exc.message}, status_code=422)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else exc.headers
        body: dict[str, Any] = {"detail": exc.message}
        if isinstance(exc, CallNotPlaced):
            body.update(code=exc.code, run_id=exc.run_id, retryable=exc.status == 503)
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors), "message": _summary(errors)}, status_code=422)

    api = APIRouter(prefix="/api/v1")

    # ---- organization ---------------------------------------------------------------------------
    @api.get("/organizations/me", response_model=OrganizationOut, tags=["organization"])
    async def get_org(p: Auth) -> OrganizationOut:
        return await store.get_organization(p.organization_id)

    @api.patch("/organizations/me", response_model=OrganizationOut, tags=["organization"])
    async def patch_org(body: OrganizationPatch, p: Auth) -> OrganizationOut:
        """A lower ``concurrent_call_limit`` refuses new calls; calls already up are not cut off."""
        return await store.update_organization(p.organization_id, body.name, body.concurrent_call_limit)

    # ---- API keys -------------------------------------------------------------------------------
    @api.post("/api-keys", response_model=ApiKeyCreated, status_code=201, tags=["api keys"])
    async def create_key(body: ApiKeyCreate, p: Auth) -> ApiKeyCreated:
        key, raw = await store.create_api_key(p.organization_id, body.name)
        return ApiKeyCreated(**key.model_dump(), key=raw)

    @api.get("/api-keys", response_model=list[ApiKeyOut], tags=["api keys"])
    async def list_keys(p: Auth) -> list[ApiKeyOut]:
        return await store.list_api_keys(p.organization_id)

    @api.delete("/api-keys/{key_id}", response_model=ApiKeyOut, tags=["api keys"])
    async def revoke_key(key_id: int, p: Auth) -> ApiKeyOut:
        return await store.revoke_api_key(p.organization_id, key_id)

    # ---- agents ---------------------------------------------------------------------------------
    @api.post("/agents", response_model=AgentOut, status_code=201, tags=["agents"])
    async def create_agent(body: AgentCreate, p: Auth) -> AgentOut:
        return await store.create_agent(p.organization_id, body.name, body.definition)

    @api.get("/agents", response_model=list[AgentOut], tags=["agents"])
    async def list_agents(p: Auth) -> list[AgentOut]:
        return await store.list_agents(p.organization_id)

    @api.get("/agents/{agent_uuid}", response_model=AgentOut, tags=["agents"])
    async def get_agent(agent_uuid: str, p: Auth) -> AgentOut:
        return await store.get_agent(p.organization_id, agent_uuid)

    @api.put("/agents/{agent_uuid}", response_model=AgentOut, tags=["agents"])
    async def update_agent(agent_uuid: str, body: AgentUpdate, p: Auth) -> AgentOut:
        """Edits the draft; calls keep running the published version until the next publish."""
        return await store.update_agent(p.organization_id, agent_uuid, body.name, body.definition)

    @api.post("/agents/{agent_uuid}/publish", response_model=AgentOut, tags=["agents"])
    async def publish_agent(agent_uuid: str, p: Auth) -> AgentOut:
        return await store.publish_agent(p.organization_id, agent_uuid)

    @api.get("/agents/{agent_uuid}/versions", response_model=list[AgentVersionOut], tags=["agents"])
    async def agent_versions(agent_uuid: str, p: Auth) -> list[AgentVersionOut]:
        return await store.agent_versions(p.organization_id, agent_uuid)

    # ---- telephony ------------------------------------------------------------------------------
    @api.post("/telephony-configurations", response_model=TelephonyOut, status_code=201, tags=["telephony"])
    async def create_telephony(body: TelephonyCreate, p: Auth) -> TelephonyOut:
        return await store.create_telephony(p.organization_id, body.provider, body.name, body.credentials)

    @api.get("/telephony-configurations", response_model=list[TelephonyOut], tags=["telephony"])
    async def list_telephony(p: Auth, provider: str | None = None) -> list[TelephonyOut]:
        return await store.list_telephony(p.organization_id, provider)

    @api.get("/telephony-configurations/{config_id}", response_model=TelephonyOut, tags=["telephony"])
    async def get_telephony(config_id: int, p: Auth) -> TelephonyOut:
        return await store.get_telephony(p.organization_id, config_id)

    @api.put("/telephony-configurations/{config_id}", response_model=TelephonyOut, tags=["telephony"])
    async def update_telephony(config_id: int, body: TelephonyUpdate, p: Auth) -> TelephonyOut:
        """Send back a masked secret unchanged to keep the stored one."""
        return await store.update_telephony(p.organization_id, config_id, body.name, body.credentials)

    @api.delete("/telephony-configurations/{config_id}", status_code=204, tags=["telephony"])
    async def delete_telephony(config_id: int, p: Auth) -> Response:
        await store.delete_telephony(p.organization_id, config_id)
        return Response(status_code=204)

    @api.post("/telephony/initiate-call", response_model=InitiateCallOut, status_code=201, tags=["telephony"],
              responses={400: {"description": "invalid number for the carrier, carrier cannot dial, or no "
                                              "configuration that can place calls"},
                         404: {"description": "agent or telephony configuration not in this organization"},
                         429: {"description": "concurrent call limit reached (Retry-After)"},
                         502: {"description": "the carrier rejected the configuration's credentials"},
                         503: {"description": "call-control or the carrier unavailable; retryable (Retry-After)"}})
    async def initiate_call(body: InitiateCall, p: Auth) -> InitiateCallOut:
        """Place an outbound call that runs the agent once answered. A call that is not placed leaves a
        ``failed`` run whose ``end_reason`` says why (its id is in the error body as ``run_id``)."""
        return await svc.outbound.initiate(p.organization_id, body)

    # ---- phone numbers --------------------------------------------------------------------------
    @api.post("/phone-numbers", response_model=PhoneNumberOut, status_code=201, tags=["phone numbers"],
              responses={409: {"description": "the number is already configured on that carrier account"}})
    async def create_phone_number(body: PhoneNumberCreate, p: Auth) -> PhoneNumberOut:
        """A number on a configuration's carrier account, routed to an agent of this organization."""
        return await store.create_phone_number(p.organization_id, body.telephony_configuration_id, body.number,
                                               body.agent_uuid, body.is_active)

    @api.get("/phone-numbers", response_model=list[PhoneNumberOut], tags=["phone numbers"])
    async def list_phone_numbers(p: Auth, telephony_configuration_id: int | None = None) -> list[PhoneNumberOut]:
        return await store.list_phone_numbers(p.organization_id, telephony_configuration_id)

    @api.get("/phone-numbers/{number_id}", response_model=PhoneNumberOut, tags=["phone numbers"])
    async def get_phone_number(number_id: int, p: Auth) -> PhoneNumberOut:
        return await store.get_phone_number(p.organization_id, number_id)

    @api.patch("/phone-numbers/{number_id}", response_model=PhoneNumberOut, tags=["phone numbers"],
               responses={409: {"description": "the number is already configured on that carrier account"}})
    async def patch_phone_number(number_id: int, body: PhoneNumberUpdate, p: Auth) -> PhoneNumberOut:
        return await store.update_phone_number(p.organization_id, number_id,
                                               config_id=body.telephony_configuration_id, number=body.number,
                                               agent_uuid=body.agent_uuid, is_active=body.is_active)

    @api.post("/phone-numbers/{number_id}/bind", response_model=BindNumberResult, tags=["phone numbers"],
              responses={400: {"description": "the carrier cannot bind numbers, or does not own this one"},
                         502: {"description": "the carrier rejected the configuration's credentials"},
                         503: {"description": "call-control or the carrier unavailable; retryable"}})
    async def bind_phone_number(number_id: int, p: Auth, body: BindNumber | None = None) -> BindNumberResult:
        """Point the number's voice webhook on the carrier account at voicebus's inbound URL (or ``voice_url``)."""
        return await svc.carrier.bind(p.organization_id, number_id, body.voice_url if body else None)

    @api.delete("/phone-numbers/{number_id}", status_code=204, tags=["phone numbers"])
    async def delete_phone_number(number_id: int, p: Auth) -> Response:
        await store.delete_phone_number(p.organization_id, number_id)
        return Response(status_code=204)

    @api.get("/telephony-providers/metadata", tags=["telephony"])
    async def providers_metadata(_p: Auth) -> list[dict[str, Any]]:
        return [spec.metadata() for spec in all_specs()]

    # ---- runs and quota -------------------------------------------------------------------------
    @api.get("/runs", response_model=list[RunRecord], tags=["runs"])
    async def list_runs(
        p: Auth,
        agent_uuid: str | None = None,
        state: Literal["created", "running", "completed", "failed"] | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[RunRecord]:
        return await store.list_runs(p.organization_id, agent_uuid, state, limit, offset)

    @api.get("/runs/{run_id}", response_model=RunRecord, tags=["runs"])
    async def get_run(run_id: int, p: Auth) -> RunRecord:
        return await store.get_run(run_id, p.organization_id)

    @api.get("/runs/{run_id}/carrier-call", response_model=CallInfoResult, tags=["runs"],
             responses={404: {"description": "no such run, or its call has no carrier leg"},
                        503: {"description": "call-control or the carrier unavailable; retryable"}})
    async def carrier_call(run_id: int, p: Auth) -> CallInfoResult:
        """The carrier's view of the run's call: status, duration and price (as the carrier reports them)."""
        return await svc.carrier.call_info(p.organization_id, run_id)

    @api.get("/quota", response_model=QuotaOut, tags=["quota"])
    async def get_quota(p: Auth) -> QuotaOut:
        org = await store.get_organization(p.organization_id)
        return QuotaOut(concurrent_call_limit=org.concurrent_call_limit,
                        in_use=await svc.quota.in_use(p.organization_id))

    app.include_router(api)
    app.include_router(health_router(svc.health))
    return app
