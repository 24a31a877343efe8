"""Every Agent Stream close code and reason the seed lists, against the running stack.

Refusals after the run is created (handshake errors) must also leave the run failed with that reason.
"""

from __future__ import annotations

import contextlib
import uuid

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import DOMAIN, E2E, NO_TOKEN_DOMAIN
from voicebus.simulator.call import CallScript, place_call


async def _close_of(url: str) -> tuple[int | None, str]:
    """Open a socket, send nothing, and return how the server closed it."""
    async with connect(url, open_timeout=10) as ws:
        with contextlib.suppress(ConnectionClosed):  # non-1000 closes raise; we only want the code
            async for _ in ws:
                pass
    return ws.close_code, ws.close_reason or ""


@pytest.mark.parametrize(
    ("params", "code", "reason"),
    [
        ({"provider": None}, 1008, "Missing provider query parameter"),
        ({"provider": "nosuchcarrier"}, 1008, "Unknown provider: nosuchcarrier"),
        ({"provider": "plivo"}, 1011, "Agent Stream is not supported for provider plivo"),
    ],
    ids=["missing-provider", "unknown-provider", "provider-without-agent-stream"],
)
async def test_routing_refusals(e2e: E2E, params: dict, code: int, reason: str) -> None:
    assert await _close_of(e2e.url(**params)) == (code, reason)


async def test_agent_not_found(e2e: E2E) -> None:
    assert await _close_of(e2e.url(agent_uuid=str(uuid.uuid4()))) == (1008, "Agent not found")
    assert await _close_of(e2e.url(agent_uuid="not-a-uuid")) == (1008, "Agent not found")


async def test_quota_exceeded(e2e: E2E) -> None:
    code, reason = await _close_of(e2e.url(agent_uuid=e2e.limited_org_agent_uuid))
    assert (code, reason) == (1008, "Concurrent call limit reached")


HANDSHAKE_CASES = [
    ({"Domain": None}, {}, 4400, "Missing Domain query parameter"),
    ({"Domain": "nope.cloudonix.net"}, {}, 4400, "Unknown Cloudonix domain: nope.cloudonix.net"),
    ({"Domain": NO_TOKEN_DOMAIN}, {}, 4400, "Cloudonix configuration missing bearer_token"),
    ({}, {"handshake": "skip_connected"}, 4400, "Expected connected event"),
    ({}, {"handshake": "no_start"}, 4400, "Expected start event"),
    ({}, {"omit_start_fields": ("session",)}, 4400, "Missing stream identifiers: session"),
    ({}, {"register": False}, 4400, "Cloudonix session validation failed"),
    ({}, {"handshake": "nothing"}, 4408, "Handshake timeout"),
]


@pytest.mark.parametrize(("params", "script_kw", "code", "reason"), HANDSHAKE_CASES,
                         ids=["missing-domain", "unknown-domain", "missing-bearer-token", "no-connected",
                              "no-start", "missing-identifiers", "session-validation-failed", "timeout"])
async def test_handshake_refusals_end_the_run(e2e: E2E, params: dict, script_kw: dict, code: int,
                                              reason: str) -> None:
    call_id = f"e2e-{uuid.uuid4().hex[:8]}"
    register = script_kw.pop("register", True)
    script = CallScript(domain=DOMAIN, cloudonix_api=e2e.cloudonix.url if register else None,
                        max_duration_s=15, **script_kw)
    report = await place_call(e2e.url(callId=call_id, **params), script)
    assert (report.close_code, report.close_reason) == (code, reason), report.render()
    run = await e2e.run_for_call(call_id)
    assert run["state"] == "failed", run
    assert run["end_reason"] == reason
    assert run["logs"]["inbound_webhook"].get("Domain") == params.get("Domain", DOMAIN)
    await e2e.wait_quota_free()
