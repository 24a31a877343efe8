"""Everything the config service does to its database, shared by the REST API, the NATS API, the event
consumer and the reaper, so each rule (masking, the terminal-state rule, organization scoping) is
written once.

Secrets are encrypted on the way in and only decrypted for the two internal consumers that need them
(``resolve_agent`` for the runner, ``telephony_credentials`` for call-control); everything an admin
sees goes through :meth:`SecretBox.mask_paths`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid as uuidlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from voicebus.bus.agent import SECRET_PATHS, AgentDefinition
from voicebus.bus.messages import (
    TERMINAL_STATES,
    CallAnswered,
    CallEnded,
    CallHangup,
    CallStarted,
    CallStatusEvent,
    InboundRoute,
    LifecycleEvent,
    ResolvedAgent,
    RunCreate,
    RunRecord,
    RunUpdate,
    TelephonyCredentials,
    TelephonyMatch,
)
from voicebus.config.crypto import MaskedValueError, SecretBox, SecretUnreadable, restore_masked
from voicebus.config.db import utcnow
from voicebus.config.errors import (
    Conflict,
    Invalid,
    NotFound,
    SecretUnreadableError,
    Unauthorized,
    UnknownAccount,
    UnknownNumber,
)
from voicebus.config.models import (
    Agent,
    AgentVersion,
    ApiKey,
    Organization,
    PhoneNumber,
    ProcessedEvent,
    TelephonyConfiguration,
    WorkflowRun,
)
from voicebus.config.phone import InvalidNumber, normalize_e164
from voicebus.config.schemas import (
    AgentOut,
    AgentVersionOut,
    ApiKeyOut,
    OrganizationOut,
    PhoneNumberOut,
    TelephonyOut,
)
from voicebus.telephony import ProviderSpec, all_specs, get_spec
from voicebus.telephony.calls import NOT_CONNECTED_STATUSES

log = logging.getLogger("voicebus.config.store")

API_KEY_PREFIX = "vbk_"
API_KEY_DISPLAY_CHARS = 12
LAST_USED_RESOLUTION = timedelta(seconds=60)
ACTIVE_STATES = ("created", "running")
# A carrier said "completed" before the media socket ever opened (answered, then gone, or a machine).
ENDED_BEFORE_MEDIA = "ended_before_media"


MAX_DB_ID = 2**31 - 1  # INTEGER columns; a larger id from a client can only be "not found"
# Column sizes of the run fields a client sends (PostgreSQL enforces them, SQLite does not).
RUN_FIELD_LIMITS = {"name": 200, "call_id": 200, "mode": 32, "quota_lease_id": 64}


def _id_ok(value: int) -> bool:
    return 0 < value <= MAX_DB_ID


def event_key(event_id: str) -> str:
    """``processed_events`` key: the id itself, or its SHA-256 when a publisher sent a longer one."""
    return event_id if len(event_id) <= 64 else hashlib.sha256(event_id.encode()).hexdigest()


def hash_api_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def secret_paths_of(spec: ProviderSpec) -> list[tuple[str, ...]]:
    return [tuple(name.split(".")) for name in spec.sensitive_fields]


def known_providers() -> str:
    return ", ".join(s.name for s in all_specs())


def _validation_errors(e: ValidationError, prefix: tuple[str | int, ...]) -> tuple[str, list[dict[str, Any]]]:
    errors = [{"loc": [*prefix, *err.get("loc", ())], "msg": err.get("msg", "invalid"), "type": err.get("type", "")}
              for err in e.errors()]
    message = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in errors[:5])
    return message, errors


@dataclass(frozen=True)
class Principal:
    """Who is calling the admin API: every query is scoped to ``organization_id``."""

    organization_id: int
    api_key_id: int


@dataclass
class EventOutcome:
    """What the consumer must do after the commit (Redis side effects never run inside a DB transaction)."""

    applied: bool
    release: list[tuple[int, str]] = field(default_factory=list)


class Store:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], box: SecretBox, default_call_limit: int) -> None:
        self.sessions = sessions
        self.box = box
        self.default_call_limit = default_call_limit

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as s, s.begin():
            yield s

    # ================================================================ organizations and keys
    async def create_organization(self, name: str, concurrent_call_limit: int | None = None,
                                  key_name: str = "initial") -> tuple[OrganizationOut, str]:
        """A new organization and its first API key; the raw key is returned once and never stored."""
        name = name.strip()
        if not name:
            raise Invalid("organization name must not be empty", ("name",))
        limit = self.default_call_limit if concurrent_call_limit is None else concurrent_call_limit
        if limit < 0:
            raise Invalid("concurrent_call_limit must be >= 0", ("concurrent_call_limit",))
        async with self.tx() as s:
            org = Organization(name=name, concurrent_call_limit=limit, created_at=utcnow())
            s.add(org)
            await s.flush()
            _key, raw = self._new_key(s, org.id, key_name)
            out = _org_out(org)
        return out, raw

    def _new_key(self, s: AsyncSession, organization_id: int, name: str) -> tuple[ApiKey, str]:
        raw = new_api_key()
        key = ApiKey(organization_id=organization_id, name=name, prefix=raw[:API_KEY_DISPLAY_CHARS],
                     key_hash=hash_api_key(raw), created_at=utcnow())
        s.add(key)
        return key, raw

    async def get_organization(self, organization_id: int) -> OrganizationOut:
        async with self.tx() as s:
            return _org_out(await self._org(s, organization_id))

    async def _org(self, s: AsyncSession, organization_id: int) -> Organization:
        org = await s.get(Organization, organization_id) if _id_ok(organization_id) else None
        if org is None:
            raise NotFound(f"organization {organization_id} not found")
        return org

    async def update_organization(self, organization_id: int, name: str | None,
                                  concurrent_call_limit: int | None) -> OrganizationOut:
        async with self.tx() as s:
            org = await self._org(s, organization_id)
            if name is not None:
                org.name = name
            if concurrent_call_limit is not None:
                org.concurrent_call_limit = concurrent_call_limit
            await s.flush()
            return _org_out(org)

    async def call_limit(self, organization_id: int) -> int:
        if not _id_ok(organization_id):
            raise NotFound(f"organization {organization_id} not found")
        async with self.tx() as s:
            limit = await s.scalar(sa.select(Organization.concurrent_call_limit)
                                   .where(Organization.id == organization_id))
        if limit is None:
            raise NotFound(f"organization {organization_id} not found")
        return int(limit)

    async def create_api_key(self, organization_id: int, name: str) -> tuple[ApiKeyOut, str]:
        async with self.tx() as s:
            await self._org(s, organization_id)
            key, raw = self._new_key(s, organization_id, name)
            await s.flush()
            return _key_out(key), raw

    async def list_api_keys(self, organization_id: int) -> list[ApiKeyOut]:
        async with self.tx() as s:
            rows = await s.scalars(sa.select(ApiKey).where(ApiKey.organization_id == organization_id)
                                   .order_by(ApiKey.id))
            return [_key_out(k) for k in rows]

    async def revoke_api_key(self, organization_id: int, key_id: int) -> ApiKeyOut:
        async with self.tx() as s:
            key = await s.get(ApiKey, key_id, with_for_update=True) if _id_ok(key_id) else None
            if key is None or key.organization_id != organization_id:
                raise NotFound(f"API key {key_id} not found")
            if key.revoked_at is None:
                active = await s.scalar(sa.select(sa.func.count()).select_from(ApiKey).where(
                    ApiKey.organization_id == organization_id, ApiKey.revoked_at.is_(None)))
                if (active or 0) <= 1:
                    raise Conflict("cannot revoke the organization's last active API key; create another key first")
                key.revoked_at = utcnow()
            return _key_out(key)

    async def authenticate(self, raw: str) -> Principal:
        if not raw.startswith(API_KEY_PREFIX) or len(raw) < len(API_KEY_PREFIX) + 16:
            raise Unauthorized(f"malformed API key: voicebus API keys start with {API_KEY_PREFIX!r}")
        now = utcnow()
        async with self.tx() as s:
            key = await s.scalar(sa.select(ApiKey).where(ApiKey.key_hash == hash_api_key(raw)))
            if key is None:
                raise Unauthorized("unknown API key")
            if key.revoked_at is not None:
                raise Unauthorized(f"API key {key.prefix}… was revoked at {key.revoked_at.isoformat()}")
            # Written at most once a minute: an update per request would serialize every API call.
            if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
                key.last_used_at = now
            return Principal(key.organization_id, key.id)

    # ================================================================ agents
    def _store_definition(self, definition: AgentDefinition) -> dict[str, Any]:
        return self.box.encrypt_paths(definition.model_dump(mode="json"), SECRET_PATHS)

    def _plain_definition(self, stored: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.box.decrypt_paths(stored, SECRET_PATHS)
        except SecretUnreadable as e:
            raise SecretUnreadableError(str(e)) from None

    def _masked_definition(self, stored: dict[str, Any]) -> AgentDefinition:
        return AgentDefinition.model_validate(self.box.mask_paths(stored, SECRET_PATHS))

    def _with_restored_secrets(self, definition: AgentDefinition,
                               stored: dict[str, Any] | None) -> AgentDefinition:
        submitted = definition.model_dump(mode="json")
        try:
            stored_plain = self._plain_definition(stored) if stored else None
        except SecretUnreadableError:
            stored_plain = None  # masked values cannot be kept, but a real new key can still be saved
        try:
            restored = restore_masked(submitted, stored_plain, SECRET_PATHS)
        except MaskedValueError as e:
            raise Invalid(str(e), ("body", "definition", *e.path)) from None
        return AgentDefinition.model_validate(restored)

    async def _agent_out(self, s: AsyncSession, agent: Agent) -> AgentOut:
        published = None
        if agent.published_version is not None:
            v = await s.scalar(sa.select(AgentVersion.definition).where(
                AgentVersion.agent_id == agent.id, AgentVersion.version == agent.published_version))
            published = self._masked_definition(v) if v is not None else None
        return AgentOut(uuid=agent.uuid, name=agent.name,
                        draft_definition=self._masked_definition(agent.draft_definition),
                        published_version=agent.published_version, published_definition=published,
                        created_at=agent.created_at, updated_at=agent.updated_at)

    async def _agent(self, s: AsyncSession, organization_id: int | None, agent_uuid: str,
                     lock: bool = False) -> Agent:
        q = sa.select(Agent).where(Agent.uuid == agent_uuid.strip().lower())
        if organization_id is not None:
            q = q.where(Agent.organization_id == organization_id)
        if lock:
            q = q.with_for_update()
        agent = await s.scalar(q)
        if agent is None:
            raise NotFound(f"agent {agent_uuid} not found")
        return agent

    async def create_agent(self, organization_id: int, name: str, definition: AgentDefinition) -> AgentOut:
        definition = self._with_restored_secrets(definition, None)
        now = utcnow()
        async with self.tx() as s:
            agent = Agent(uuid=str(uuidlib.uuid4()), organization_id=organization_id, name=name,
                          draft_definition=self._store_definition(definition), published_version=None,
                          created_at=now, updated_at=now)
            s.add(agent)
            await s.flush()
            return await self._agent_out(s, agent)

    async def list_agents(self, organization_id: int) -> list[AgentOut]:
        async with self.tx() as s:
            agents = (await s.scalars(sa.select(Agent).where(Agent.organization_id == organization_id)
                                      .order_by(Agent.id))).all()
            return [await self._agent_out(s, a) for a in agents]

    async def get_agent(self, organization_id: int, agent_uuid: str) -> AgentOut:
        async with self.tx() as s:
            return await self._agent_out(s, await self._agent(s, organization_id, agent_uuid))

    async def update_agent(self, organization_id: int, agent_uuid: str, name: str | None,
                           definition: AgentDefinition | None) -> AgentOut:
        """Edits the draft only: calls keep using the published version until the next publish."""
        async with self.tx() as s:
            agent = await self._agent(s, organization_id, agent_uuid, lock=True)
            if name is not None:
                agent.name = name
            if definition is not None:
                definition = self._with_restored_secrets(definition, agent.draft_definition)
                agent.draft_definition = self._store_definition(definition)
            agent.updated_at = utcnow()
            await s.flush()
            return await self._agent_out(s, agent)

    async def publish_agent(self, organization_id: int, agent_uuid: str) -> AgentOut:
        async with self.tx() as s:
            agent = await self._agent(s, organization_id, agent_uuid, lock=True)
            latest = await s.scalar(sa.select(sa.func.max(AgentVersion.version))
                                    .where(AgentVersion.agent_id == agent.id))
            version = (latest or 0) + 1
            now = utcnow()
            s.add(AgentVersion(agent_id=agent.id, version=version, definition=dict(agent.draft_definition),
                               published_at=now))
            agent.published_version = version
            agent.updated_at = now
            try:
                await s.flush()
            except IntegrityError:
                raise Conflict(f"agent {agent_uuid} was published concurrently; retry") from None
            return await self._agent_out(s, agent)

    async def agent_versions(self, organization_id: int, agent_uuid: str) -> list[AgentVersionOut]:
        async with self.tx() as s:
            agent = await self._agent(s, organization_id, agent_uuid)
            rows = await s.scalars(sa.select(AgentVersion).where(AgentVersion.agent_id == agent.id)
                                   .order_by(AgentVersion.version))
            return [AgentVersionOut(version=v.version, definition=self._masked_definition(v.definition),
                                    published_at=v.published_at) for v in rows]

    async def resolve_agent(self, agent_uuid: str) -> ResolvedAgent:
        """What a call runs: the published version, or the draft of an agent never published."""
        async with self.tx() as s:
            return await self._resolved(s, await self._agent(s, None, agent_uuid))

    async def _resolved(self, s: AsyncSession, agent: Agent) -> ResolvedAgent:
        if agent.published_version is not None:
            stored = await s.scalar(sa.select(AgentVersion.definition).where(
                AgentVersion.agent_id == agent.id, AgentVersion.version == agent.published_version))
            if stored is None:
                raise NotFound(f"agent {agent.uuid} version {agent.published_version} is missing")
            source, version = "published", agent.published_version
        else:
            stored, source, version = agent.draft_definition, "draft", None
        return ResolvedAgent(agent_uuid=agent.uuid, organization_id=agent.organization_id, name=agent.name,
                             version=version, definition_source=source,  # type: ignore[arg-type]
                             definition=AgentDefinition.model_validate(self._plain_definition(stored)))

    # ================================================================ telephony configurations
    def _spec(self, provider: str, loc: tuple[str | int, ...] = ("body", "provider")) -> ProviderSpec:
        spec = get_spec(provider)
        if spec is None:
            raise Invalid(f"unknown provider {provider!r}; known providers: {known_providers()}", loc)
        return spec

    def _validated_credentials(self, spec: ProviderSpec, submitted: dict[str, Any],
                               stored_plain: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
        try:
            restored = restore_masked(submitted, stored_plain, secret_paths_of(spec))
        except MaskedValueError as e:
            raise Invalid(str(e), ("body", "credentials", *e.path)) from None
        try:
            model: BaseModel = spec.credentials_model.model_validate(restored)
        except ValidationError as e:
            message, errors = _validation_errors(e, ("body", "credentials"))
            raise Invalid(f"invalid {spec.name} credentials: {message}", errors=errors) from None
        plain = model.model_dump(mode="json")
        account_id = spec.normalize_account_id(str(plain.get(spec.account_id_field) or ""))
        if not account_id:
            raise Invalid(f"{spec.account_id_field} must not be empty", ("body", "credentials", spec.account_id_field))
        return plain, account_id

    def _telephony_out(self, cfg: TelephonyConfiguration) -> TelephonyOut:
        spec = get_spec(cfg.provider)
        paths = secret_paths_of(spec) if spec else []
        return TelephonyOut(id=cfg.id, provider=cfg.provider, name=cfg.name, account_id=cfg.account_id,
                            credentials=self.box.mask_paths(cfg.credentials, paths),
                            created_at=cfg.created_at, updated_at=cfg.updated_at)

    async def _check_unique_account(self, s: AsyncSession, organization_id: int, provider: str, account_id: str,
                                    exclude_id: int | None = None) -> None:
        q = sa.select(TelephonyConfiguration.id).where(
            TelephonyConfiguration.organization_id == organization_id,
            TelephonyConfiguration.provider == provider, TelephonyConfiguration.account_id == account_id)
        if exclude_id is not None:
            q = q.where(TelephonyConfiguration.id != exclude_id)
        other = await s.scalar(q)
        if other is not None:
            raise Conflict(f"this organization already has a {provider} configuration for account "
                           f"{account_id!r} (id {other})")

    async def create_telephony(self, organization_id: int, provider: str, name: str,
                               credentials: dict[str, Any]) -> TelephonyOut:
        spec = self._spec(provider)
        plain, account_id = self._validated_credentials(spec, credentials, None)
        now = utcnow()
        try:
            async with self.tx() as s:
                await self._check_unique_account(s, organization_id, spec.name, account_id)
                cfg = TelephonyConfiguration(organization_id=organization_id, provider=spec.name, name=name,
                                             account_id=account_id,
                                             credentials=self.box.encrypt_paths(plain, secret_paths_of(spec)),
                                             created_at=now, updated_at=now)
                s.add(cfg)
                await s.flush()
                return self._telephony_out(cfg)
        except IntegrityError:  # lost a race with an identical create
            raise Conflict(f"this organization already has a {provider} configuration for account "
                           f"{account_id!r}") from None

    async def _telephony(self, s: AsyncSession, organization_id: int | None, config_id: int,
                         lock: bool = False) -> TelephonyConfiguration:
        cfg = await s.get(TelephonyConfiguration, config_id, with_for_update=lock) if _id_ok(config_id) else None
        if cfg is None or (organization_id is not None and cfg.organization_id != organization_id):
            raise NotFound(f"telephony configuration {config_id} not found")
        return cfg

    async def list_telephony(self, organization_id: int, provider: str | None = None) -> list[TelephonyOut]:
        q = sa.select(TelephonyConfiguration).where(TelephonyConfiguration.organization_id == organization_id)
        if provider is not None:
            q = q.where(TelephonyConfiguration.provider == self._spec(provider, ("query", "provider")).name)
        async with self.tx() as s:
            return [self._telephony_out(c) for c in await s.scalars(q.order_by(TelephonyConfiguration.id))]

    async def get_telephony(self, organization_id: int, config_id: int) -> TelephonyOut:
        async with self.tx() as s:
            return self._telephony_out(await self._telephony(s, organization_id, config_id))

    async def update_telephony(self, organization_id: int, config_id: int, name: str | None,
                               credentials: dict[str, Any] | None) -> TelephonyOut:
        try:
            async with self.tx() as s:
                cfg = await self._telephony(s, organization_id, config_id, lock=True)
                if name is not None:
                    cfg.name = name
                if credentials is not None:
                    spec = self._spec(cfg.provider)
                    paths = secret_paths_of(spec)
                    try:
                        stored_plain = self.box.decrypt_paths(cfg.credentials, paths)
                    except SecretUnreadable:
                        stored_plain = None  # masked values cannot be kept; real values can still be saved
                    plain, account_id = self._validated_credentials(spec, credentials, stored_plain)
                    if account_id != cfg.account_id:
                        await self._check_unique_account(s, organization_id, cfg.provider, account_id, cfg.id)
                        await self._move_numbers(s, cfg, account_id)
                    cfg.account_id = account_id
                    cfg.credentials = self.box.encrypt_paths(plain, paths)
                cfg.updated_at = utcnow()
                await s.flush()
                return self._telephony_out(cfg)
        except IntegrityError:
            raise Conflict("this organization already has a configuration for that provider account, or one of "
                           "this configuration's numbers is already configured on the new account") from None

    async def _move_numbers(self, s: AsyncSession, cfg: TelephonyConfiguration, account_id: str) -> None:
        """The configuration's numbers follow it to its new account id, unless one is taken there."""
        mine = sa.select(PhoneNumber.number).where(PhoneNumber.telephony_configuration_id == cfg.id)
        clash = (await s.execute(sa.select(PhoneNumber.number, PhoneNumber.organization_id,
                                           PhoneNumber.telephony_configuration_id).where(
            PhoneNumber.provider == cfg.provider, PhoneNumber.account_id == account_id,
            PhoneNumber.number.in_(mine)).order_by(PhoneNumber.number).limit(1))).first()
        if clash is not None:
            raise Conflict(f"cannot change the account id to {account_id!r}: number {clash[0]} of this "
                           f"configuration is already configured on that {cfg.provider} account "
                           f"({_owner(clash[1], clash[2], cfg.organization_id)})")
        await s.execute(sa.update(PhoneNumber).where(PhoneNumber.telephony_configuration_id == cfg.id)
                        .values(account_id=account_id, updated_at=utcnow()))

    async def delete_telephony(self, organization_id: int, config_id: int) -> None:
        """Refused while a live run uses it (its hangup would need these credentials); ended runs keep
        their history and their reference becomes null (ids are not stable across SQLite deletes)."""
        async with self.tx() as s:
            cfg = await self._telephony(s, organization_id, config_id, lock=True)
            active = await s.scalar(sa.select(sa.func.count()).select_from(WorkflowRun).where(
                WorkflowRun.telephony_configuration_id == cfg.id, WorkflowRun.state.in_(ACTIVE_STATES)))
            if active:
                raise Conflict(f"telephony configuration {config_id} is used by {active} active run(s); "
                               "delete it once they have ended")
            numbers = list(await s.scalars(sa.select(PhoneNumber.number).where(
                PhoneNumber.telephony_configuration_id == cfg.id).order_by(PhoneNumber.number)))
            if numbers:
                shown = ", ".join(numbers[:5]) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
                raise Conflict(f"telephony configuration {config_id} still has {len(numbers)} phone number(s) "
                               f"({shown}); delete or move them first")
            await s.execute(sa.update(WorkflowRun).where(WorkflowRun.telephony_configuration_id == cfg.id)
                            .values(telephony_configuration_id=None))
            await s.delete(cfg)

    async def match_telephony(self, organization_id: int, provider: str, account_id: str) -> TelephonyMatch:
        spec = get_spec(provider)
        if spec is None:
            raise NotFound(f"unknown provider {provider!r}; known providers: {known_providers()}")
        normalized = spec.normalize_account_id(account_id)
        async with self.tx() as s:
            cfg = await s.scalar(sa.select(TelephonyConfiguration).where(
                TelephonyConfiguration.organization_id == organization_id,
                TelephonyConfiguration.provider == spec.name, TelephonyConfiguration.account_id == normalized))
        if cfg is None:
            raise NotFound(f"no {provider} telephony configuration for account {normalized!r} in organization "
                           f"{organization_id}")
        try:
            plain = self.box.decrypt_paths(cfg.credentials, secret_paths_of(spec))
        except SecretUnreadable as e:
            raise SecretUnreadableError(str(e)) from None
        # Only the secrets the carrier needs: an optional one (Twilio's webhook shared key) may stay empty.
        has = all(bool(plain.get(f.name)) for f in spec.ui_fields if f.sensitive and f.required and "." not in f.name)
        return TelephonyMatch(telephony_config_id=cfg.id, provider=cfg.provider, name=cfg.name,
                              account_id=cfg.account_id, has_credentials=has)

    async def telephony_providers(self, organization_id: int, config_id: int | None = None) -> list[tuple[int, str]]:
        """(id, provider) of the organization's configurations, lowest id first; one, or 404, with ``config_id``."""
        async with self.tx() as s:
            if config_id is not None:
                cfg = await self._telephony(s, organization_id, config_id)
                return [(cfg.id, cfg.provider)]
            rows = await s.execute(sa.select(TelephonyConfiguration.id, TelephonyConfiguration.provider)
                                   .where(TelephonyConfiguration.organization_id == organization_id)
                                   .order_by(TelephonyConfiguration.id))
            return [(r[0], r[1]) for r in rows]

    async def telephony_credentials(self, config_id: int) -> TelephonyCredentials:
        async with self.tx() as s:
            cfg = await self._telephony(s, None, config_id)
        spec = get_spec(cfg.provider)
        try:
            plain = self.box.decrypt_paths(cfg.credentials, secret_paths_of(spec) if spec else [])
        except SecretUnreadable as e:
            raise SecretUnreadableError(str(e)) from None
        return TelephonyCredentials(telephony_config_id=cfg.id, organization_id=cfg.organization_id,
                                    provider=cfg.provider, credentials=plain)

    # ================================================================ phone numbers
    def _number(self, value: str, loc: tuple[str | int, ...] = ("body", "number")) -> str:
        try:
            return normalize_e164(value)
        except InvalidNumber as e:
            raise Invalid(f"number: {e}", loc) from None

    async def _phone(self, s: AsyncSession, organization_id: int, number_id: int,
                     lock: bool = False) -> PhoneNumber:
        row = await s.get(PhoneNumber, number_id, with_for_update=lock) if _id_ok(number_id) else None
        if row is None or row.organization_id != organization_id:
            raise NotFound(f"phone number {number_id} not found")
        return row

    async def _check_number_free(self, s: AsyncSession, organization_id: int, provider: str, account_id: str,
                                 number: str, exclude_id: int | None = None) -> None:
        q = sa.select(PhoneNumber.organization_id, PhoneNumber.telephony_configuration_id).where(
            PhoneNumber.provider == provider, PhoneNumber.account_id == account_id, PhoneNumber.number == number)
        if exclude_id is not None:
            q = q.where(PhoneNumber.id != exclude_id)
        other = (await s.execute(q)).first()
        if other is not None:
            raise Conflict(f"number {number} is already configured on {provider} account {account_id!r} "
                           f"({_owner(other[0], other[1], organization_id)}); a number routes to one agent")

    async def create_phone_number(self, organization_id: int, config_id: int, number: str, agent_uuid: str,
                                  is_active: bool = True) -> PhoneNumberOut:
        number = self._number(number)
        now = utcnow()
        try:
            async with self.tx() as s:
                cfg = await self._telephony(s, organization_id, config_id)
                agent = (await self._agent(s, organization_id, agent_uuid)).uuid
                await self._check_number_free(s, organization_id, cfg.provider, cfg.account_id, number)
                row = PhoneNumber(organization_id=organization_id, telephony_configuration_id=cfg.id,
                                  provider=cfg.provider, account_id=cfg.account_id, number=number, agent_uuid=agent,
                                  is_active=is_active, created_at=now, updated_at=now)
                s.add(row)
                await s.flush()
                return _phone_out(row)
        except IntegrityError:  # lost a race with a create of the same number
            raise Conflict(f"number {number} is already configured on that carrier account") from None

    async def list_phone_numbers(self, organization_id: int, config_id: int | None = None) -> list[PhoneNumberOut]:
        q = sa.select(PhoneNumber).where(PhoneNumber.organization_id == organization_id)
        if config_id is not None:
            q = q.where(PhoneNumber.telephony_configuration_id == config_id)
        async with self.tx() as s:
            return [_phone_out(r) for r in await s.scalars(q.order_by(PhoneNumber.id))]

    async def get_phone_number(self, organization_id: int, number_id: int) -> PhoneNumberOut:
        async with self.tx() as s:
            return _phone_out(await self._phone(s, organization_id, number_id))

    async def update_phone_number(self, organization_id: int, number_id: int, *, config_id: int | None = None,
                                  number: str | None = None, agent_uuid: str | None = None,
                                  is_active: bool | None = None) -> PhoneNumberOut:
        new_number = self._number(number) if number is not None else None
        try:
            async with self.tx() as s:
                row = await self._phone(s, organization_id, number_id, lock=True)
                # Checked before the row changes: a query would autoflush the change and hit the constraint.
                target = (row.telephony_configuration_id, row.provider, row.account_id)
                if config_id is not None and config_id != row.telephony_configuration_id:
                    cfg = await self._telephony(s, organization_id, config_id)
                    target = (cfg.id, cfg.provider, cfg.account_id)
                value = new_number if new_number is not None else row.number
                await self._check_number_free(s, organization_id, target[1], target[2], value, row.id)
                (row.telephony_configuration_id, row.provider, row.account_id), row.number = target, value
                if agent_uuid is not None:
                    row.agent_uuid = (await self._agent(s, organization_id, agent_uuid)).uuid
                if is_active is not None:
                    row.is_active = is_active
                row.updated_at = utcnow()
                await s.flush()
                return _phone_out(row)
        except IntegrityError:
            raise Conflict("that number is already configured on that carrier account") from None

    async def delete_phone_number(self, organization_id: int, number_id: int) -> None:
        async with self.tx() as s:
            await s.delete(await self._phone(s, organization_id, number_id, lock=True))

    async def inbound_route(self, provider: str, account_id: str, called_number: str) -> InboundRoute:
        """The one route of a call to ``called_number`` on a carrier account, whichever organization has it.

        The pair (account, number) is unique in the database, so at most one row answers; the errors say
        which half is unknown, because ingress tells the caller (and the log) different things.
        """
        spec = get_spec(provider)
        if spec is None:
            raise UnknownAccount(f"unknown provider {provider!r}; known providers: {known_providers()}")
        account = spec.normalize_account_id(account_id)
        async with self.tx() as s:
            known = await s.scalar(sa.select(TelephonyConfiguration.id).where(
                TelephonyConfiguration.provider == spec.name, TelephonyConfiguration.account_id == account).limit(1))
            if known is None:
                raise UnknownAccount(f"no {spec.name} telephony configuration for account {account!r}")
            try:
                number = normalize_e164(called_number)
            except InvalidNumber as e:
                raise UnknownNumber(f"called number {e}") from None
            row = await s.scalar(sa.select(PhoneNumber).where(
                PhoneNumber.provider == spec.name, PhoneNumber.account_id == account, PhoneNumber.number == number))
            if row is None:
                raise UnknownNumber(f"number {number} is not configured on {spec.name} account {account!r}")
            if not row.is_active:
                raise UnknownNumber(f"number {number} on {spec.name} account {account!r} is inactive "
                                    f"(phone number {row.id})")
            try:
                agent = await self._agent(s, row.organization_id, row.agent_uuid)
            except NotFound:
                raise NotFound(f"agent {row.agent_uuid} of number {number} (phone number {row.id}) no longer "
                               "exists") from None
            return InboundRoute(organization_id=row.organization_id, telephony_config_id=row.telephony_configuration_id,
                                phone_number_id=row.id, number=row.number, agent=await self._resolved(s, agent))

    # ================================================================ runs
    async def create_run(self, req: RunCreate, telephony_configuration_id: int | None = None) -> RunRecord:
        for name, limit in RUN_FIELD_LIMITS.items():
            value = getattr(req, name)
            if value is not None and len(value) > limit:
                raise Invalid(f"{name} is longer than {limit} characters", (name,))
        now = utcnow()
        async with self.tx() as s:
            await self._org(s, req.organization_id)
            await self._agent(s, req.organization_id, req.agent_uuid)
            if telephony_configuration_id is not None and not await self._config_in_org(
                    s, telephony_configuration_id, req.organization_id):
                raise NotFound(f"telephony configuration {telephony_configuration_id} not found")
            run = WorkflowRun(
                organization_id=req.organization_id, agent_uuid=req.agent_uuid.strip().lower(),
                agent_version=req.agent_version, definition_source=req.definition_source, name=req.name,
                call_id=req.call_id, call_type=req.call_type, mode=req.mode, state="created", end_reason=None,
                telephony_configuration_id=telephony_configuration_id, initial_context=dict(req.initial_context),
                gathered_context=dict(req.gathered_context), logs=dict(req.logs),
                quota_lease_id=req.quota_lease_id, created_at=now, updated_at=now)
            s.add(run)
            await s.flush()
            return run_record(run)

    async def _run(self, s: AsyncSession, run_id: int, organization_id: int | None = None,
                   lock: bool = False) -> WorkflowRun:
        run = await s.get(WorkflowRun, run_id, with_for_update=lock) if _id_ok(run_id) else None
        if run is None or (organization_id is not None and run.organization_id != organization_id):
            raise NotFound(f"run {run_id} not found")
        return run

    async def get_run(self, run_id: int, organization_id: int | None = None) -> RunRecord:
        async with self.tx() as s:
            return run_record(await self._run(s, run_id, organization_id))

    async def list_runs(self, organization_id: int, agent_uuid: str | None, state: str | None,
                        limit: int, offset: int) -> list[RunRecord]:
        q = sa.select(WorkflowRun).where(WorkflowRun.organization_id == organization_id)
        if agent_uuid:
            q = q.where(WorkflowRun.agent_uuid == agent_uuid.strip().lower())
        if state:
            q = q.where(WorkflowRun.state == state)
        async with self.tx() as s:
            rows = await s.scalars(q.order_by(WorkflowRun.id.desc()).limit(limit).offset(offset))
            return [run_record(r) for r in rows]

    async def update_run(self, upd: RunUpdate) -> tuple[RunRecord, str | None]:
        """Apply a partial update; returns the record and, if the run just ended, its lease to release.

        Dict fields merge key by key, even on a terminal run, so late logs or gathered context are
        not lost; state, end reason and configuration of a terminal run never change again.
        """
        now = utcnow()
        async with self.tx() as s:
            run = await self._run(s, upd.run_id, lock=True)
            was_terminal = run.state in TERMINAL_STATES
            _merge(run, "initial_context", upd.initial_context)
            _merge(run, "gathered_context", upd.gathered_context)
            _merge(run, "logs", upd.logs)
            if not was_terminal:
                if upd.telephony_configuration_id is not None:
                    if not await self._config_in_org(s, upd.telephony_configuration_id, run.organization_id):
                        raise Invalid(f"telephony configuration {upd.telephony_configuration_id} does not exist in "
                                      f"organization {run.organization_id}", ("telephony_configuration_id",))
                    run.telephony_configuration_id = upd.telephony_configuration_id
                if upd.end_reason is not None:
                    run.end_reason = upd.end_reason
                if upd.state == "running":
                    run.state = "running"
                    run.started_at = run.started_at or now
                elif upd.state in TERMINAL_STATES:
                    run.state = upd.state
                    run.ended_at = now
                # "created" again is ignored: a run never goes back.
            run.updated_at = now
            await s.flush()
            ended_now = not was_terminal and run.state in TERMINAL_STATES
            return run_record(run), (run.quota_lease_id if ended_now else None)

    async def _config_in_org(self, s: AsyncSession, config_id: int, organization_id: int) -> bool:
        """Whether telephony configuration ``config_id`` exists and belongs to ``organization_id``."""
        if not _id_ok(config_id):
            return False
        org = await s.scalar(sa.select(TelephonyConfiguration.organization_id)
                             .where(TelephonyConfiguration.id == config_id))
        return org == organization_id

    async def finish_run(self, run_id: int, state: str, reason: str, at: datetime | None = None) -> RunRecord | None:
        """End a run unless it already ended (first terminal wins, also across replicas)."""
        now = utcnow()
        async with self.tx() as s:
            res = await s.execute(
                sa.update(WorkflowRun)
                .where(WorkflowRun.id == run_id, WorkflowRun.state.in_(ACTIVE_STATES))
                .values(state=state, end_reason=reason, ended_at=at or now, updated_at=now)
            )
            if not res.rowcount:  # type: ignore[attr-defined]
                return None
            run = await s.get(WorkflowRun, run_id, populate_existing=True)
            return run_record(run) if run else None

    async def active_runs_with_lease(self, limit: int = 1000) -> list[tuple[int, int, str, str | None]]:
        """(run id, organization id, lease id, call id) of every live run that holds a quota lease."""
        async with self.tx() as s:
            rows = await s.execute(
                sa.select(WorkflowRun.id, WorkflowRun.organization_id, WorkflowRun.quota_lease_id,
                          WorkflowRun.call_id)
                .where(WorkflowRun.state.in_(ACTIVE_STATES), WorkflowRun.quota_lease_id.is_not(None))
                .order_by(WorkflowRun.id).limit(limit))
            return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def active_runs_without_lease_before(self, cutoff: datetime, limit: int = 1000) -> list[int]:
        async with self.tx() as s:
            rows = await s.scalars(
                sa.select(WorkflowRun.id)
                .where(WorkflowRun.state.in_(ACTIVE_STATES), WorkflowRun.quota_lease_id.is_(None),
                       WorkflowRun.created_at < cutoff)
                .order_by(WorkflowRun.id).limit(limit))
            return list(rows)

    async def prune_processed_events(self, before: datetime) -> int:
        async with self.tx() as s:
            res = await s.execute(sa.delete(ProcessedEvent).where(ProcessedEvent.processed_at < before))
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    # ================================================================ lifecycle events
    async def apply_event(self, event: LifecycleEvent) -> EventOutcome:
        """Apply one lifecycle event exactly once (``processed_events``), in one transaction."""
        try:
            async with self.tx() as s:
                key = event_key(event.event_id)
                if await s.get(ProcessedEvent, key) is not None:
                    return await self._after_duplicate(s, event)
                s.add(ProcessedEvent(event_id=key, processed_at=utcnow()))
                await s.flush()
                return await self._apply(s, event)
        except IntegrityError:  # another replica applied it concurrently
            async with self.tx() as s:
                return await self._after_duplicate(s, event)

    async def _after_duplicate(self, s: AsyncSession, event: LifecycleEvent) -> EventOutcome:
        # The DB side is done, but the lease release may not have happened (crash between commit and
        # release): releasing is idempotent, so do it again.
        out = EventOutcome(applied=False)
        if isinstance(event, CallEnded):
            run = await s.get(WorkflowRun, event.run_id) if _id_ok(event.run_id) else None
            out.release = _leases_of(event, run)
        elif isinstance(event, CallStatusEvent):
            run = await s.get(WorkflowRun, event.run_id) if _id_ok(event.run_id) else None
            if run is not None and run.organization_id == event.organization_id and run.quota_lease_id \
                    and run.state in TERMINAL_STATES:
                out.release = [(run.organization_id, run.quota_lease_id)]
        return out

    async def _apply(self, s: AsyncSession, event: LifecycleEvent) -> EventOutcome:
        run = await s.get(WorkflowRun, event.run_id, with_for_update=True) if _id_ok(event.run_id) else None
        if run is None:
            log.warning("event %s for unknown run %s ignored", event.event_id, event.run_id)
            return EventOutcome(applied=False)
        if run.organization_id != event.organization_id:
            log.warning("event %s names organization %s but run %s belongs to %s; ignored",
                        event.event_id, event.organization_id, run.id, run.organization_id)
            return EventOutcome(applied=False)
        terminal = run.state in TERMINAL_STATES
        out = EventOutcome(applied=True)
        if isinstance(event, CallStarted):
            if not terminal:
                run.state = "running"
            run.started_at = run.started_at or event.at
            if event.telephony_config_id is not None and _id_ok(event.telephony_config_id):
                if await self._config_in_org(s, event.telephony_config_id, run.organization_id):
                    run.telephony_configuration_id = event.telephony_config_id
                else:
                    log.warning("call.started %s names telephony configuration %s not in organization %s",
                                event.event_id, event.telephony_config_id, run.organization_id)
        elif isinstance(event, CallAnswered):
            run.logs = {**run.logs, "runner": {"runner_id": event.runner_id, "at": event.at.isoformat()}}
        elif isinstance(event, CallEnded):
            if not terminal:
                run.state = event.state
                run.end_reason = event.reason
                run.ended_at = event.at
            out.release = _leases_of(event, run)
        elif isinstance(event, CallHangup):
            run.logs = {**run.logs, "carrier_hangup": {"outcome": event.outcome, "status": event.status,
                                                       "at": event.at.isoformat()}}
        elif isinstance(event, CallStatusEvent):
            self._apply_status(run, event, out)
        run.updated_at = utcnow()
        return out

    @staticmethod
    def _apply_status(run: WorkflowRun, event: CallStatusEvent, out: EventOutcome) -> None:
        """A carrier status callback: always logged; it ends a live run only when it says the callee was
        never connected. ``completed`` of a running call is left to ingress and the runner, which know the
        precise reason (caller hangup, agent hangup, ...)."""
        entry = {"status": event.status, "raw_status": event.raw_status, "duration_s": event.duration_s,
                 "at": event.at.isoformat(), "fields": dict(event.fields)}
        logs = dict(run.logs or {})
        logs["status_callbacks"] = [*(logs.get("status_callbacks") or []), entry]
        run.logs = logs
        if event.duration_s is not None:
            run.gathered_context = {**(run.gathered_context or {}), "call_duration_s": event.duration_s}
        if run.state in TERMINAL_STATES:
            if run.quota_lease_id:  # whoever ended it may have crashed before releasing; releasing is idempotent
                out.release.append((run.organization_id, run.quota_lease_id))
            return
        reason = None
        if event.status in NOT_CONNECTED_STATUSES:
            reason = event.status
        elif event.status == "completed" and run.state == "created":
            reason = ENDED_BEFORE_MEDIA
        if reason is not None:
            run.state, run.end_reason, run.ended_at = "failed", reason, event.at
            if run.quota_lease_id:
                out.release.append((run.organization_id, run.quota_lease_id))


def _leases_of(event: CallEnded, run: WorkflowRun | None) -> list[tuple[int, str]]:
    leases: list[tuple[int, str]] = []
    org = run.organization_id if run is not None else event.organization_id
    for lease in (event.quota_lease_id, run.quota_lease_id if run is not None else None):
        if lease and (org, lease) not in leases:
            leases.append((org, lease))
    return leases


def _owner(organization_id: int, config_id: int, viewer_org: int) -> str:
    """Who holds a clashing number, as the viewer may see it: another organization's ids stay hidden."""
    if organization_id == viewer_org:
        return f"telephony configuration {config_id}"
    return "by another organization"


def _phone_out(row: PhoneNumber) -> PhoneNumberOut:
    return PhoneNumberOut(id=row.id, telephony_configuration_id=row.telephony_configuration_id, provider=row.provider,
                          account_id=row.account_id, number=row.number, agent_uuid=row.agent_uuid,
                          is_active=row.is_active, created_at=row.created_at, updated_at=row.updated_at)


def _merge(run: WorkflowRun, attr: str, patch: dict[str, Any] | None) -> None:
    if patch:
        setattr(run, attr, {**(getattr(run, attr) or {}), **patch})


def _org_out(org: Organization) -> OrganizationOut:
    return OrganizationOut(id=org.id, name=org.name, concurrent_call_limit=org.concurrent_call_limit,
                           created_at=org.created_at)


def _key_out(key: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(id=key.id, name=key.name, prefix=key.prefix, created_at=key.created_at,
                     last_used_at=key.last_used_at, revoked_at=key.revoked_at)


def run_record(run: WorkflowRun) -> RunRecord:
    return RunRecord(
        id=run.id, name=run.name, organization_id=run.organization_id, agent_uuid=run.agent_uuid,
        call_id=run.call_id, call_type=run.call_type, mode=run.mode, state=run.state,  # type: ignore[arg-type]
        end_reason=run.end_reason, telephony_configuration_id=run.telephony_configuration_id,
        agent_version=run.agent_version, definition_source=run.definition_source,
        initial_context=dict(run.initial_context or {}), gathered_context=dict(run.gathered_context or {}),
        logs=dict(run.logs or {}), created_at=run.created_at, started_at=run.started_at, ended_at=run.ended_at,
        updated_at=run.updated_at, quota_lease_id=run.quota_lease_id,
    )

