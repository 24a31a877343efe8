"""call-control SIGKILLed mid-call: the agent's hangup waits as a durable intent and reaches the carrier
once call-control is back (issue 13: "an agent hangup while call-control is down reaches the carrier").

Named so that it sorts before test_logs.py, which must run last.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Any

import httpx

from tests.e2e.conftest import DOMAIN, E2E, eventually
from voicebus.simulator.call import CallerAction, CallScript, place_call

SERVICE = "call-control"


async def _session(e2e: E2E, session: str) -> dict[str, Any]:
    """The Cloudonix stand-in's view of the session, at once (no long poll)."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        resp = await http.get(f"{e2e.cloudonix.url}/_sim/sessions/{session}")
        resp.raise_for_status()
        return dict(resp.json())


async def test_agent_hangup_while_call_control_is_down_reaches_the_carrier_once_it_is_back(e2e: E2E) -> None:
    stack = e2e.stack
    cc = stack.services[SERVICE]
    call_id = f"e2e-{uuid.uuid4().hex[:8]}"
    script = CallScript(domain=DOMAIN, cloudonix_api=e2e.cloudonix.url, actions=[CallerAction.dtmf("1")],
                        max_duration_s=60)
    call = asyncio.create_task(place_call(e2e.url(callId=call_id), script))
    try:
        async def answered() -> dict[str, Any] | None:
            run = await e2e.run_for_call(call_id, terminal=False)
            return run if ((run.get("logs") or {}).get("runner") or {}).get("runner_id") else None

        # The call is up (its leg registered with call-control, a runner on it); then call-control dies.
        await eventually(answered, 20, "a runner to answer the call")
        cc.signal(signal.SIGKILL)
        assert await asyncio.to_thread(cc.wait, 10) is not None, "call-control did not die"

        # The demo agent: greeting, "press 1", the caller's 1, the answer, goodbye, hangup.
        report = await asyncio.wait_for(call, 60)
        assert report.error is None, report.render()
        assert report.dtmf_sent == ["1"], report.render()
        assert report.hung_up_by == "agent", report.render()
        assert report.close_code == 1000, report.render()

        # Nobody could hang the carrier leg up, and nobody ended the run: the intent waits in JetStream.
        before = await _session(e2e, report.session)
        assert (before["state"], before["deletes"]) == ("active", 0), before  # the leg is still up
        run = await e2e.run_for_call(call_id, terminal=False)
        assert run["state"] == "running", run

        # call-control comes back (promptly: the agent's call leaves its quota lease to config, which
        # fails a run whose lease lapsed) and carries the intent out.
        cc.start(stack.out, stack.color)
        await asyncio.to_thread(stack.wait_healthy, 60.0, [SERVICE])

        async def deleted() -> dict[str, Any] | None:
            state = await _session(e2e, report.session)
            return state if state["deletes"] else None

        after = await eventually(deleted, 20, "call-control to hang the Cloudonix session up")
        deletes = [r["status"] for r in after["requests"] if r["method"] == "DELETE"]
        assert deletes == [204], after  # exactly one hangup reached the carrier, and it ended the call
        assert (after["state"], after["ended_by"]) == ("ended", "rest"), after
        run = await e2e.run_for_call(call_id)
        assert (run["state"], run["end_reason"]) == ("completed", "agent_hangup"), run
        await e2e.wait_quota_free()
        assert (await _session(e2e, report.session))["deletes"] == 1  # and no second one came later
    finally:
        if not call.done():
            call.cancel()
        if not cc.alive:  # leave the shared stack healthy for the tests after this one
            cc.start(stack.out, stack.color)
        await asyncio.to_thread(stack.wait_healthy, 60.0, [SERVICE])
