"""Ends runs whose holder is gone, so every run ends and every slot is released whatever crashed.

A live call's holder renews its quota lease every ttl/3. When the lease has vanished from Redis
while the run is still created/running, nobody is running that call any more: the run is ended
``failed`` with a reason that says so. The reaper needs nothing from the other services, which is
what makes the guarantee hold when all of them died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from datetime import timedelta

from nats.js import JetStreamContext

from voicebus.bus.events import publish_call_ended
from voicebus.bus.messages import CallEnded
from voicebus.bus.subjects import Subjects
from voicebus.config.consumer import durable_name
from voicebus.config.db import utcnow
from voicebus.config.quota import Quota
from voicebus.config.store import Store

log = logging.getLogger("voicebus.config.reaper")

LEASE_EXPIRED_REASON = "abandoned: quota lease expired (holder stopped renewing)"
NO_LEASE_REASON = "abandoned: no quota lease and older than the longest allowed call"
PROCESSED_EVENTS_KEEP = timedelta(days=8)  # longer than the events stream keeps messages (7 days)
PRUNE_EVERY = timedelta(hours=1)
# Longest a suspect waits for the event consumer to catch up (a poison message must not stop the reaper).
MAX_CATCH_UP_WAIT_S = 60.0


class Reaper:
    def __init__(self, store: Store, quota: Quota, interval_s: float, run_max_age_s: float,
                 js: JetStreamContext | None = None, subjects: Subjects | None = None) -> None:
        self.store = store
        self.quota = quota
        self.interval_s = interval_s
        self.run_max_age = timedelta(seconds=run_max_age_s)
        self.js = js
        self.subjects = subjects
        # Runs seen without a lease, with when and at which events-stream position they were first
        # seen so. A run is reaped only when its lease is missing on two passes in a row (a holder
        # that releases the lease and then publishes call.ended gets one interval for that event to
        # land) AND the event consumer has applied everything published up to that first sighting
        # (after a restart with a backlog, the run's real call.ended may still be in the stream).
        self._suspects: dict[int, tuple[float, int | None]] = {}
        self._last_prune = utcnow() - PRUNE_EVERY
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="config-reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reaper pass failed; next pass in %.1fs", self.interval_s)
            await asyncio.sleep(self.interval_s)

    async def run_once(self) -> list[int]:
        """One pass; returns the ids of the runs it ended."""
        reaped: list[int] = []
        rows = await self.store.active_runs_with_lease()
        by_org: dict[int, list[tuple[int, str, str | None]]] = defaultdict(list)
        for run_id, org_id, lease_id, call_id in rows:
            by_org[org_id].append((run_id, lease_id, call_id))
        missing: dict[int, tuple[int, str, str | None]] = {}
        for org_id, runs in by_org.items():
            live = await self.quota.live_leases(org_id)
            for run_id, lease_id, call_id in runs:
                if lease_id not in live:
                    missing[run_id] = (org_id, lease_id, call_id)
        position = await self._events_position() if missing else None
        last_seq, applied_seq = position if position else (None, None)
        now = time.monotonic()
        confirmed: list[int] = []
        suspects: dict[int, tuple[float, int | None]] = {}
        for run_id in missing:
            if run_id not in self._suspects:
                suspects[run_id] = (now, last_seq)
                continue
            first_seen, seq = self._suspects[run_id]
            caught_up = seq is None or applied_seq is None or applied_seq >= seq
            if caught_up or now - first_seen > MAX_CATCH_UP_WAIT_S:
                confirmed.append(run_id)
            else:
                suspects[run_id] = (first_seen, seq)
        self._suspects = suspects
        for run_id in confirmed:
            org_id, lease_id, call_id = missing[run_id]
            if await self.store.finish_run(run_id, "failed", LEASE_EXPIRED_REASON) is not None:
                log.warning("run %s ended: %s", run_id, LEASE_EXPIRED_REASON)
                reaped.append(run_id)
                await self._announce(run_id, org_id, call_id, lease_id, LEASE_EXPIRED_REASON)

        for run_id in await self.store.active_runs_without_lease_before(utcnow() - self.run_max_age):
            record = await self.store.finish_run(run_id, "failed", NO_LEASE_REASON)
            if record is not None:
                log.warning("run %s ended: %s", run_id, NO_LEASE_REASON)
                reaped.append(run_id)
                await self._announce(run_id, record.organization_id, record.call_id, None, NO_LEASE_REASON)

        if utcnow() - self._last_prune >= PRUNE_EVERY:
            self._last_prune = utcnow()
            await self.store.prune_processed_events(utcnow() - PROCESSED_EVENTS_KEEP)
        return reaped

    async def _events_position(self) -> tuple[int, int] | None:
        """(last sequence in the events stream, last sequence the consumer has fully applied), or
        None when unknown (no JetStream handle, or no durable consumer: then only passes count)."""
        if self.js is None or self.subjects is None:
            return None
        try:
            stream = await self.js.stream_info(self.subjects.events_stream)
            consumer = await self.js.consumer_info(self.subjects.events_stream, durable_name(self.subjects))
        except Exception:
            return None
        return int(stream.state.last_seq), int(consumer.ack_floor.stream_seq if consumer.ack_floor else 0)

    async def _announce(self, run_id: int, org_id: int, call_id: str | None, lease_id: str | None,
                        reason: str) -> None:
        """Tell the rest of the system (call-control may still have a carrier leg up for this call)."""
        if self.js is None or self.subjects is None or not call_id:
            return
        try:
            await publish_call_ended(self.js, self.subjects, CallEnded(
                call_id=call_id, run_id=run_id, organization_id=org_id, source="config-reaper",
                state="failed", reason=reason, quota_lease_id=lease_id))
        except Exception:
            log.warning("could not publish call.failed for reaped run %s", run_id)
