"""Carrier status callbacks (``{prefix}.evt.call.status``) applied to runs by the durable consumer:
always logged, idempotent by event id, ending only runs the carrier says were never connected."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from voicebus.bus import subjects as sj
from voicebus.bus.agent import demo_definition
from voicebus.bus.events import publish_event
from voicebus.bus.messages import CallHangup, CallStatusEvent, LifecycleEvent, RunCreate, RunRecord, RunUpdate
from voicebus.config import ConfigService

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def svc(start_service: Callable[..., Any], db_url: str) -> AsyncIterator[ConfigService]:
    async with start_service(db_url) as s:
        yield s


async def new_run(svc: ConfigService, org_id: int, state: str = "created") -> tuple[RunRecord, str]:
    lease = await svc.quota.acquire(org_id, 10)
    agent = await svc.store.create_agent(org_id, "a", demo_definition())
    run = await svc.store.create_run(RunCreate(
        organization_id=org_id, agent_uuid=agent.uuid, name="WR-TEL-OUT-00000001", call_type="outbound",
        mode="twilio", call_id=uuid.uuid4().hex, quota_lease_id=lease.lease_id))
    if state != "created":
        run, _ = await svc.store.update_run(RunUpdate(run_id=run.id, state=state))  # type: ignore[arg-type]
    return run, lease.lease_id


def status(run: RunRecord, st: str | None, raw: str | None = None, **kw: Any) -> CallStatusEvent:
    return CallStatusEvent(call_id=run.call_id or "c", run_id=run.id, organization_id=run.organization_id,
                           source="ingress", status=st, raw_status=raw or st or "?", **kw)


async def applied(svc: ConfigService, run: RunRecord, helpers: Any, n: int) -> RunRecord:
    """The run once ``n`` status callbacks are in its log."""
    async def probe() -> RunRecord | None:
        rec = await svc.store.get_run(run.id)
        return rec if len(rec.logs.get("status_callbacks") or []) >= n else None

    return await helpers.eventually(probe, timeout=5, what=f"{n} status callbacks on run {run.id}")


async def send(svc: ConfigService, event: LifecycleEvent, msg_id: str | None = None) -> None:
    if msg_id is None:
        await publish_event(svc.js, svc.subjects, sj.EVT_CALL_STATUS, event)
    else:  # same event_id under another JetStream msg id: only processed_events can catch it
        await svc.js.publish(svc.subjects.evt(sj.EVT_CALL_STATUS), event.encode(), headers={"Nats-Msg-Id": msg_id})


async def test_progress_is_logged_and_duration_kept(svc: ConfigService, org: Any, helpers: Any) -> None:
    run, lease = await new_run(svc, org.id)
    await send(svc, status(run, "initiated", at=T0, fields={"CallSid": "CA1", "SequenceNumber": "0"}))
    await send(svc, status(run, "ringing", at=T0 + timedelta(seconds=1)))
    await send(svc, status(run, None, "machine-start", at=T0 + timedelta(seconds=2)))  # unmapped carrier word
    rec = await applied(svc, run, helpers, 3)
    assert rec.logs["status_callbacks"] == [
        {"status": "initiated", "raw_status": "initiated", "duration_s": None, "at": T0.isoformat(),
         "fields": {"CallSid": "CA1", "SequenceNumber": "0"}},
        {"status": "ringing", "raw_status": "ringing", "duration_s": None,
         "at": (T0 + timedelta(seconds=1)).isoformat(), "fields": {}},
        {"status": None, "raw_status": "machine-start", "duration_s": None,
         "at": (T0 + timedelta(seconds=2)).isoformat(), "fields": {}},
    ]
    assert rec.state == "created" and "call_duration_s" not in rec.gathered_context
    assert lease in await svc.quota.live_leases(org.id)

    # completed of a running call is only logged: ingress and the runner end it with the precise reason.
    await svc.store.update_run(RunUpdate(run_id=run.id, state="running"))
    await send(svc, status(run, "completed", duration_s=42))
    rec = await applied(svc, run, helpers, 4)
    assert rec.state == "running" and rec.end_reason is None
    assert rec.gathered_context["call_duration_s"] == 42
    assert lease in await svc.quota.live_leases(org.id)


@pytest.mark.parametrize("st", ["busy", "no-answer", "failed", "canceled"])
async def test_not_connected_ends_the_run(svc: ConfigService, org: Any, helpers: Any, st: str) -> None:
    run, lease = await new_run(svc, org.id)
    await send(svc, status(run, st, duration_s=0, at=T0))
    rec = await applied(svc, run, helpers, 1)
    assert (rec.state, rec.end_reason, rec.ended_at) == ("failed", st, T0)
    assert rec.gathered_context["call_duration_s"] == 0
    assert lease not in await svc.quota.live_leases(org.id)


async def test_failed_status_ends_a_running_run_too(svc: ConfigService, org: Any, helpers: Any) -> None:
    run, _lease = await new_run(svc, org.id, "running")
    await send(svc, status(run, "failed"))
    rec = await applied(svc, run, helpers, 1)
    assert (rec.state, rec.end_reason) == ("failed", "failed") and await svc.quota.in_use(org.id) == 0


async def test_completed_before_media(svc: ConfigService, org: Any, helpers: Any) -> None:
    run, _lease = await new_run(svc, org.id)
    await send(svc, status(run, "completed", duration_s=3))
    rec = await applied(svc, run, helpers, 1)
    assert (rec.state, rec.end_reason) == ("failed", "ended_before_media")
    assert rec.gathered_context["call_duration_s"] == 3 and await svc.quota.in_use(org.id) == 0


async def test_terminal_run_never_changes_and_duplicates_apply_once(svc: ConfigService, org: Any,
                                                                    helpers: Any) -> None:
    run, lease = await new_run(svc, org.id, "running")
    await svc.store.update_run(RunUpdate(run_id=run.id, state="completed", end_reason="caller_hangup"))
    first = status(run, "busy", duration_s=7)
    await send(svc, first)
    rec = await applied(svc, run, helpers, 1)
    assert (rec.state, rec.end_reason) == ("completed", "caller_hangup")  # a terminal run stays as it ended
    assert rec.gathered_context["call_duration_s"] == 7  # but what the carrier reported is kept
    assert lease not in await svc.quota.live_leases(org.id)  # a terminal run holds no slot

    # The same event again (a publisher retry outside JetStream's dedupe window): not logged twice.
    await send(svc, first, msg_id=uuid.uuid4().hex)
    await publish_event(svc.js, svc.subjects, sj.EVT_CALL_HANGUP, CallHangup(
        call_id=run.call_id or "c", run_id=run.id, organization_id=org.id, source="t", outcome="marker"))

    async def marker() -> RunRecord | None:
        r = await svc.store.get_run(run.id)
        return r if "carrier_hangup" in r.logs else None
    rec = await helpers.eventually(marker, timeout=5, what="marker after the duplicate")
    assert len(rec.logs["status_callbacks"]) == 1


async def test_status_for_another_organizations_run_is_ignored(svc: ConfigService, org: Any,
                                                               helpers: Any) -> None:
    run, lease = await new_run(svc, org.id)
    other = await helpers.new_org(svc, "Other")
    forged = CallStatusEvent(call_id=run.call_id or "c", run_id=run.id, organization_id=other.id, source="x",
                             status="busy", raw_status="busy")
    await send(svc, forged)
    await send(svc, status(run, "ringing"))
    rec = await applied(svc, run, helpers, 1)
    assert rec.state == "created" and [c["status"] for c in rec.logs["status_callbacks"]] == ["ringing"]
    assert lease in await svc.quota.live_leases(org.id)
