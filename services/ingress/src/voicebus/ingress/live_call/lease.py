"""A call's quota lease while its socket lives: renewed every ttl/3, released by the right party.

A crash stops renewal, so config's reaper ends the run and the slot comes back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from voicebus.bus.messages import QuotaLease
from voicebus.bus.rpc import BusError
from voicebus.ingress.bus import BusClient

log = logging.getLogger("voicebus.ingress.lease")


HANDOFF_MAX_S = 300.0
_handoffs: set[asyncio.Task[None]] = set()


async def cancel_handoffs() -> None:
    """On shutdown: stop renewing the leases of calls that ended here (they then expire on their own)."""
    for task in list(_handoffs):
        task.cancel()
    for task in list(_handoffs):
        with contextlib.suppress(asyncio.CancelledError):
            await task


class LeaseKeeper:
    def __init__(self, bus: BusClient, lease: QuotaLease, call_id: str) -> None:
        self.bus = bus
        self.lease = lease
        self.call_id = call_id
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew(), name=f"renew-{self.call_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def release(self, *, leave_to_config: bool, run_id: int | None = None) -> None:
        """Release the slot, unless the terminal event is someone else's to publish.

        Config's reaper fails a running run whose lease is gone and trusts only events published before
        the lease went. When the agent hangs up, call-control publishes the terminal event after its
        carrier hangup, which can land after the socket is closed; releasing here would let the reaper
        call a completed call abandoned. So then the lease is left to config, which releases it when it
        applies that event (or lets it expire, and the run fail, if the event never comes).

        Until then (``run_id`` given) the lease is still renewed, for at most ``HANDOFF_MAX_S``: when
        call-control is restarting, the hangup waits as a durable intent, and the slot must not lapse
        (and the reaper call the run abandoned) in the meantime.
        """
        await self.stop()
        if leave_to_config:
            log.info("call %s: quota lease left to config (its terminal event is call-control's)", self.call_id)
            if run_id is not None:
                self._keep_until_ended(run_id)
            return
        released = await self.bus.release_quota(self.lease.organization_id, self.lease.lease_id)
        log.info("call %s: quota lease released=%s", self.call_id, released)

    def _keep_until_ended(self, run_id: int) -> None:
        task = asyncio.create_task(self._renew_until_ended(run_id), name=f"handoff-{self.call_id}")
        _handoffs.add(task)
        task.add_done_callback(_handoffs.discard)

    async def _renew_until_ended(self, run_id: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDOFF_MAX_S
        lease = self.lease
        while loop.time() < deadline:
            await asyncio.sleep(max(lease.ttl_s / 3, 0.05))  # a timer, not a synchronization
            try:
                run = await self.bus.get_run(run_id)
                if run is None or run.state in ("completed", "failed"):
                    return  # config applied the terminal event (and released the lease)
                lease = await self.bus.renew_quota(lease.organization_id, lease.lease_id)
            except BusError as e:
                if e.code in ("lease_expired", "not_found"):
                    return
                log.warning("call %s: keeping the lease until the run ends: %s; will retry", self.call_id, e)

    async def _renew(self) -> None:
        lease = self.lease
        while True:
            await asyncio.sleep(max(lease.ttl_s / 3, 0.05))  # a timer, not a synchronization
            try:
                lease = await self.bus.renew_quota(lease.organization_id, lease.lease_id)
            except BusError as e:
                if e.code in ("lease_expired", "not_found"):
                    log.error("call %s: quota lease %s expired; the call continues without its slot",
                              self.call_id, lease.lease_id)
                    return
                log.warning("call %s: quota lease renewal failed (%s); will retry", self.call_id, e)
