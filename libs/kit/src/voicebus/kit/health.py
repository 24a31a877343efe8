"""``/healthz`` (process alive) and ``/readyz`` (dependencies reachable) for every service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

Check = Callable[[], Awaitable[bool] | bool]


class Health:
    def __init__(self, service: str) -> None:
        self.service = service
        self.checks: dict[str, Check] = {}
        self.info: dict[str, object] = {}

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    async def evaluate(self) -> dict[str, bool]:
        results: dict[str, bool] = {}
        for name, check in self.checks.items():
            try:
                r = check()
                results[name] = bool(await r) if hasattr(r, "__await__") else bool(r)  # type: ignore[arg-type]
            except Exception:
                results[name] = False
        return results


def health_router(health: Health) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"service": health.service, "status": "alive"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        results = await health.evaluate()
        ok = all(results.values())
        return JSONResponse(
            {"service": health.service, "ready": ok, "checks": results, **health.info},
            status_code=200 if ok else 503,
        )

    return router
