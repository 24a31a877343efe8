"""Keeps the quota lease of an outbound call alive while the callee's phone rings.

Between ``initiate-call`` and the answer, no process holds the call: call-control only placed it and
ingress has no socket yet. Config acquired the lease, so config renews it (every ttl/3) until the run
is ``running`` (ingress holds the call and renews from then on) or terminal (the lease was released),
or until ring timeout + :data:`RING_GRACE_S` has passed: then the call was never answered and nobody
reported it, so the keeper lets the lease go and the reaper ends the run.

The keeper lives in the replica that placed the call. If that replica stops, the lease expires
within a ttl and the reaper ends the ringing run: a call that outlives its placer is failed, never
left holding a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from voicebus.bus.messages import TERMINAL_STATES
from voicebus.config.errors import NotFound
from voicebus.config.quota import LeaseExpired, Quota
from voicebus.config.store import Store

log = logging.getLogger("voicebus.config.ringing")

RING_GRACE_S = 60.0


class RingingLeases:
    def __init__(self, store: Store, quota: Quota) -> None:
        self.store = store
        self.quota = quota
        self._tasks: dict[int, asyncio.Task[str]] = {}

    def keep(self, organization_id: int, run_id: int, lease_id: str, hold_for_s: float) -> asyncio.Task[str]:
        """Renew ``lease_id`` while run ``run_id`` is ``created``, for at most ``hold_for_s`` seconds.
        The task's result says why it stopped (for logs and tests)."""
        task = asyncio.create_task(self._keep(organization_id, run_id, lease_id, hold_for_s),
                                   name=f"ringing-lease-{run_id}")
        self._tasks[run_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(run_id, None))
        return task

    def holding(self, run_id: int) -> bool:
        return run_id in self._tasks

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _keep(self, organization_id: int, run_id: int, lease_id: str, hold_for_s: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold_for_s
        every = max(0.05, self.quota.ttl_s / 3)
        while True:
            await asyncio.sleep(min(every, max(0.0, deadline - loop.time())))
            try:
                run = await self.store.get_run(run_id)
            except NotFound:
                return "run gone"
            except Exception as e:  # database briefly unreachable: keep the slot, try again next tick
                log.warning("ringing run %s: could not read its state (%s)", run_id, type(e).__name__)
                run = None
            if run is not None and run.state in TERMINAL_STATES:
                return run.state
            if run is not None and run.state == "running":
                return "running"
            if loop.time() >= deadline:
                log.warning("outbound run %s still ringing after %.0fs; its lease is left to expire", run_id,
                            hold_for_s)
                return "ring timeout"
            try:
                await self.quota.renew(organization_id, lease_id, 0)
            except LeaseExpired:
                return "lease expired"
            except Exception as e:
                log.warning("ringing run %s: could not renew lease (%s)", run_id, type(e).__name__)
