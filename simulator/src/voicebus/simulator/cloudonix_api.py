"""A stand-in for the Cloudonix REST API: the calls voicebus makes, answered the way Cloudonix does.

Real Cloudonix cannot be reached from tests or the demo, so this server plays its part:

- ``GET    /customers/self/domains/{domain}/sessions/{session}``: 200 + session JSON, 401 on a missing or
  wrong bearer token, 404 for an unknown or ended session (what call-control's validation relies on).
- ``DELETE`` on the same URL: 204 the first time (the call ends), 404 afterwards.

Admin endpoints under ``/_sim/`` let tests and the carrier simulator set the scene and look behind it:

- ``POST /_sim/domains {domain, bearer_token}``: register a domain and the token that is valid for it.
- ``POST /_sim/sessions {domain, session?, from?, to?}``: what Cloudonix does when a call starts.
- ``GET  /_sim/sessions/{session}[?wait_ended=S]``: state, ``hung_up_at`` and every REST request seen;
  with ``wait_ended`` it long-polls until the session ends (the carrier simulator uses this to close
  the media stream when call-control hangs the call up, as Cloudonix would).
- ``POST /_sim/sessions/{session}/end``: the caller hung up (the session ends without a REST call).
- ``POST /_sim/behaviour {delay_ms?, fail_next?}``: latency and injected failures (e.g. ``[503]``) for
  the session endpoints, so retries and concurrent duplicates can be tested for real.

Domains are normalized like Cloudonix does (``acme`` = ``acme.cloudonix.net``), so either form works.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from voicebus.simulator._server import RunningServer, serve_app
from voicebus.telephony import load_fake

SESSION_PATH = "/customers/self/domains/{domain}/sessions/{session}"
MAX_WAIT_ENDED_S = 60.0
normalize_domain = load_fake("cloudonix").normalize_domain


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class SeenRequest:
    method: str
    status: int
    at: datetime
    authorized: bool

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "status": self.status, "at": self.at.isoformat(),
                "authorized": self.authorized}


@dataclass
class SimSession:
    id: int
    domain: str
    token: str
    caller: str | None
    callee: str | None
    created_at: datetime = field(default_factory=_now)
    state: Literal["active", "ended"] = "active"
    ended_by: Literal["rest", "caller"] | None = None
    hung_up_at: datetime | None = None
    requests: list[SeenRequest] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self, by: Literal["rest", "caller"]) -> bool:
        if self.state == "ended":
            return False
        self.state, self.ended_by, self.hung_up_at = "ended", by, _now()
        self.ended.set()
        return True

    def cloudonix_json(self) -> dict[str, Any]:
        """The subset of Cloudonix's session object that callers look at."""
        return {
            "id": self.id,
            "domain": self.domain,
            "token": self.token,
            "callerId": self.caller,
            "destination": self.callee,
            "direction": "incoming",
            "status": "connected",
            "createdAt": self.created_at.isoformat(),
            "modifiedAt": (self.hung_up_at or self.created_at).isoformat(),
        }

    def admin_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "session": self.token,
            "from": self.caller,
            "to": self.callee,
            "state": self.state,
            "ended_by": self.ended_by,
            "created_at": self.created_at.isoformat(),
            "hung_up_at": self.hung_up_at.isoformat() if self.hung_up_at else None,
            "requests": [r.as_dict() for r in self.requests],
            "deletes": sum(1 for r in self.requests if r.method == "DELETE"),
        }


class CloudonixState:
    """Everything the stand-in knows; tests may also drive it directly (same process)."""

    def __init__(self) -> None:
        self.domains: dict[str, str] = {}
        self.sessions: dict[str, SimSession] = {}
        self.unmatched: list[SeenRequest] = []
        self.delay_s = 0.0
        self.fail_next: list[int] = []
        self._ids = itertools.count(1)
        self.closing = asyncio.Event()

    def add_domain(self, domain: str, bearer_token: str) -> str:
        d = normalize_domain(domain)
        if not d:
            raise ValueError("domain must not be empty")
        if not bearer_token:
            raise ValueError("bearer_token must not be empty")
        self.domains[d] = bearer_token
        return d

    def add_session(self, domain: str, session: str | None = None, caller: str | None = None,
                    callee: str | None = None) -> SimSession:
        d = normalize_domain(domain)
        if d not in self.domains:
            raise LookupError(f"domain {d or domain!r} is not registered; POST /_sim/domains first")
        token = session or secrets.token_hex(16)
        if token in self.sessions:
            raise FileExistsError(f"session {token!r} already exists")
        s = SimSession(id=next(self._ids), domain=d, token=token, caller=caller, callee=callee)
        self.sessions[token] = s
        return s


class DomainIn(BaseModel):
    domain: str = Field(min_length=1, max_length=253)
    bearer_token: str = Field(min_length=1, max_length=4096)


class SessionIn(BaseModel):
    domain: str = Field(min_length=1, max_length=253)
    session: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._~-]+$")
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None


class BehaviourIn(BaseModel):
    delay_ms: int | None = Field(default=None, ge=0, le=30_000)
    fail_next: list[int] | None = Field(default=None, max_length=100)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "message": message}, status_code=status)


def create_app(state: CloudonixState | None = None) -> FastAPI:
    """The stand-in as an ASGI app; ``app.state.cloudonix`` is its :class:`CloudonixState`."""
    st = state or CloudonixState()
    app = FastAPI(title="Cloudonix API stand-in (voicebus simulator)", docs_url="/_sim/docs",
                  openapi_url="/_sim/openapi.json", redoc_url=None)
    app.state.cloudonix = st

    def authorize(request: Request, domain: str) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        expected = st.domains.get(domain)
        return (scheme.lower() == "bearer" and bool(token) and expected is not None
                and secrets.compare_digest(token.strip(), expected))

    async def session_call(request: Request, method: str, domain: str, session: str) -> Response:
        if st.delay_s:  # simulated latency; cut short when the stand-in shuts down
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.closing.wait(), st.delay_s)
        d = normalize_domain(domain)
        ok = authorize(request, d)
        s = st.sessions.get(session)
        if s is not None and s.domain != d:
            s = None  # a session of another domain does not exist for this one
        if st.fail_next:
            status = st.fail_next.pop(0)
            resp: Response = _error(status, "injected failure")
        elif not ok:
            status, resp = 401, _error(401, "Unauthorized")
        elif s is None or s.state == "ended":
            status, resp = 404, _error(404, "Session not found")
        elif method == "GET":
            status, resp = 200, JSONResponse(s.cloudonix_json())
        else:
            s.end("rest")
            status, resp = 204, Response(status_code=204)
        seen = SeenRequest(method, status, _now(), ok)
        (s.requests if s is not None else st.unmatched).append(seen)
        return resp

    @app.get(SESSION_PATH)
    async def get_session(domain: str, session: str, request: Request) -> Response:
        return await session_call(request, "GET", domain, session)

    @app.delete(SESSION_PATH)
    async def delete_session(domain: str, session: str, request: Request) -> Response:
        return await session_call(request, "DELETE", domain, session)

    @app.post("/_sim/domains", status_code=201)
    async def add_domain(body: DomainIn) -> Response:
        try:
            return JSONResponse({"domain": st.add_domain(body.domain, body.bearer_token)}, status_code=201)
        except ValueError as e:
            return _error(422, str(e))

    @app.post("/_sim/sessions", status_code=201)
    async def add_session(body: SessionIn) -> Response:
        try:
            s = st.add_session(body.domain, body.session, body.from_, body.to)
        except LookupError as e:
            return _error(404, str(e))
        except FileExistsError as e:
            return _error(409, str(e))
        return JSONResponse(s.admin_json(), status_code=201)

    @app.get("/_sim/sessions/{session}")
    async def session_state(session: str, wait_ended: float = 0.0) -> Response:
        s = st.sessions.get(session)
        if s is None:
            return _error(404, f"no session {session!r}")
        if wait_ended > 0 and s.state != "ended":
            waiters = [asyncio.ensure_future(s.ended.wait()), asyncio.ensure_future(st.closing.wait())]
            try:
                await asyncio.wait(waiters, timeout=min(wait_ended, MAX_WAIT_ENDED_S),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        return JSONResponse(s.admin_json())

    @app.post("/_sim/sessions/{session}/end")
    async def caller_hangup(session: str) -> Response:
        s = st.sessions.get(session)
        if s is None:
            return _error(404, f"no session {session!r}")
        ended_now = s.end("caller")
        return JSONResponse({**s.admin_json(), "ended_now": ended_now})

    @app.post("/_sim/behaviour")
    async def behaviour(body: BehaviourIn) -> dict[str, Any]:
        if body.delay_ms is not None:
            st.delay_s = body.delay_ms / 1000
        if body.fail_next is not None:
            st.fail_next = list(body.fail_next)
        return {"delay_ms": int(st.delay_s * 1000), "fail_next": st.fail_next}

    @app.get("/_sim/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "alive", "domains": sorted(st.domains), "sessions": len(st.sessions)}

    return app


@dataclass
class RunningCloudonixApi:
    server: RunningServer
    state: CloudonixState

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.asynccontextmanager
async def run_cloudonix_api(domains: dict[str, str] | None = None, *, host: str = "127.0.0.1",
                            port: int = 0, state: CloudonixState | None = None) -> AsyncIterator[RunningCloudonixApi]:
    """Run the stand-in on ``host:port`` (0 = a free port) for the duration of the block."""
    st = state or CloudonixState()
    for domain, token in (domains or {}).items():
        st.add_domain(domain, token)
    async with serve_app(create_app(st), host, port) as running:
        try:
            yield RunningCloudonixApi(running, st)
        finally:
            st.closing.set()  # wake long-polls so shutdown is not held up by them
