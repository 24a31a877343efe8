"""Lifecycle events from JetStream applied to runs (idempotent, durable, first terminal wins), and the
reaper that ends runs whose holder stopped renewing its quota lease."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from redis.exceptions import ConnectionError as RedisConnectionError

from voicebus.bus import subjects as sj
from voicebus.bus.agent import demo_definition
from voicebus.bus.events import publish_call_ended, publish_event
from voicebus.bus.messages import (
    CallAnswered,
    CallEnded,
    CallHangup,
    CallStarted,
    LifecycleEvent,
    RunCreate,
    RunRecord,
)
from voicebus.config import ConfigService
from voicebus.config.consumer import EventConsumer, is_transient
from voicebus.config.quota import Quota
from voicebus.config.reaper import LEASE_EXPIRED_REASON, NO_LEASE_REASON
from voicebus.config.store import event_key


async def new_run(svc: ConfigService, org_id: int, lease_id: str | None = None, call_id: str = "call-1") -> RunRecord:
    agent = await svc.store.create_agent(org_id, "a", demo_definition())
    return await svc.store.create_run(RunCreate(
        organization_id=org_id, agent_uuid=agent.uuid, name="WR-AGS-00000001", call_type="inbound",
        mode="cloudonix", call_id=call_id, quota_lease_id=lease_id))


def ev(cls: type[LifecycleEvent], run: RunRecord, **kw: Any) -> Any:
    return cls(call_id=run.call_id or "c", run_id=run.id, organization_id=run.organization_id, source="test", **kw)



async def publish(svc: ConfigService, name: str, event: LifecycleEvent, msg_id: str | None = None) -> None:
    if msg_id is None:
        await publish_event(svc.js, svc.subjects, name, event)
    else:  # same event_id under another JetStream msg id: a duplicate that JetStream cannot catch
        await svc.js.publish(svc.subjects.evt(name), event.encode(), headers={"Nats-Msg-Id": msg_id})


async def run_where(svc: ConfigService, run_id: int, check: Any, helpers: Any, what: str) -> RunRecord:
    async def probe() -> RunRecord | None:
        rec = await svc.store.get_run(run_id)
        return rec if check(rec) else None

    return await helpers.eventually(probe, timeout=5, what=what)


async def test_lifecycle_events_applied_in_order(svc: ConfigService, org: Any, helpers: Any) -> None:
    tcfg = await svc.store.create_telephony(org.id, "cloudonix", "m", {"domain_id": "acme", "bearer_token": "t"})
    lease = await svc.quota.acquire(org.id, 10)
    run = await new_run(svc, org.id, lease.lease_id)
    t0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    await publish(svc, sj.EVT_CALL_STARTED, ev(CallStarted, run, provider="cloudonix",
                                               telephony_config_id=tcfg.id, at=t0))
    rec = await run_where(svc, run.id, lambda r: r.state == "running", helpers, "running")
    assert rec.started_at == t0 and rec.telephony_configuration_id == tcfg.id

    await publish(svc, sj.EVT_CALL_ANSWERED, ev(CallAnswered, run, runner_id="runner-7", at=t0 + timedelta(seconds=1)))
    await publish(svc, sj.EVT_CALL_HANGUP, ev(CallHangup, run, outcome="hung_up", status=204,
                                              at=t0 + timedelta(seconds=9)))
    await publish_call_ended(svc.js, svc.subjects, ev(CallEnded, run, state="completed", reason="agent_hangup",
                                                      quota_lease_id=lease.lease_id, at=t0 + timedelta(seconds=10)))
    rec = await run_where(svc, run.id, lambda r: r.state == "completed", helpers, "completed")
    assert rec.end_reason == "agent_hangup" and rec.ended_at == t0 + timedelta(seconds=10)
    assert rec.logs["runner"] == {"runner_id": "runner-7", "at": (t0 + timedelta(seconds=1)).isoformat()}
    assert rec.logs["carrier_hangup"] == {"outcome": "hung_up", "status": 204,
                                          "at": (t0 + timedelta(seconds=9)).isoformat()}
    assert await svc.quota.in_use(org.id) == 0  # call.ended released the slot

    # First terminal event wins: a later call.failed changes nothing.
    await publish_call_ended(svc.js, svc.subjects, ev(CallEnded, run, state="failed", reason="late"))
    marker = ev(CallHangup, run, outcome="marker")
    await publish(svc, sj.EVT_CALL_HANGUP, marker)
    rec = await run_where(svc, run.id, lambda r: r.logs["carrier_hangup"]["outcome"] == "marker", helpers, "marker")
    assert (rec.state, rec.end_reason) == ("completed", "agent_hangup")


async def test_duplicate_event_applied_once(svc: ConfigService, org: Any, helpers: Any) -> None:
    run = await new_run(svc, org.id)
    first = ev(CallAnswered, run, runner_id="r1")
    await publish(svc, sj.EVT_CALL_ANSWERED, first)
    await run_where(svc, run.id, lambda r: r.logs.get("runner", {}).get("runner_id") == "r1", helpers, "r1")
    await publish(svc, sj.EVT_CALL_ANSWERED, ev(CallAnswered, run, runner_id="r2"))  # failover
    await run_where(svc, run.id, lambda r: r.logs["runner"]["runner_id"] == "r2", helpers, "r2")

    # Redeliver the first event (e.g. the publisher retried after JetStream's dedupe window).
    await publish(svc, sj.EVT_CALL_ANSWERED, first, msg_id=uuid.uuid4().hex)
    await publish(svc, sj.EVT_CALL_HANGUP, ev(CallHangup, run, outcome="marker"))
    rec = await run_where(svc, run.id, lambda r: "carrier_hangup" in r.logs, helpers, "marker after duplicate")
    assert rec.logs["runner"]["runner_id"] == "r2"  # the duplicate did not roll it back
    async with svc.engine.connect() as conn:
        n = await conn.scalar(sa.text("SELECT count(*) FROM processed_events WHERE event_id = :e"),
                              {"e": first.event_id})
    assert n == 1


async def test_bad_events_do_not_block_the_stream(start_service: Any, db_url: str, helpers: Any) -> None:
    async with start_service(db_url) as svc:
        org = await helpers.new_org(svc)
        run = await new_run(svc, org.id)
        await svc.js.publish(svc.subjects.evt(sj.EVT_CALL_ENDED), b'{"not": "an event"}')
        await svc.js.publish(svc.subjects.evt("call.transferred"), b'{"whatever": 1}')
        await publish(svc, sj.EVT_CALL_STARTED, CallStarted(call_id="x", run_id=999_999, organization_id=org.id,
                                                            source="t", provider="cloudonix"))
        # Values PostgreSQL would refuse (int4 overflow, a 100-character id) must not wedge the consumer.
        await publish(svc, sj.EVT_CALL_ANSWERED, CallAnswered(call_id="x", run_id=2**40, organization_id=org.id,
                                                              source="t", runner_id="r"))
        long_id = ev(CallHangup, run, outcome="long-id", event_id="e" * 100)
        await publish(svc, sj.EVT_CALL_HANGUP, long_id)
        # Names another organization: ignored rather than letting one tenant touch another's run.
        await publish_call_ended(svc.js, svc.subjects, CallEnded(
            call_id="x", run_id=run.id, organization_id=org.id + 1, source="t", state="failed", reason="spoofed"))
        # A telephony configuration that is not the organization's is not attached.
        await publish(svc, sj.EVT_CALL_STARTED, ev(CallStarted, run, provider="cloudonix",
                                                   telephony_config_id=2**40))
        rec = await run_where(svc, run.id, lambda r: r.state == "running", helpers, "valid event after bad ones")
        assert rec.telephony_configuration_id is None and rec.end_reason is None
        assert rec.logs["carrier_hangup"]["outcome"] == "long-id"
        await publish(svc, sj.EVT_CALL_HANGUP, long_id, msg_id=uuid.uuid4().hex)  # its duplicate is recognized
        await publish(svc, sj.EVT_CALL_HANGUP, ev(CallHangup, run, outcome="marker"))
        await run_where(svc, run.id, lambda r: r.logs["carrier_hangup"]["outcome"] == "marker", helpers, "marker")
        async with svc.engine.connect() as conn:
            n = await conn.scalar(sa.text("SELECT count(*) FROM processed_events WHERE event_id = :e"),
                                  {"e": event_key(long_id.event_id)})
        assert n == 1


def test_transient_errors_are_told_apart_from_bugs() -> None:
    assert is_transient(sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused")))
    assert is_transient(RedisConnectionError("down"))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(sa.exc.IntegrityError("INSERT", {}, Exception("duplicate")))
    assert not is_transient(ValueError("bug"))


async def test_durable_consumer_catches_up(start_service: Any, sqlite_url: str, helpers: Any) -> None:
    async with start_service(sqlite_url, consumer=False) as svc:
        org = await helpers.new_org(svc)
        run = await new_run(svc, org.id)
        await publish(svc, sj.EVT_CALL_STARTED, ev(CallStarted, run, provider="cloudonix"))
        consumer = EventConsumer(svc.js, svc.subjects, svc.store, svc.quota)
        await consumer.start()  # created after the event was published: still gets it
        try:
            await run_where(svc, run.id, lambda r: r.state == "running", helpers, "backlog applied")
        finally:
            await consumer.stop()
        # While no consumer runs, the event waits in the stream; a new instance on the same durable resumes.
        await publish_call_ended(svc.js, svc.subjects, ev(CallEnded, run, state="failed", reason="no_runner"))
        info = await svc.js.consumer_info(svc.subjects.events_stream, f"{svc.subjects.prefix}-config-runs")
        assert info.num_pending >= 1
        assert (await svc.store.get_run(run.id)).state == "running"
        consumer = EventConsumer(svc.js, svc.subjects, svc.store, svc.quota)
        await consumer.start()
        try:
            rec = await run_where(svc, run.id, lambda r: r.state == "failed", helpers, "resumed")
            assert rec.end_reason == "no_runner"
        finally:
            await consumer.stop()


# --------------------------------------------------------------------------------------------- reaper
async def test_reaper_ends_runs_whose_lease_expired(svc: ConfigService, org: Any, helpers: Any) -> None:
    short = Quota(svc.redis, svc.settings.subject_prefix, ttl_s=0.2)  # a holder that will stop renewing
    dying = await short.acquire(org.id, 10)
    live = await svc.quota.acquire(org.id, 10)
    orphan = await new_run(svc, org.id, dying.lease_id, call_id="orphan")
    healthy = await new_run(svc, org.id, live.lease_id, call_id="healthy")
    ended = await new_run(svc, org.id, dying.lease_id, call_id="ended")
    await svc.store.finish_run(ended.id, "completed", "normal")

    await helpers.eventually(lambda: _lease_gone(svc, org.id, dying.lease_id), timeout=3, what="lease expiry")
    reaper = svc.reaper
    assert reaper is not None
    assert await reaper.run_once() == []  # first sighting only makes it a suspect (grace for in-flight ends)
    assert await reaper.run_once() == [orphan.id]
    rec = await svc.store.get_run(orphan.id)
    assert (rec.state, rec.end_reason) == ("failed", LEASE_EXPIRED_REASON) and rec.ended_at is not None
    assert (await svc.store.get_run(healthy.id)).state == "created"
    assert (await svc.store.get_run(ended.id)).end_reason == "normal"
    assert await reaper.run_once() == []  # nothing left to do


async def _lease_gone(svc: ConfigService, org_id: int, lease_id: str) -> bool:
    return lease_id not in await svc.quota.live_leases(org_id)


async def test_reaper_loop_ends_run_and_announces_it(start_service: Any, sqlite_url: str, helpers: Any) -> None:
    async with start_service(sqlite_url, reaper=True, reaper_interval_s=0.05, run_max_age_s=3600) as svc:
        org = await helpers.new_org(svc)
        failed_events: asyncio.Queue[CallEnded] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            await failed_events.put(CallEnded.model_validate_json(msg.data))

        sub = await svc.nc.subscribe(svc.subjects.evt(sj.EVT_CALL_FAILED), cb=on_msg)
        lease = await svc.quota.acquire(org.id, 10)
        run = await new_run(svc, org.id, lease.lease_id, call_id="crashed-call")
        await svc.redis.zrem(svc.quota.key(org.id), lease.lease_id)  # every holder died
        rec = await run_where(svc, run.id, lambda r: r.state == "failed", helpers, "reaped by the loop")
        assert rec.end_reason == LEASE_EXPIRED_REASON
        announced = await asyncio.wait_for(failed_events.get(), timeout=5)
        assert (announced.run_id, announced.call_id, announced.reason) == (run.id, "crashed-call",
                                                                           LEASE_EXPIRED_REASON)
        await sub.unsubscribe()


async def test_reaper_ends_leaseless_runs_past_max_age(start_service: Any, sqlite_url: str, helpers: Any) -> None:
    async with start_service(sqlite_url, run_max_age_s=0.05) as svc:
        org = await helpers.new_org(svc)
        run = await new_run(svc, org.id, lease_id=None)
        assert svc.reaper is not None

        async def reaped() -> list[int]:
            return await svc.reaper.run_once()  # type: ignore[union-attr]

        assert await helpers.eventually(reaped, timeout=3, what="leaseless run reaped") == [run.id]
        rec = await svc.store.get_run(run.id)
        assert (rec.state, rec.end_reason) == ("failed", NO_LEASE_REASON)


async def test_reaper_waits_for_the_event_backlog(svc: ConfigService, org: Any, helpers: Any) -> None:
    """After a restart with unapplied events, the run's real end wins over 'abandoned'."""
    lease = await svc.quota.acquire(org.id, 10)
    run = await new_run(svc, org.id, lease.lease_id)
    assert svc.consumer is not None and svc.reaper is not None
    await svc.consumer.stop()  # config "down": events pile up in the stream
    await publish_call_ended(svc.js, svc.subjects, ev(CallEnded, run, state="completed", reason="caller_hangup"))
    await svc.quota.release(org.id, lease.lease_id)  # the holder released, then died

    assert await svc.reaper.run_once() == []
    assert await svc.reaper.run_once() == []  # lease gone twice, but the backlog is not applied yet
    assert (await svc.store.get_run(run.id)).state == "created"

    consumer = EventConsumer(svc.js, svc.subjects, svc.store, svc.quota)
    await consumer.start()
    try:
        rec = await run_where(svc, run.id, lambda r: r.state == "completed", helpers, "backlog applied")
        assert rec.end_reason == "caller_hangup"
        assert await svc.reaper.run_once() == []
    finally:
        await consumer.stop()
